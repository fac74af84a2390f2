"""Evaluation metrics, streamed over DataLoaders of dict batches (docs/method.md, Metrics).

Accuracy (cAcc / aAcc), explanation faithfulness (comprehensiveness / sufficiency), stability of
explanations under attack, and alignment with golden masks.
"""

from egat.metrics.accuracy import (
    adversarial_accuracy,
    clean_accuracy,
    evaluate_accuracy,
    iterate_batches,
)
from egat.metrics.alignment import alignment_scores, explanation_alignment
from egat.metrics.faithfulness import (
    blur_baseline,
    descending_ranks,
    erasure_scores,
    faithfulness,
    top_count,
    upsample_maps,
)
from egat.metrics.stability import explanation_stability, spearman_rows, top_intersection

__all__ = [
    "adversarial_accuracy",
    "alignment_scores",
    "blur_baseline",
    "clean_accuracy",
    "descending_ranks",
    "erasure_scores",
    "evaluate_accuracy",
    "explanation_alignment",
    "explanation_stability",
    "faithfulness",
    "iterate_batches",
    "spearman_rows",
    "top_count",
    "top_intersection",
    "upsample_maps",
]

"""Evaluation metrics (docs/method.md, Metrics): per-image scorers of one batch, and the one loop
that streams a DataLoader's dict batches through them (stream.py).

Accuracy (cAcc / aAcc), explanation faithfulness (comprehensiveness / sufficiency), stability of
explanations under attack, alignment with golden masks, and the spurious cue's pull; catalog.py
lists them with their units and report titles.
"""

from egat.metrics.accuracy import correct, evaluate_accuracy, robust
from egat.metrics.alignment import alignment_scores
from egat.metrics.cue import cue_scores
from egat.metrics.faithfulness import (
    baseline_fill,
    blur_baseline,
    descending_ranks,
    erasure_scores,
    faithfulness,
    object_erased_correct,
    top_count,
    upsample_maps,
)
from egat.metrics.stability import spearman_rows, stability_scores, top_intersection
from egat.metrics.stream import ScoreSums, accumulate, iterate_batches

__all__ = [
    "ScoreSums",
    "accumulate",
    "alignment_scores",
    "baseline_fill",
    "blur_baseline",
    "correct",
    "cue_scores",
    "descending_ranks",
    "erasure_scores",
    "evaluate_accuracy",
    "faithfulness",
    "iterate_batches",
    "object_erased_correct",
    "robust",
    "spearman_rows",
    "stability_scores",
    "top_count",
    "top_intersection",
    "upsample_maps",
]

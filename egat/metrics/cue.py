"""Does the model follow the spurious cue? (docs/method.md, Metrics; docs/data.md, the cue.)

Where the data knows each image's cue class (the embedded benchmark's corner patch): accuracy on
the images whose cue shows their own class and on those whose cue points to another class, and
the cue-follow rate, the share of the latter predicted as the cue's class (0 = ignores the cue).
"""

from __future__ import annotations

import torch


def cue_scores(pred: torch.Tensor, labels: torch.Tensor, cue: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image scores from predictions, labels and cue classes (all (B,) int): ``cacc_cue_match``
    (is the prediction right?) on the images whose cue is their label, ``cacc_cue_mismatch`` and
    ``cue_follow`` (is the prediction the cue?) on the others."""
    misleads = cue != labels
    right = pred == labels
    return {"cacc_cue_match": right[~misleads], "cacc_cue_mismatch": right[misleads],
            "cue_follow": (pred == cue)[misleads]}

"""The list of evaluation metrics: what evaluation writes to eval.json and what the report reads.

One entry per metric, in eval.json's summary order (docs/method.md, Metrics): its key, the title
of its report column, whether it is a percentage, which images it is a mean over, and the model
of its test-set error behind the report's confidence intervals (docs/protocol.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Metric:
    """One per-domain metric of eval.json: the mean over ``images`` of a per-image score.

    Attributes:
        name: its key in eval.json's per-domain entries; the summary has ``id_<name>`` and
            ``ood_<name>``, its mean over the in-domain / out-of-domain test domains.
        title: its column title in the report.
        percent: stored x100 (a percentage of images, or Comp/Suff's probability drops); else a
            fraction or a correlation as computed.
        images: which of the domain's test images it is a mean over: ``all`` (``n``), ``costly``
            (the ``n_costly`` images of ``eval.costly_examples``), ``cue_mismatch`` (the
            ``n_cue_mismatch`` images whose cue points to another class) or ``cue_match`` (the
            others).
        error: its test-set standard error: ``binomial`` (a percentage p of N images: p (100 - p)
            / N), ``per_image_sd`` (sd^2 / N from the ``<name>_sd`` that eval.json stores) or
            None (rank scores: no test-set term).
        bounds: the values it can take; the report clips its confidence intervals to them.
    """

    name: str
    title: str
    percent: bool
    images: Literal["all", "costly", "cue_mismatch", "cue_match"]
    error: Literal["binomial", "per_image_sd"] | None
    bounds: tuple[float, float]


PERCENT = (0.0, 100.0)  # a percentage of images
FRACTION = (0.0, 1.0)
DROP = (-100.0, 100.0)  # a mean change of the predicted class's probability, x100
CORRELATION = (-1.0, 1.0)

METRICS: tuple[Metric, ...] = (
    Metric("cacc", "cAcc", True, "all", "binomial", PERCENT),
    Metric("aacc", "aAcc", True, "costly", "binomial", PERCENT),
    Metric("comp", "Comp", True, "costly", "per_image_sd", DROP),
    Metric("suff", "Suff", True, "costly", "per_image_sd", DROP),
    Metric("spearman", "Spearman", False, "costly", None, CORRELATION),
    Metric("top_intersection", "top-k overlap", False, "costly", None, FRACTION),
    Metric("pointing_game", "pointing game", False, "costly", None, FRACTION),
    Metric("mass_in_mask", "mass in mask", False, "costly", None, FRACTION),
    Metric("object_erased_cacc", "cAcc, object erased", True, "all", "binomial", PERCENT),
    Metric("cue_free_cacc", "cue-free cAcc", True, "all", "binomial", PERCENT),
    Metric("cue_follow", "cue-follow rate", True, "cue_mismatch", "binomial", PERCENT),
    Metric("cacc_cue_match", "cAcc, cue matches", True, "cue_match", "binomial", PERCENT),
    Metric("cacc_cue_mismatch", "cAcc, cue misleads", True, "cue_mismatch", "binomial", PERCENT),
)

METRIC_NAMES: tuple[str, ...] = tuple(m.name for m in METRICS)
TITLES: dict[str, str] = {m.name: m.title for m in METRICS}
PERCENT_METRICS: frozenset[str] = frozenset(m.name for m in METRICS if m.percent)
BOUNDS: dict[str, tuple[float, float]] = {m.name: m.bounds for m in METRICS}


def image_count(metric: Metric, domain: dict) -> int | None:
    """How many test images ``metric`` of one eval.json domain entry is a mean over (None or 0
    where it scored none)."""
    n = domain.get("n")
    if metric.images == "costly":
        return domain.get("n_costly") or n
    if metric.images == "cue_mismatch":
        return domain.get("n_cue_mismatch")
    if metric.images == "cue_match":
        mismatched = domain.get("n_cue_mismatch")
        # 0 mismatched images is a real count (every cue matches), not "unknown".
        return None if n is None or mismatched is None else n - mismatched
    return n

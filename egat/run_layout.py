"""Where a run's files live: one place for the run and evaluation folder layout.

``<train.out_dir>/<name>/<domain>/seed<k>/`` holds a training run (best.pt, last.pt, metrics);
``evals/<name>/<domain>/seed<k>/eval.json`` its evaluation. Variants of the studies (and the
oracle ceiling) live one level down, under ``variants/``.
"""

from __future__ import annotations

from pathlib import Path

VARIANTS = "variants"  # sub-folder of runs/ and evals/ holding the studies' variants
EVALS = "evals"
EVAL_FILE = "eval.json"


def cell_dir(root: str | Path, name: str, domain: str, seed: int) -> Path:
    return Path(root) / name / domain / f"seed{seed}"


def eval_path(name: str, domain: str, seed: int, root: str | Path = EVALS) -> Path:
    return cell_dir(root, name, domain, seed) / EVAL_FILE


def evals_root(variant: bool, root: str | Path = EVALS) -> Path:
    """The evaluations of the study methods, or of the variants."""
    return Path(root) / VARIANTS if variant else Path(root)

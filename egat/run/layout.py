"""Where a run's files live: the one place that names the run and evaluation folders and files.

``<train.out_dir>/<name>/<domain>/seed<k>/`` holds a training run (:data:`RUN_FILES`);
``evals/<name>/<domain>/seed<k>/`` its evaluation (:data:`EVAL_FILE`, :data:`ROBUST_FILE`, and
the wall clock per part of each, :data:`EVAL_TIMING` and :data:`ROBUST_TIMING`, kept apart from the
reproducible metrics).
Variants of the studies (and the oracle ceiling) live one level down, under :data:`VARIANTS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from egat.config import Params

# A training run's folder: the training state to resume from, the best checkpoint (the evaluated
# model), the reproducible metrics and the wall-clock figures kept apart from them.
LAST, BEST, METRICS, TIMING = "last.pt", "best.pt", "train_metrics.json", "train_timing.json"
RUN_FILES = (LAST, BEST, METRICS, TIMING)
CHECKPOINT_ARTIFACTS = "checkpoint"  # the MLflow artifact folder a training run logs BEST to

VARIANTS = "variants"  # sub-folder of runs/ and evals/ holding the studies' variants
EVALS = "evals"
EVAL_FILE = "eval.json"
EVAL_TIMING = "eval_timing.json"
ROBUST_FILE = "robust.json"
ROBUST_TIMING = "robust_timing.json"


@dataclass(frozen=True)
class CellFile:
    """One file of a cell folder ``<name>/<domain>/seed<seed>/``."""

    path: Path
    name: str
    domain: str
    seed: int


def cell_dir(root: str | Path, name: str, domain: str, seed: int) -> Path:
    return Path(root) / name / domain / f"seed{seed}"


def default_run_dir(params: Params) -> Path:
    """The run folder of ``egat train`` without ``--run-dir``: ``<train.out_dir>/<train.method>``."""
    return Path(params.train.out_dir) / params.train.method


def run_dir(params: Params, name: str, domain: str, seed: int) -> Path:
    """The training run folder of one cell (``name``: a method, or a variant with its params)."""
    return cell_dir(params.train.out_dir, name, domain, seed)


def eval_path(name: str, domain: str, seed: int, root: str | Path = EVALS) -> Path:
    return cell_dir(root, name, domain, seed) / EVAL_FILE


def robust_path(name: str, domain: str, seed: int, root: str | Path = EVALS) -> Path:
    return cell_dir(root, name, domain, seed) / ROBUST_FILE


def evals_root(variant: bool, root: str | Path = EVALS) -> Path:
    """The evaluations of the study methods, or of the variants."""
    return Path(root) / VARIANTS if variant else Path(root)


def cell_files(root: str | Path, file_name: str) -> list[CellFile]:
    """Every ``<name>/<domain>/seed<seed>/<file_name>`` under ``root``, in path order."""
    found = []
    for path in sorted(Path(root).glob(f"*/*/seed*/{file_name}")):
        match = re.fullmatch(r"seed(\d+)", path.parent.name)
        if match:
            found.append(CellFile(path, path.parents[2].name, path.parents[1].name, int(match[1])))
    return found

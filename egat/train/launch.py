"""One entry point for every training run: the CLI, the DVC train stage and Tune trials.

``train.backend`` chooses how the one Trainer runs:

* ``local``: in this process (one worker; the GPU if ``train.use_gpu`` allows);
* ``ray``: Ray Train's TorchTrainer with ``train.workers`` workers (:mod:`egat.train.ray_train`);
* ``auto``: ``ray`` when ``train.workers > 1`` or RAY_ADDRESS names a cluster, else ``local``
  (a TorchTrainer spends ~20-40 s starting its workers on a 2-core machine, for nothing when
  one local worker would do).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from egat.config import Params
from egat.tracking import Tracker
from egat.train.cluster import check_cluster, ray_address
from egat.train.trainer import Trainer, TrainResult


def choose_backend(
    params: Params, backend: Literal["auto", "local", "ray"] | None = None
) -> Literal["local", "ray"]:
    """``backend`` (else ``train.backend``) with ``auto`` resolved."""
    backend = backend or params.train.backend
    if backend != "auto":
        return backend
    if params.train.workers > 1 or ray_address():
        return "ray"
    return "local"


def preflight(params: Params, backend: Literal["auto", "local", "ray"] | None = None) -> None:
    """Refuse what the chosen backend cannot run (several local workers; a Ray cluster that
    cannot place the workers or reach ``train.storage_path``) before any MLflow run or folder
    exists."""
    if choose_backend(params, backend) == "ray":
        check_cluster(params)
    elif params.train.workers > 1:
        from egat.errors import EgatError

        raise EgatError(
            f"train.backend=local runs one worker, but train.workers={params.train.workers}; "
            "use train.backend=ray (or auto)"
        )


def fit(
    params: Params, run_dir: str | Path | None, tracker: Tracker | None = None, *,
    backend: Literal["auto", "local", "ray"] | None = None, **ray_options: Any,
) -> TrainResult:
    """Train ``params`` into ``run_dir`` on the chosen backend; the same outputs either way
    (best.pt, last.pt, train_metrics.json, train_timing.json) and the same metrics.

    ``ray_options`` go to :func:`egat.train.ray_train.fit_ray` (``name``, ``callbacks``,
    ``objective``, ...); ``backend`` overrides ``train.backend``.
    """
    if choose_backend(params, backend) == "local":
        preflight(params, "local")
        if run_dir is None:
            raise ValueError("the local backend needs a run_dir")
        return Trainer(params, run_dir, tracker=tracker).fit()
    from egat.train.ray_train import fit_ray

    return fit_ray(params, run_dir, tracker, **ray_options)

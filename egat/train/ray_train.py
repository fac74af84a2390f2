"""Ray Train (V2): the one Trainer on N workers, with checkpoints in Ray's storage and recovery.

The driver (:func:`fit_ray`) checks that the cluster can hold the run (:mod:`egat.train.cluster`:
it joins the cluster named by RAY_ADDRESS or starts a private local one) and fits a
``TorchTrainer`` whose workers (:func:`train_worker`) each build the
:class:`~egat.train.trainer.Trainer` with their rank:

* batches: ``train.batch_size`` is the global batch, whatever the number of workers:
  ``StepBatchSampler`` shards it by rank as a pure function of (seed, step, rank, world size) (the
  distributed sampler: no ``set_epoch`` state to carry);
* gradients and BatchNorm statistics are averaged across ranks by the Trainer (gloo on CPU, NCCL
  on GPU). Not DDP/``prepare_model``: EGAT calls ``model.features``/``model.head`` and its attacks
  take input gradients outside DDP's forward, which DDP's reducer does not support;
* every ``train.checkpoint_every`` steps rank 0 reports ``last.pt`` (model, optimiser, RNG
  states, step) and ``best.pt`` as a Ray checkpoint; every rank calls ``ray.train.report`` at
  the same steps (validation and checkpoint steps), and Ray keeps rank 0's metrics, under the
  flat names of :data:`REPORT_NAMES` (Tune's scheduler, objective and trial runs read them);
* a dead worker restarts the worker group from the latest checkpoint (``train.max_failures``),
  and running the same run again (same name and storage path) resumes from it;
* elastic (``train.min_workers``, Ray's ``ScalingConfig(num_workers=(min, max))``): when a lost
  node leaves fewer than ``train.workers`` placeable, the group restarts from that checkpoint on
  as many workers as fit, down to ``min_workers`` (and grows back, from the latest checkpoint
  again, when Ray's resize check, every ``elastic_resize_monitor_interval_s`` = 60 s, its
  default, sees nodes return: a shrink does not wait for it; growing is untested). Kept on
  a resize: the model, optimiser, scheduler, step and the global batch of each step (each worker's
  shard is now ``batch_size / new world size``, so it needs more memory); re-split: free AT's
  per-example perturbation; the RNG state of ranks that still exist (a new rank is seeded
  afresh). Not exact: BatchNorm sees other shards, so the run differs from a fixed-size one;
* rank 0 alone logs to MLflow (:class:`~egat.tracking.run_tracker.RunTracker`) and writes files;
  at the end the driver copies ``best.pt``, ``last.pt`` and the metrics files from the final
  checkpoint into the run folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from egat.build import params_from_dict
from egat.config import Params
from egat.errors import EgatError
from egat.run.layout import BEST, LAST, METRICS, RUN_FILES
from egat.tracking import NullTracker, Tracker
from egat.tracking.run_tracker import RunTracker, run_tracker_of
from egat.train import cluster
from egat.train.trainer import TrainResult

# The metrics reported with a checkpoint: a run resumed after its last validation (a Tune trial
# killed at its end) reports them again, Tune's objective included.
REPORT = "report.json"
# Names of the metrics workers report (to Ray Train, and to Tune through TuneReportCallback).
REPORT_NAMES = {
    "val/acc": "val_cacc", "val/aacc": "val_aacc", "val/comp": "val_comp",
    "val/cue_free_acc": "val_cue_free_cacc", "val/cue_free_aacc": "val_cue_free_aacc",
    "val/cue_mismatch_acc": "val_cue_mismatch_cacc",
    "train/loss": "train_loss", "train/acc": "train_acc", "best_val_acc": "best_val_acc",
}
VAL_REPORTS = tuple(v for k, v in REPORT_NAMES.items() if k.startswith("val/"))


# --------------------------------------------------------------------------------------- workers
def report_metrics(step: int, metrics: Mapping[str, float], objective: str | None) -> dict:
    """The Trainer's metrics under flat names, with ``step`` and the Tune ``objective``."""
    out: dict[str, Any] = {"step": int(step)}
    for key, value in metrics.items():
        out[REPORT_NAMES.get(key, key.replace("/", "_"))] = float(value)
    if objective:
        terms = objective.split("+")
        if all(t in out for t in terms):
            out["objective"] = sum(out[t] for t in terms)
    return out


def _checkpoint_dir(work: Path, names: Sequence[str]) -> Path:
    staging = Path(tempfile.mkdtemp(prefix="egat-ckpt-"))
    for name in names:
        if (work / name).is_file():
            shutil.copy2(work / name, staging / name)
    return staging


def _report(metrics: dict, work: Path | None, names: Sequence[str]) -> None:
    """ray.train.report on every rank; rank 0 (``work`` set) attaches a checkpoint of ``names``."""
    import ray.train

    if work is None:
        ray.train.report(metrics)
        return
    staging = _checkpoint_dir(work, names)
    (staging / REPORT).write_text(json.dumps(metrics))
    try:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def train_worker(config: dict) -> None:
    """The per-worker function of the TorchTrainer: one Trainer with this worker's rank."""
    import ray.train
    import ray.train.torch
    import torch

    from egat import io
    from egat.train.trainer import Trainer, gather_objects

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("cwd") and os.path.isdir(config["cwd"]):
        os.chdir(config["cwd"])  # relative data paths resolve as on the driver
    params = params_from_dict(config["params"], source="ray worker params")
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if not params.train.num_threads and omp.isdigit() and int(omp) > 0:
        # Ray sets OMP_NUM_THREADS to the worker's CPUs; torch may have read the core count
        # before that (oversubscribed workers on shared cores run several times slower).
        torch.set_num_threads(int(omp))
    work = Path(tempfile.mkdtemp(prefix=f"egat-rank{rank}-"))
    last: dict[str, Any] = {}
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as ckpt_dir:
                for name in RUN_FILES:
                    if (Path(ckpt_dir) / name).is_file():
                        shutil.copy2(Path(ckpt_dir) / name, work / name)
                if (Path(ckpt_dir) / REPORT).is_file():
                    last.update(json.loads((Path(ckpt_dir) / REPORT).read_text()))
        # Where every rank runs, from Ray itself (node ranks group workers by IP, so on one
        # machine they are all 0: the node id tells nodes apart).
        placement = gather_objects({
            "rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
            "node_rank": ctx.get_node_rank(), "host": socket.gethostname(), "pid": os.getpid(),
        }, world)
        tracker = (config.get("tracker") if rank == 0 else None) or NullTracker()
        if isinstance(tracker, RunTracker):
            restored = io.torch_load(work / LAST)["state"]["step"] if (work / LAST).is_file() else 0
            tracker.log_attempt(placement, int(restored))
        objective = config.get("objective")
        hook = config.get("on_report")

        def report(step: int, metrics: dict, checkpointed: bool) -> None:
            if hook is not None:
                hook(step, metrics, checkpointed)
            # The node rank 0 trains on reaches Tune with the metrics (its trials' MLflow runs).
            flat = {**report_metrics(step, metrics, objective), "node_id": placement[0]["node_id"]}
            last.update(flat)
            _report(flat, work if checkpointed and rank == 0 else None, (LAST, BEST))

        result = Trainer(params, work, tracker, device, rank, world, on_report=report).fit()
        # The final report: the last validation's metrics (and objective), the run's summary and
        # every output file (a resumed, already finished run reports only the summary).
        final = {**last, **{k: float(v) for k, v in result.metrics.items()}}
        final.update(step=int(result.metrics["steps"]), final=1)  # "done" would end a Tune trial
        _report(final, work if rank == 0 else None, RUN_FILES)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------- driver
def run_name(run_dir: str | Path) -> str:
    """A stable Ray run name for a run folder: its last parts and a digest of the full path."""
    path = Path(run_dir).resolve()
    slug = "-".join(path.parts[-3:])
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", slug)
    return f"{slug}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def worker_user_error(exc: BaseException) -> EgatError | None:
    """The EgatError a worker raised (a bad param or file, running out of GPU memory), unwrapped
    from Ray Train's error, or None when the run failed for another reason.

    A WorkerGroupError maps each failed rank to Ray's wrapper of the worker's exception, which
    keeps the original as ``_base_exc`` (Ray Train's own poller unwraps it the same way).
    """
    for failure in getattr(exc, "worker_failures", {}).values():
        original = getattr(failure, "_base_exc", failure)
        if isinstance(original, EgatError):
            return original
    return None


def fit_ray(
    params: Params, run_dir: str | Path | None, tracker: Tracker | None = None, *,
    name: str | None = None, callbacks: Sequence[Any] = (), objective: str | None = None,
    cwd: str | None = None, storage_checked: bool = False,
    on_report: Callable[[int, dict, bool], None] | None = None,
) -> TrainResult:
    """Train through a Ray Train ``TorchTrainer`` with ``train.workers`` workers (elastic: from
    ``train.min_workers`` up to them, as many as the cluster can place).

    Args:
        run_dir: where best.pt, last.pt and the metrics files are copied at the end; None keeps
            them in Ray's storage only (Tune trials).
        tracker: an MLflow run (``MlflowTracker``) that rank 0 logs its metrics to.
        name: the Ray run name (default: derived from ``run_dir``); the same name and
            ``train.storage_path`` resume the run from its latest checkpoint.
        callbacks: Ray Train callbacks (Tune trials pass ``TuneReportCallback()``).
        objective: a "+"-joined sum of reported metrics reported as ``objective`` (Tune).
        cwd: the folder relative paths of ``params`` resolve from (default: this process's).
        storage_checked: every node's access to the storage was checked already (Tune trials:
            the search checks it once).
        on_report: a test hook: a picklable ``(step, metrics, checkpointed)`` callable that
            every worker calls at each report, before Ray sees it, as the Trainer's
            ``on_report`` (the tests inject worker faults through it: tests/faults.py).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    if run_dir is None and name is None:
        raise ValueError("fit_ray needs a run_dir or a name")
    t = params.train
    cluster.check_cluster(params, storage=not storage_checked)
    cluster.reap_orphan_placement_groups()  # left by runs killed earlier in this Ray session
    use_gpu = cluster.resolve_use_gpu(params)
    per_worker = cluster.worker_resources(use_gpu, t.resources_per_worker)
    name = name or run_name(run_dir)
    storage = cluster.storage_path(params)
    raw = params.model_dump(mode="json")
    raw["train"]["progress"] = False  # workers report through Ray, not a progress bar
    # Workers resume from Ray's own storage (a restart after a dead worker must continue), so
    # train.resume, which concerns the run folder's last.pt, does not apply to them.
    raw["train"]["resume"] = True
    config = {
        "params": raw, "use_gpu": use_gpu, "cwd": cwd or os.getcwd(), "objective": objective,
        "tracker": run_tracker_of(tracker), "on_report": on_report,
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=(t.min_workers, t.workers) if t.elastic else t.workers,
            use_gpu=use_gpu, resources_per_worker=per_worker,
            label_selector=cluster.label_selectors(params),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=list(callbacks) or None,
        ),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        user_error = worker_user_error(exc)
        if user_error is not None:
            raise user_error from None  # the one line the run would give in process
        raise EgatError(f"Ray Train run {name!r} failed: {exc}") from exc
    wall = time.perf_counter() - started
    if result.checkpoint is None:
        raise EgatError(f"Ray Train run {name!r} ended without a checkpoint")
    metrics = {k: result.metrics[k] for k in ("best_val_acc", "best_step", "steps")}
    timing = {k: result.metrics[k] for k in ("train_time_s", "time_per_step_s")}
    for key in ("best_step", "steps"):
        metrics[key] = int(metrics[key])
    timing["ray_wall_s"] = round(wall, 3)
    if run_dir is None:
        where = result.checkpoint.path
        return TrainResult(Path(where), Path(f"{where}/{BEST}"), {**metrics, **timing})
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as ckpt_dir:
        for fname in RUN_FILES:
            if (Path(ckpt_dir) / fname).is_file():
                shutil.copy2(Path(ckpt_dir) / fname, run_dir / fname)
    if (run_dir / METRICS).is_file():
        metrics = json.loads((run_dir / METRICS).read_text())
    return TrainResult(run_dir, run_dir / BEST, {**metrics, **timing})

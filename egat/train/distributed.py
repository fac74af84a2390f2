"""Ray Train (V2): the one Trainer on N workers, with checkpoints in Ray's storage and recovery.

The driver (:func:`fit_ray`) joins the cluster named by RAY_ADDRESS or starts a private local one,
checks that the cluster can hold the run, and fits a ``TorchTrainer`` whose workers
(:func:`train_worker`) each build the :class:`~egat.train.trainer.Trainer` with their rank:

* batches: ``train.batch_size`` is the global batch, whatever the number of workers:
  ``StepBatchSampler`` shards it by rank as a pure function of (seed, step, rank, world size) (the
  distributed sampler: no ``set_epoch`` state to carry);
* gradients and BatchNorm statistics are averaged across ranks by the Trainer (gloo on CPU, NCCL
  on GPU). Not DDP/``prepare_model``: EGAT calls ``model.features``/``model.head`` and its attacks
  take input gradients outside DDP's forward, which DDP's reducer does not support;
* every ``train.checkpoint_every`` steps rank 0 reports ``last.pt`` (model, optimiser, RNG
  states, step) and ``best.pt`` as a Ray checkpoint; every rank calls ``ray.train.report`` at
  the same steps (validation and checkpoint steps), and Ray keeps rank 0's metrics;
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
* rank 0 alone logs to MLflow and writes files; at the end the driver copies ``best.pt``,
  ``last.pt`` and the metrics files from the final checkpoint into the run folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

from egat.build import params_from_dict
from egat.config import Params
from egat.errors import EgatError
from egat.tracking import NullTracker, Tracker
from egat.tracking.mlflow_tracker import retry_locked
from egat.train.trainer import BEST, LAST, METRICS, TIMING, TrainResult

log = logging.getLogger(__name__)
# Train V2 (the default since Ray 2.5x; opt-in before). Set before ray.train is imported.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

RUN_FILES = (LAST, BEST, METRICS, TIMING)
# The metrics reported with a checkpoint: a run resumed after its last validation (a Tune trial
# killed at its end) reports them again, Tune's objective included.
REPORT = "report.json"
RESTORED = "ray/restored_step"  # MLflow metric: the step each start of the worker group resumed at
WORLD = "ray/world_size"  # MLflow metric: its number of workers (elastic runs shrink and grow)
CONNECT_TIMEOUT_S = 5.0
# Names of the metrics workers report (to Ray Train, and to Tune through TuneReportCallback).
REPORT_NAMES = {
    "val/acc": "val_cacc", "val/aacc": "val_aacc", "val/comp": "val_comp",
    "val/cue_free_acc": "val_cue_free_cacc",
    "train/loss": "train_loss", "train/acc": "train_acc", "best_val_acc": "best_val_acc",
}


# --------------------------------------------------------------------------------------- cluster
def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds when RAY_ADDRESS names a host:port that does not answer."""
    if address in ("auto", "local"):
        return
    parts = urllib.parse.urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise EgatError(f"RAY_ADDRESS={address!r} is not host:port ({exc})") from None
    if not host or not port:
        raise EgatError(f"RAY_ADDRESS={address!r}: expected host:port, ray://host:port or 'auto'")
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            reply = _http2_reply(sock)
    except OSError as exc:
        raise EgatError(
            f"RAY_ADDRESS={address} is unreachable ({exc}); start the cluster (`ray start --head`) "
            "or unset RAY_ADDRESS to train on a private local Ray cluster"
        ) from None
    if len(reply) < 9 or reply[3] != H2_SETTINGS:
        seen = f"it answered {reply[:40]!r}" if reply else "it sent nothing back"
        raise EgatError(
            f"RAY_ADDRESS={address} is not a Ray cluster ({seen}, not gRPC): give the head "
            "node's GCS address that `ray start --head` prints (host:6379 by default) or "
            "ray://host:10001, not the dashboard's port or another server's"
        )


# Ray's GCS (host:port) and its client server (ray://) speak gRPC, i.e. HTTP/2: they answer the
# client's connection preface with a SETTINGS frame (RFC 9113, section 3.4). Anything else
# listening there (the dashboard on 8265, an MLflow server) would keep ray.init retrying for
# minutes.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
H2_SETTINGS = 0x04


def _http2_reply(sock: socket.socket) -> bytes:
    """The first 9 bytes (a frame header) a server sends back to the HTTP/2 preface."""
    sock.sendall(H2_PREFACE)
    reply = b""
    try:
        while len(reply) < 9:
            chunk = sock.recv(9 - len(reply))
            if not chunk:
                break
            reply += chunk
    except OSError:  # a timeout or a reset: no HTTP/2 server
        pass
    return reply


def local_capacity(per_worker: Mapping[str, float]) -> int:
    """How many workers the private local cluster would hold (its CPUs and visible GPUs)."""
    import torch

    have = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    return min(
        (math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in per_worker.items() if v > 0),
        default=0,
    )


def connect(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS, else start a private local one (no-op when
    connected already)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "").strip()
    started = time.perf_counter()
    if address:
        check_address(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            raise EgatError(
                f"could not join the Ray cluster at RAY_ADDRESS={address}: {exc}"
            ) from None
    else:
        ray.init(
            address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env={"worker_process_setup_hook": "egat.ray_setup.quiet_state_api"},
        )
    log.info("ray ready in %.1f s: %s", time.perf_counter() - started, ray.cluster_resources())


def reap_orphan_placement_groups() -> int:
    """Remove the placement groups whose creating actor has died; returns how many.

    A Ray Train controller killed with its Tune trial (ASHA stopping it) leaves its workers'
    placement group behind: the group belongs to the job, and Ray Train's PlacementGroupCleaner
    needs the State API, which a cluster without the dashboard (this private one) lacks. The
    leaked CPUs would starve every later trial. Groups made by a driver (Tune's own) or detached
    ones are never touched. Best effort: it reads the GCS table through Ray's private accessor.
    """
    import ray

    try:
        from ray._private.state import state
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        table = gcs_pb2.PlacementGroupTableData
        live = {table.PENDING, table.CREATED, table.RESCHEDULING}
        nil = ray.ActorID.nil().binary()
        removed = 0
        for raw in state._connect_and_get_accessor().get_placement_group_table():
            pg = table.FromString(raw)
            if (pg.state in live and pg.creator_actor_dead and not pg.is_detached
                    and pg.creator_actor_id and pg.creator_actor_id != nil):
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
                removed += 1
        if removed:
            log.info("removed %d placement group(s) of dead Ray Train controllers", removed)
        return removed
    except Exception as exc:  # a private API: never let it break a run
        log.debug("could not reap placement groups: %s", exc)
        return 0


def resolve_use_gpu(params: Params) -> bool:
    """``train.use_gpu``: auto = GPUs when the cluster (before it starts: this machine) has any."""
    import ray

    if ray.is_initialized():
        gpus = ray.cluster_resources().get("GPU", 0)
    else:
        gpus = local_capacity({"GPU": 1})
    want = params.train.use_gpu
    if want == "true" and gpus < 1:
        raise EgatError("train.use_gpu=true but the Ray cluster has no GPU; use 'auto' or 'false'")
    return want == "true" or (want == "auto" and gpus >= 1)


def worker_resources(use_gpu: bool, resources: Mapping[str, float] | None) -> dict[str, float]:
    """What each worker asks Ray for (Ray's defaults: 1 CPU, or 1 GPU with use_gpu)."""
    res = {k: float(v) for k, v in (resources or {}).items() if v}
    if not res:
        res = {"GPU": 1.0} if use_gpu else {"CPU": 1.0}
    if use_gpu:
        res.setdefault("GPU", 1.0)
    return res


def cluster_capacity(per_worker: Mapping[str, float]) -> int:
    """How many workers of ``per_worker`` resources the cluster holds (each on one node)."""
    import ray

    if not ray.is_initialized():
        return local_capacity(per_worker)
    fits = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        fits += min(
            (math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in per_worker.items() if v > 0),
            default=0,
        )
    return fits


def label_selectors(params: Params) -> list[dict[str, str]] | None:
    """``train.label_selector`` as one selector per rank (None: any node for every worker)."""
    sel = params.train.label_selector
    if not sel:
        return None
    return [dict(s) for s in sel] if isinstance(sel, list) else [dict(sel)] * params.train.workers


def unplaceable(
    selectors: Sequence[Mapping[str, str]], per_worker: Mapping[str, float]
) -> int | None:
    """The rank of a worker the cluster's alive nodes cannot hold (a node whose labels match
    its selector and has ``per_worker`` resources left), or None when all fit. Greedy, most
    constrained rank first: exact for the few distinct selectors a run has."""
    import ray

    slots = {}
    for node in ray.nodes():
        if node.get("Alive"):
            have = node.get("Resources", {})
            slots[node["NodeID"]] = (node.get("Labels", {}), min(
                (math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in per_worker.items() if v > 0),
                default=0,
            ))
    left = {n: count for n, (_, count) in slots.items()}

    def matching(sel: Mapping[str, str]) -> list[str]:
        return [n for n, (labels, _) in slots.items()
                if all(labels.get(k) == v for k, v in sel.items())]

    for rank in sorted(range(len(selectors)), key=lambda r: len(matching(selectors[r]))):
        free = [n for n in matching(selectors[rank]) if left[n] > 0]
        if not free:
            return rank
        left[max(free, key=left.get)] -= 1
    return None


def check_resources(
    workers: int, per_worker: Mapping[str, float], what: str = "train.workers",
    selectors: Sequence[Mapping[str, str]] | None = None,
) -> None:
    """A clear error, before anything starts, when the cluster cannot hold ``workers`` workers
    (before Ray starts, for the private local cluster it would start), or cannot put each rank
    on a node with its ``selectors``' labels."""
    import ray

    if selectors:
        if not ray.is_initialized():
            raise EgatError(
                f"train.label_selector={list(selectors)} places workers by node labels, and the "
                "private local Ray cluster's node has none: join a cluster whose nodes carry "
                "them (RAY_ADDRESS, `ray start --labels`) or set train.label_selector={}"
            )
        rank = unplaceable(selectors, per_worker)
        if rank is not None:
            nodes = [n.get("Labels", {}) for n in ray.nodes() if n.get("Alive")]
            nodes = [{k: v for k, v in labels.items() if not k.startswith("ray.io/")}
                     for labels in nodes]
            raise EgatError(
                f"{what}={workers} workers x {dict(per_worker)} cannot be placed by "
                f"train.label_selector: rank {rank} needs a node labelled {selectors[rank]} "
                f"with those resources free of the other ranks; the alive nodes carry {nodes}. "
                "Add such a node or change train.label_selector"
            )
    capacity = cluster_capacity(per_worker)
    if workers > capacity:
        if ray.is_initialized():
            total = ray.cluster_resources()
        else:
            total = {"CPU": float(os.cpu_count() or 1), "GPU": float(local_capacity({"GPU": 1}))}
        have = {k: total.get(k, 0.0) for k in per_worker}
        raise EgatError(
            f"{what}={workers} workers x {dict(per_worker)} do not fit the Ray cluster, which "
            f"holds {capacity} such worker(s) (it has {have}); lower {what}, "
            "train.resources_per_worker or train.use_gpu, or add nodes"
        )


def _probe_node(storage: str, probe_dir: str, token: str) -> str:
    """On one node: "" when it reads the token the driver wrote under ``probe_dir`` and writes a
    file of its own there, else what went wrong."""
    import pyarrow.fs
    import ray

    fs, _ = pyarrow.fs.FileSystem.from_uri(storage)
    try:
        with fs.open_input_stream(f"{probe_dir}/driver") as f:
            seen = f.read().decode()
    except OSError as exc:  # pyarrow's FileNotFoundError is an OSError too
        return f"cannot read what the driver wrote there ({exc}): the folder is not shared"
    if seen != token:
        return "sees another file there than the driver wrote: the folder is not shared"
    try:
        with fs.open_output_stream(f"{probe_dir}/{ray.get_runtime_context().get_node_id()}") as f:
            f.write(token.encode())
    except OSError as exc:
        return f"cannot write there ({exc})"
    return ""


_STORAGE_CHECKED: set[tuple[str, tuple[str, ...]]] = set()


def check_storage(storage: str, timeout: float = 120.0) -> None:
    """Fail unless every alive node of the cluster reads what this machine (the driver) writes
    to ``storage`` and can write there itself: Ray Train's workers upload checkpoints from, and
    restore them onto, whatever node they run on (a local folder of the head is not enough).
    One zero-CPU task per node; each (storage, set of nodes) is checked once per process."""
    import pyarrow.fs
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
    key = (storage, tuple(sorted(nodes)))
    if key in _STORAGE_CHECKED:
        return
    hint = ("Ray Train's workers write and restore checkpoints there from their own node: use "
            "a disk mounted at the same path on every node (NFS) or s3://..., gs://...")
    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    probe = f"{root.rstrip('/')}/.egat-probe-{uuid.uuid4().hex}"
    token = uuid.uuid4().hex
    try:
        fs.create_dir(probe)
        with fs.open_output_stream(f"{probe}/driver") as f:
            f.write(token.encode())
    except OSError as exc:
        raise EgatError(f"train.storage_path={storage}: this machine cannot write there "
                        f"({exc}); {hint}") from None
    try:
        task = ray.remote(num_cpus=0, max_retries=0)(_probe_node)
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                .remote(storage, probe, token) for n in nodes]
        try:
            answers = ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise EgatError(
                f"train.storage_path={storage}: not every node of the Ray cluster answered a "
                f"storage check within {timeout:.0f} s (are they overloaded?)"
            ) from None
        for (node_id, node), why in zip(nodes.items(), answers):
            if why:
                raise EgatError(
                    f"train.storage_path={storage}: node {node_id[:12]} "
                    f"({node.get('NodeManagerAddress')}) of the Ray cluster {why}; {hint}"
                )
    finally:
        try:
            fs.delete_dir(probe)
        except OSError:
            pass
    _STORAGE_CHECKED.add(key)


def check_cluster(params: Params, storage: bool = True) -> None:
    """Everything a Ray run needs from the cluster, checked within seconds and before anything
    is started or logged: RAY_ADDRESS answers as a Ray cluster, the workers fit its nodes (and
    their labels), and on a joined cluster every node can use ``train.storage_path``."""
    t = params.train
    # An elastic run starts on as many workers as fit, from min_workers up: those must fit.
    need, what = (t.min_workers, "train.min_workers") if t.elastic else (t.workers, "train.workers")
    selectors = label_selectors(params)
    selectors = selectors[:need] if selectors else None
    joined = bool(os.environ.get("RAY_ADDRESS", "").strip())
    if not joined:
        # The private local cluster: refuse what it cannot hold before spending seconds on it.
        local = worker_resources(resolve_use_gpu(params), t.resources_per_worker)
        check_resources(need, local, what, selectors=selectors)
    connect()
    per_worker = worker_resources(resolve_use_gpu(params), t.resources_per_worker)
    check_resources(need, per_worker, what, selectors=selectors)
    if t.elastic and cluster_capacity(per_worker) < t.workers:
        log.warning("train.workers=%d do not fit the Ray cluster now: the elastic run starts on "
                    "fewer (train.min_workers=%d)", t.workers, t.min_workers)
    if joined and storage:
        check_storage(storage_path(params))


def storage_path(params: Params) -> str:
    """Ray's storage for run state and checkpoints: absolute (local), or a URI (s3://, gs://)."""
    path = params.train.storage_path
    if path and "://" in path:
        return path
    return str(Path(path or Path(params.train.out_dir) / "_ray").resolve())


def run_name(run_dir: str | Path) -> str:
    """A stable Ray run name for a run folder: its last parts and a digest of the full path."""
    path = Path(run_dir).resolve()
    slug = "-".join(path.parts[-3:])
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", slug)
    return f"{slug}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------------------------------- MLflow
class RunTracker(Tracker):
    """Logs to an existing MLflow run by id (picklable: rank 0 of a Ray run logs through it)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._client = None

    def __getstate__(self):
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "_client": None}

    @property
    def client(self):
        if self._client is None:
            import mlflow

            self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        retry_locked(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_attempt(self, placement: Sequence[Mapping[str, Any]], restored_step: int) -> None:
        """One start of the worker group: ``ray/restored_step`` (0 = a fresh start; a restart
        after a lost worker or node shows as a second point) and ``ray/world_size`` at that step,
        the tags ``ray.attempts`` and ``ray.placement`` (rank@node of the latest attempt) and
        ``ray/attempt_<n>.json`` with its world size and every rank's node, so a restart, a
        resize and where each attempt ran stay in the run."""
        history = retry_locked(lambda: self.client.get_metric_history(self.run_id, RESTORED))
        attempt = len(history) + 1
        self.log_metrics({RESTORED: restored_step, WORLD: len(placement)}, restored_step)
        where = " ".join(f"rank{p['rank']}@{p['node_id'][:12]}" for p in placement)
        for key, value in (("ray.attempts", str(attempt)), ("ray.placement", where)):
            retry_locked(lambda: self.client.set_tag(self.run_id, key, value))
        record = {"attempt": attempt, "restored_step": restored_step,
                  "world_size": len(placement), "ranks": list(placement)}
        retry_locked(lambda: self.client.log_text(
            self.run_id, json.dumps(record, indent=1), f"ray/attempt_{attempt}.json"))


def worker_tracker(tracker: Tracker | None) -> Tracker | None:
    """The tracker rank 0 logs through: a RunTracker for an MLflow run, else none."""
    run_id = getattr(tracker, "run_id", None)
    if not run_id:
        return None
    from egat.tracking.mlflow_tracker import tracking_uri

    return RunTracker(tracking_uri(), run_id)


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


def _inject_fault(fault: Mapping[str, Any] | None, step: int, rank: int) -> None:
    """Testing aid: at ``fault['step']`` the worker of rank ``fault['rank']`` (or, with
    ``fault['node_labels']``, the worker on a node with those labels), once (a marker file
    records what it did, and on which Ray node), does ``fault['action']``: ``kill`` (default)
    SIGKILLs itself; ``hang`` blocks until the test takes its node away; ``oom`` raises torch's
    out-of-memory error, as a GPU does for a too large batch."""
    if not fault or step != fault["step"]:
        return
    import ray
    import torch

    if fault.get("node_labels"):
        labels = ray.get_runtime_context().get_node_labels()
        if any(labels.get(k) not in (v, [v]) for k, v in fault["node_labels"].items()):
            return
    elif rank != fault.get("rank", 0):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return

    action = fault.get("action", "kill")
    node = ray.get_runtime_context().get_node_id()
    marker.write_text(f"{action} pid {os.getpid()} rank {rank} at step {step} node {node}\n")
    if action == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB (injected)")
    while action == "hang":
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)


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
        fault = config.get("fault")

        def on_report(step: int, metrics: dict, checkpointed: bool) -> None:
            _inject_fault(fault, step, rank)
            # The node rank 0 trains on reaches Tune with the metrics (its trials' MLflow runs).
            flat = {**report_metrics(step, metrics, objective), "node_id": placement[0]["node_id"]}
            last.update(flat)
            _report(flat, work if checkpointed and rank == 0 else None, (LAST, BEST))

        result = Trainer(params, work, tracker, device, rank, world, on_report=on_report).fit()
        # The final report: the last validation's metrics (and objective), the run's summary and
        # every output file (a resumed, already finished run reports only the summary).
        final = {**last, **{k: float(v) for k, v in result.metrics.items()}}
        final.update(step=int(result.metrics["steps"]), final=1)  # "done" would end a Tune trial
        _report(final, work if rank == 0 else None, RUN_FILES)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------- driver
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
    cwd: str | None = None, fault: Mapping[str, Any] | None = None, storage_checked: bool = False,
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
        fault: testing aid, see :func:`_inject_fault`.
        storage_checked: every node's access to the storage was checked already (Tune trials:
            the search checks it once).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    if run_dir is None and name is None:
        raise ValueError("fit_ray needs a run_dir or a name")
    t = params.train
    check_cluster(params, storage=not storage_checked)
    reap_orphan_placement_groups()  # left by runs killed earlier in this Ray session
    use_gpu = resolve_use_gpu(params)
    per_worker = worker_resources(use_gpu, t.resources_per_worker)
    name = name or run_name(run_dir)
    storage = storage_path(params)
    raw = params.model_dump(mode="json")
    raw["train"]["progress"] = False  # workers report through Ray, not a progress bar
    # Workers resume from Ray's own storage (a restart after a dead worker must continue), so
    # train.resume, which concerns the run folder's last.pt, does not apply to them.
    raw["train"]["resume"] = True
    config = {
        "params": raw, "use_gpu": use_gpu, "cwd": cwd or os.getcwd(), "objective": objective,
        "tracker": worker_tracker(tracker), "fault": dict(fault) if fault else None,
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=(t.min_workers, t.workers) if t.elastic else t.workers,
            use_gpu=use_gpu, resources_per_worker=per_worker,
            label_selector=label_selectors(params),
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

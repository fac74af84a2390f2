"""The Ray cluster a run trains on: which one (RAY_ADDRESS, read here only), joining or starting it,
what it can hold, and whether every node can use the run's storage (docs/architecture.md).

Everything a run or a search needs from the cluster is checked within seconds, before anything
is started or logged: an unreachable address or a port that is not a Ray cluster, more workers
(or GPUs, or labelled nodes) than it has, a ``train.storage_path`` some node cannot read or
write. Its interface: :func:`ray_address`, :func:`connect`, :func:`check_cluster`,
:func:`runs_that_fit`, :func:`resolve_use_gpu`, :func:`worker_resources`,
:func:`label_selectors`, :func:`storage_path` and :func:`reap_orphan_placement_groups`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Mapping, Sequence

from egat.config import Params
from egat.errors import EgatError
from egat.run.device import choose_gpu

log = logging.getLogger(__name__)
# Train V2 (the default since Ray 2.5x; opt-in before). Set before ray.train is imported, and
# before connect() starts a private cluster, whose processes inherit it.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

CONNECT_TIMEOUT_S = 5.0


def ray_address() -> str:
    """RAY_ADDRESS, the cluster to join; "" when unset: runs start a private local cluster."""
    return os.environ.get("RAY_ADDRESS", "").strip()


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


def connect(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS, else start a private local one (no-op when
    connected already)."""
    import ray

    if ray.is_initialized():
        return
    address = ray_address()
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
    ones are never touched. Best effort.
    """
    import ray

    try:
        # Private: only the GCS table says whether a group's creator has died (the public
        # placement_group_table() omits it; the State API needs the dashboard).
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


# ---------------------------------------------------------------------------------- capacity
def _fits(have: Mapping[str, float], per_worker: Mapping[str, float]) -> int:
    """How many workers of ``per_worker`` resources ``have`` holds."""
    return min(
        (math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in per_worker.items() if v > 0),
        default=0,
    )


def _local_capacity(per_worker: Mapping[str, float]) -> int:
    """How many workers the private local cluster would hold (its CPUs and visible GPUs)."""
    import torch

    return _fits({"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())},
                 per_worker)


def resolve_use_gpu(params: Params) -> bool:
    """``train.use_gpu``: auto = GPUs when the cluster (before it starts: this machine) has any."""
    import ray

    if ray.is_initialized():
        gpus = ray.cluster_resources().get("GPU", 0)
    else:
        gpus = _local_capacity({"GPU": 1})
    return choose_gpu(params.train.use_gpu, gpus, "the Ray cluster has no GPU")


def worker_resources(use_gpu: bool, resources: Mapping[str, float] | None) -> dict[str, float]:
    """What each worker asks Ray for (Ray's defaults: 1 CPU, or 1 GPU with use_gpu)."""
    res = {k: float(v) for k, v in (resources or {}).items() if v}
    if not res:
        res = {"GPU": 1.0} if use_gpu else {"CPU": 1.0}
    if use_gpu:
        res.setdefault("GPU", 1.0)
    return res


def _cluster_capacity(per_worker: Mapping[str, float]) -> int:
    """How many workers of ``per_worker`` resources the cluster holds (each on one node)."""
    import ray

    if not ray.is_initialized():
        return _local_capacity(per_worker)
    return sum(_fits(node.get("Resources", {}), per_worker)
               for node in ray.nodes() if node.get("Alive"))


def label_selectors(params: Params) -> list[dict[str, str]] | None:
    """``train.label_selector`` as one selector per rank (None: any node for every worker)."""
    sel = params.train.label_selector
    if not sel:
        return None
    return [dict(s) for s in sel] if isinstance(sel, list) else [dict(sel)] * params.train.workers


def _unplaceable(
    selectors: Sequence[Mapping[str, str]], per_worker: Mapping[str, float]
) -> int | None:
    """The rank of a worker the cluster's alive nodes cannot hold (a node whose labels match
    its selector and has ``per_worker`` resources left), or None when all fit. Greedy, most
    constrained rank first: exact for the few distinct selectors a run has."""
    import ray

    slots = {}
    for node in ray.nodes():
        if node.get("Alive"):
            slots[node["NodeID"]] = (node.get("Labels", {}),
                                     _fits(node.get("Resources", {}), per_worker))
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


def _check_resources(
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
        rank = _unplaceable(selectors, per_worker)
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
    capacity = _cluster_capacity(per_worker)
    if workers > capacity:
        if ray.is_initialized():
            total = ray.cluster_resources()
        else:
            total = {"CPU": float(os.cpu_count() or 1), "GPU": float(_local_capacity({"GPU": 1}))}
        have = {k: total.get(k, 0.0) for k in per_worker}
        raise EgatError(
            f"{what}={workers} workers x {dict(per_worker)} do not fit the Ray cluster, which "
            f"holds {capacity} such worker(s) (it has {have}); lower {what}, "
            "train.resources_per_worker or train.use_gpu, or add nodes"
        )


def runs_that_fit(params: Params, what: str, driver_cpus: float = 0.0) -> int:
    """How many runs of ``params`` (``train.workers`` workers each, and ``driver_cpus`` CPUs for
    each run's driver) the cluster holds at once (before Ray starts: this machine); an error
    naming ``what`` when not even one run's workers fit."""
    per_worker = worker_resources(resolve_use_gpu(params), params.train.resources_per_worker)
    _check_resources(params.train.workers, per_worker, what=what)
    fits = _cluster_capacity(per_worker) // params.train.workers
    if driver_cpus:
        import ray

        total = (ray.cluster_resources() if ray.is_initialized() else {}).get("CPU", os.cpu_count())
        per_run = per_worker.get("CPU", 0.0) * params.train.workers + driver_cpus
        fits = min(fits, int(total // per_run))
    return fits


# ----------------------------------------------------------------------------------- storage
def storage_path(params: Params) -> str:
    """Ray's storage for run state and checkpoints: absolute (local), or a URI (s3://, gs://)."""
    path = params.train.storage_path
    if path and "://" in path:
        return path
    return str(Path(path or Path(params.train.out_dir) / "_ray").resolve())


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


def _check_storage(storage: str, timeout: float = 120.0) -> None:
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
    joined = bool(ray_address())
    if not joined:
        # The private local cluster: refuse what it cannot hold before spending seconds on it.
        local = worker_resources(resolve_use_gpu(params), t.resources_per_worker)
        _check_resources(need, local, what, selectors=selectors)
    connect()
    per_worker = worker_resources(resolve_use_gpu(params), t.resources_per_worker)
    _check_resources(need, per_worker, what, selectors=selectors)
    if t.elastic and _cluster_capacity(per_worker) < t.workers:
        log.warning("train.workers=%d do not fit the Ray cluster now: the elastic run starts on "
                    "fewer (train.min_workers=%d)", t.workers, t.min_workers)
    if joined and storage:
        _check_storage(storage_path(params))

"""Ray Train and Tune on a simulated two-node Ray cluster (issue 17).

One cluster per module, with Ray's own multi-node test harness (``ray.cluster_utils.Cluster``):
a head node and a "spot" node of 1 CPU each, on 127.0.0.1, labelled ``egat-node=head`` and
``egat-node=spot``; RAY_ADDRESS names it, as it would a real cluster. An ``mlflow server`` on
127.0.0.1 is the tracking store (an sqlite file cannot be shared by machines). The data and Ray's
run storage live in one folder that both nodes read and write (standing in for NFS or S3).
Placement is asserted from what each worker reads from Ray (its node id).

The training runs use free adversarial training, whose perturbation differs by rank, so that a
resumed run ends like an uninterrupted one only when each rank gets its own state back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from egat.build import params_from_dict
from egat.config import Params
from egat.errors import EgatError
from tests.faults import WorkerFault
from tests.helpers import (
    last_model, prepared, ray_test_env, tracked_fit, train_ranks, wait_for_server,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NODE = "egat-node"  # the node label the runs place their ranks by
STEPS = 8
EXACT = {"rtol": 1e-4, "atol": 1e-5}  # the tolerance of tests/test_ray.py's recovery test


def tiny_raw(root: Path) -> dict:
    """EGAT with free AT on 20 images per class, rank 0 on the head and rank 1 on the spot node."""
    shared = root / "shared"
    return {
        "data": {"dir": str(shared / "data"), "embedded": {"per_class": 20}},
        "model": {"name": "small_resnet"},
        "attack": {"name": "free", "replays": 2},
        "eval": {"batch_size": 32},
        "train": {
            "method": "egat", "steps": STEPS, "batch_size": 16, "eval_every": 2,
            "checkpoint_every": 4, "val_batches": 1, "progress": False, "num_threads": 1,
            "out_dir": str(root / "runs"), "storage_path": str(shared / "ray"), "workers": 2,
            "backend": "ray", "label_selector": [{NODE: "head"}, {NODE: "spot"}],
        },
    }


def with_train(params: Params, **train) -> Params:
    raw = params.model_dump(mode="json")
    raw["train"].update(train)
    return params_from_dict(raw)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with ray_test_env(tmp_path_factory.mktemp("cluster")) as root:
        yield root


@pytest.fixture(scope="module")
def tracking(env):
    """An mlflow server on 127.0.0.1 (its own sqlite file and artifact folder) as the store."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{env / 'server.db'}",
         "--artifacts-destination", str(env / "artifacts")],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(uri, 120)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers, nothing else
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(env):
    """The two-node cluster; every process of it is gone after the module."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # a private local session of an earlier module
    sim = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "labels": {NODE: "head"}, "include_dashboard": False,
        # A dead node is declared dead after ~3 s instead of Ray's default ~30 s.
        "_system_config": {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                           "health_check_failure_threshold": 3},
    })
    try:
        sim.add_node(num_cpus=1, labels={NODE: "spot"})
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_ADDRESS", sim.address)
            yield sim
    finally:
        ray.shutdown()
        nodes = [sim.head_node, *sim.worker_nodes]  # removed nodes were checked on removal
        sim.shutdown()
        assert not [n for n in nodes if n.any_processes_alive()], "leaked Ray processes"


@pytest.fixture(scope="module")
def tiny(env) -> Params:
    return prepared(tiny_raw(env))


def node_ids(sim) -> dict[str, str]:
    """Node label -> node id of the cluster's alive nodes, as Ray lists them."""
    import ray

    return {n["Labels"][NODE]: n["NodeID"] for n in ray.nodes() if n["Alive"]}


def attempts(run_id: str) -> list[dict]:
    """The ray/attempt_<n>.json records rank 0 logged to the MLflow run, in order."""
    import mlflow

    client = mlflow.MlflowClient()
    records, n = [], 1
    names = {a.path for a in client.list_artifacts(run_id, "ray")}
    while f"ray/attempt_{n}.json" in names:
        records.append(json.loads(mlflow.artifacts.load_text(
            f"{client.get_run(run_id).info.artifact_uri}/ray/attempt_{n}.json")))
        n += 1
    return records


def checkpoint_registered(storage: Path, run: str) -> bool:
    """Whether Ray's checkpoint manager of ``run`` has recorded a checkpoint in its snapshot (a
    file Ray rewrites in place, so a read may catch it half-written)."""
    for snapshot in storage.glob(f"*{run}*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except (OSError, json.JSONDecodeError):
            pass
    return False


@pytest.fixture(scope="module")
def reference(tiny, env):
    """The same 2-worker run on one machine without Ray: two gloo processes."""
    train_ranks(tiny, env / "reference")
    return env / "reference"


@pytest.fixture(scope="module")
def two_nodes(tiny, env, cluster, tracking):
    return tracked_fit(tiny, env / "runs" / "two-nodes")


def train_losing_a_node(params: Params, run_dir: Path, cluster, fault: WorkerFault,
                        replace: bool) -> tuple:
    """``params`` trains in a thread while the worker that ``fault`` makes hang (after the step-4
    checkpoint) has its node SIGKILLed, as a spot instance reclaimed without notice; with
    ``replace`` a replacement spot node joins. Returns (result, MLflow run id, what was seen)."""
    marker = Path(fault.marker)
    out: dict = {}

    def train() -> None:
        try:
            out["run"] = tracked_fit(params, run_dir, on_report=fault)
        except BaseException as exc:  # re-raised below
            out["error"] = exc

    started = time.monotonic()
    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    while not marker.exists() and trainer.is_alive():
        assert time.monotonic() - started < 900, f"no worker reached step {fault.step}"
        time.sleep(0.2)
    assert "error" not in out, out.get("error")
    # Ray Train V2 registers a reported checkpoint when its controller next polls the workers, not
    # when train.report returns: a node lost before then also loses the step-4 checkpoint (CI saw
    # the run restart from step 0). The spot node goes once the controller has recorded it.
    while not checkpoint_registered(Path(params.train.storage_path), run_dir.name):
        assert time.monotonic() - started < 900, "the step-4 checkpoint was never registered"
        time.sleep(0.2)
    seen = {"marker": marker.read_text()}
    seen["lost"] = seen["marker"].split("node ")[-1].strip()
    (node,) = [n for n in cluster.worker_nodes if n.node_id == seen["lost"]]
    cluster.remove_node(node, allow_graceful=False)  # SIGKILL of all its processes
    seen["removed_s"] = time.monotonic() - started
    if replace:
        seen["joined"] = cluster.add_node(num_cpus=1, labels={NODE: "spot"}).node_id
    trainer.join(timeout=900)
    assert not trainer.is_alive(), "the run did not finish"
    if "error" in out:
        raise out["error"]
    seen["wall_s"] = time.monotonic() - started
    result, run_id = out["run"]
    return result, run_id, seen


@pytest.fixture(scope="module")
def node_loss(tiny, env, cluster, tracking, two_nodes):
    """Rank 1 hangs at step 6 (after the step-4 checkpoint); its node is then SIGKILLed, as a spot
    instance reclaimed without notice, and a replacement spot node joins."""
    fault = WorkerFault(step=6, rank=1, marker=env / "hang.marker", action="hang")
    return train_losing_a_node(with_train(tiny, max_failures=1), env / "runs" / "lost", cluster,
                               fault, replace=True)


def test_two_workers_on_two_nodes_train_like_two_workers_on_one_machine(
        two_nodes, reference, cluster, tiny):
    import mlflow

    result, run_id = two_nodes
    ids = node_ids(cluster)
    (attempt,) = attempts(run_id)
    where = {r["rank"]: r["node_id"] for r in attempt["ranks"]}
    assert where == {0: ids["head"], 1: ids["spot"]}  # Ray's own placement, read by each worker
    assert attempt["restored_step"] == 0
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ray.attempts"] == "1"
    assert result.metrics["steps"] == STEPS
    want = json.loads((reference / "train_metrics.json").read_text())
    assert {k: result.metrics[k] for k in want} == want
    a, b = last_model(reference), last_model(result.run_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], **EXACT, msg=name)
    # Checkpoints went to the shared storage, where any node restores them from.
    storage = Path(tiny.train.storage_path)
    assert list(storage.glob("*two-nodes*/checkpoint_*/last.pt"))


def test_a_lost_node_is_replaced_and_the_run_resumes_from_its_last_checkpoint(
        node_loss, two_nodes, cluster):
    import mlflow

    (result, run_id, seen), (uninterrupted, _) = node_loss, two_nodes
    assert "hang" in seen["marker"] and "rank 1 at step 6" in seen["marker"]
    first, second = attempts(run_id)
    head = node_ids(cluster)["head"]
    assert [r["node_id"] for r in first["ranks"]] == [head, seen["lost"]]
    assert [r["node_id"] for r in second["ranks"]] == [head, seen["joined"]]
    assert seen["joined"] != seen["lost"]
    # Resumed from the step-4 checkpoint: nothing of steps 5-6 (or of the lost node) is kept.
    assert second["restored_step"] == 4
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run_id, "ray/restored_step")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.0), (4, 4.0)]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ray.attempts"] == "2"
    keys = ("best_val_acc", "best_step", "steps")
    assert {k: result.metrics[k] for k in keys} == {k: uninterrupted.metrics[k] for k in keys}
    a, b = last_model(uninterrupted.run_dir), last_model(result.run_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], **EXACT, msg=name)
    print(f"node loss: run {seen['wall_s']:.0f} s in all, lost node {seen['lost'][:12]}, "
          f"replacement {seen['joined'][:12]}")


def test_tune_trials_on_both_nodes_log_to_the_mlflow_server(tiny, cluster, tracking, env):
    import mlflow

    from egat.tune import run_search

    raw = tiny.model_dump(mode="json")
    raw["train"].update(workers=1, label_selector={}, storage_path=str(env / "shared" / "tune"))
    raw["tune"] = {"steps": 4, "eval_every": 2, "val_batches": 1, "scheduler": "none",
                   "num_samples": 4, "best_params_file": str(env / "best.yaml"),
                   "space": {"lambda_adv": {"low": 1, "high": 8}, "lambda_egl": None,
                             "lambda_mix": None, "lambda_sparse": None}}
    result = run_search(params_from_dict(raw), echo=lambda *_: None)
    assert len(result.trials) == 4 and not [t for t in result.trials if t["error"]]
    client = mlflow.MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and "best_objective" in parent.data.metrics
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 4
    for child in children:
        assert child.info.status == "FINISHED"
        # the default objective's two terms, logged beside the objective
        assert {"val_cacc", "val_cue_mismatch_cacc", "val_cue_free_aacc",
                "objective"} <= set(child.data.metrics)
    ids = node_ids(cluster)
    assert {c.data.tags["ray.node"] for c in children} == {ids["head"], ids["spot"]}


# ------------------------------------------------------------------------------------ bad input
def test_what_the_cluster_cannot_place_is_refused_within_seconds(tiny, env, cluster, tracking):
    import mlflow

    from egat import stages

    cases = [
        (with_train(tiny, workers=3, label_selector={}), "train.workers=3 workers"),
        (with_train(tiny, resources_per_worker={"CPU": 2}), "train.workers=2 workers"),
        (with_train(tiny, label_selector=[{NODE: "head"}, {NODE: "gpu"}]),
         "rank 1 needs a node labelled {'egat-node': 'gpu'}"),
    ]
    for params, message in cases:
        started = time.perf_counter()
        with pytest.raises(EgatError, match=message.replace("{", r"\{").replace("[", r"\[")):
            stages.train_run(params, "egat", "grass", 7)
        assert time.perf_counter() - started < 10
    assert not mlflow.MlflowClient().search_runs(
        [e.experiment_id for e in mlflow.search_experiments()],
        "tags.egat_key = 'train/egat/grass/seed7'")  # refused before any run was created
    assert not (env / "runs" / "egat" / "grass" / "seed7").exists()


# A third node (no CPUs) whose processes see the storage folder read-only: its own mount
# namespace, as a node whose NFS mount is read-only or missing would. Ray's Node class is what
# ray.cluster_utils.Cluster starts a node with; SIGTERM ends it and the processes it started.
READ_ONLY_NODE = """
import signal, sys, time
from ray._private.node import Node
from ray._private.parameter import RayParams
params = RayParams(gcs_address=sys.argv[1], num_cpus=0, num_gpus=0, labels={"egat-node": "ro"},
                   object_store_memory=80 * 2**20, min_worker_port=0, max_worker_port=0,
                   include_log_monitor=False, node_manager_port=0)
params.dashboard_agent_listen_port = None
node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(1)
"""


def test_a_storage_path_one_node_cannot_write_is_refused_naming_that_node(
        tiny, env, cluster, tracking):
    import mlflow

    from egat import stages

    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs `unshare -m` (a mount namespace) to give one node a read-only disk")
    storage = env / "shared" / "read-only-elsewhere"
    storage.mkdir()
    node = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$1" -c "$2" "$3"',
         str(storage), sys.executable, READ_ONLY_NODE, cluster.address],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while "ro" not in node_ids(cluster):
            assert node.poll() is None and time.monotonic() < deadline, "the node did not join"
            time.sleep(0.5)
        ro = node_ids(cluster)["ro"]
        started = time.perf_counter()
        with pytest.raises(EgatError) as err:
            stages.train_run(with_train(tiny, storage_path=str(storage)), "egat", "grass", 8)
        print(f"storage check: {time.perf_counter() - started:.1f} s: {err.value}")
        assert str(err.value).startswith(
            f"train.storage_path={storage}: node {ro[:12]} (127.0.0.1) of the Ray cluster cannot "
            "write there")
        assert "Read-only file system" in str(err.value)
        assert not mlflow.MlflowClient().search_runs(
            [e.experiment_id for e in mlflow.search_experiments()],
            "tags.egat_key = 'train/egat/grass/seed8'")
        assert not list(storage.iterdir())  # the check cleans up after itself
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=60)
        finally:
            try:
                os.killpg(node.pid, signal.SIGKILL)  # whatever of that node outlived it
            except ProcessLookupError:
                pass


# Last in the module: it leaves the cluster one spot node short until it adds one back.
def test_an_elastic_run_continues_on_the_workers_left_after_a_node_loss(
        tiny, env, cluster, tracking, monkeypatch):
    """train.min_workers=1 of 2 workers (on any node): the worker on the spot node hangs at step
    6, and its node is SIGKILLed after the step-4 checkpoint with no replacement. Ray restarts the
    group from that checkpoint on the one worker the head holds, and it trains to the end.

    Ray's autoscaling coordinator, which tells the elastic policy how many workers fit, refreshes
    its view of the nodes every 20 s: the first restart still counts the lost node and waits for
    2 workers until the worker group's start times out (60 s by default; 30 s here, which Ray
    Train passes on to its controller), then starts 1."""
    import mlflow

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    params = with_train(tiny, min_workers=1, max_failures=1, label_selector={})
    fault = WorkerFault(step=6, node_labels={NODE: "spot"}, marker=env / "elastic.marker",
                        action="hang")
    try:
        result, run_id, seen = train_losing_a_node(params, env / "runs" / "elastic", cluster,
                                                   fault, replace=False)
    finally:
        if "spot" not in node_ids(cluster):  # for whatever runs after this module's tests
            cluster.add_node(num_cpus=1, labels={NODE: "spot"})
    head = node_ids(cluster)["head"]
    first, second = attempts(run_id)
    assert first["world_size"] == 2 and first["restored_step"] == 0
    assert sorted(r["node_id"] for r in first["ranks"]) == sorted([head, seen["lost"]])
    assert second["world_size"] == 1 and second["restored_step"] == 4
    assert [r["node_id"] for r in second["ranks"]] == [head]
    client = mlflow.MlflowClient()
    history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
               for key in ("ray/restored_step", "ray/world_size")}
    assert history == {"ray/restored_step": [(0, 0.0), (4, 4.0)],
                       "ray/world_size": [(0, 2.0), (4, 1.0)]}
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ray.attempts"] == "2"
    assert result.metrics["steps"] == STEPS
    last = torch.load(result.run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert last["state"]["step"] == STEPS and len(last["ranks"]) == 1  # one rank wrote it
    print(f"elastic shrink: run {seen['wall_s']:.0f} s in all, node removed at "
          f"{seen['removed_s']:.0f} s, lost node {seen['lost'][:12]}")

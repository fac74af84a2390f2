"""Ray Train: the same Trainer on Ray workers (docs/architecture.md).

Fast tests cover the bad inputs (a clear error within seconds) and the dispatch; the slow ones
share one private Ray session and one tiny dataset per module and check that

* the local and ray backends give the same outputs and the same metrics (one worker);
* 2 CPU workers (gloo) train to within tolerance of 1 worker at the same global batch;
* a run whose worker is SIGKILLed mid-run recovers from its last checkpoint and ends exactly
  where the uninterrupted run ends.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from egat.build import params_from_dict
from egat.config import Params
from egat.errors import EgatError
from egat.train import cluster, ray_train
from egat.train.launch import choose_backend, fit
from tests.faults import WorkerFault
from tests.helpers import (RAY_ENV, last_model, mlflow_metrics, prepared, ray_test_env,
                           tracked_fit)

STEPS = 8


def tiny_raw(root: Path) -> dict:
    """EGAT (attack, mixup, Grad-CAM: every source of randomness) on 20 images per class."""
    return {
        "data": {"dir": str(root / "data"), "embedded": {"per_class": 20}},
        "model": {"name": "small_resnet"},
        "attack": {"steps": 1},
        "eval": {"batch_size": 32},
        "train": {
            "method": "egat", "steps": STEPS, "batch_size": 16, "eval_every": 2,
            "checkpoint_every": 4, "val_batches": 1, "progress": False, "num_threads": 1,
            "out_dir": str(root / "runs"),
        },
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with ray_test_env(tmp_path_factory.mktemp("ray")) as root:
        yield root


@pytest.fixture(scope="module")
def tiny(env) -> Params:
    return prepared(tiny_raw(env))


def with_train(params: Params, **train) -> Params:
    raw = params.model_dump(mode="json")
    raw["train"].update(train)
    return params_from_dict(raw)


# ------------------------------------------------------------------------- fast: inputs, errors
def test_auto_backend_is_local_for_one_worker_and_ray_otherwise(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    params = params_from_dict({})
    assert choose_backend(params) == "local"
    assert choose_backend(with_train(params, workers=2)) == "ray"
    assert choose_backend(with_train(params, backend="ray")) == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert choose_backend(params) == "ray"
    assert choose_backend(with_train(params, backend="local")) == "local"


def test_local_backend_refuses_several_workers(tmp_path):
    params = with_train(params_from_dict({}), backend="local", workers=2)
    with pytest.raises(EgatError, match="train.workers=2"):
        fit(params, tmp_path)


def test_more_workers_than_the_machine_has_fail_before_ray_starts(env, tmp_path):
    import ray

    was_up = ray.is_initialized()
    started = time.perf_counter()
    too_many = (os.cpu_count() or 1) + 1
    with pytest.raises(EgatError, match=f"train.workers={too_many} workers"):
        fit(with_train(params_from_dict({}), workers=too_many), tmp_path, backend="ray")
    # Elastic: it starts on as few as min_workers, so those are what must fit.
    with pytest.raises(EgatError, match=f"train.min_workers={too_many} workers"):
        fit(with_train(params_from_dict({}), workers=too_many + 1, min_workers=too_many),
            tmp_path, backend="ray")
    gpu = {"resources_per_worker": {"GPU": 1}, "use_gpu": "false"}
    if not torch.cuda.is_available():
        with pytest.raises(EgatError, match="do not fit"):
            fit(with_train(params_from_dict({}), **gpu), tmp_path, backend="ray")
        with pytest.raises(EgatError, match="no GPU"):
            fit(with_train(params_from_dict({}), use_gpu="true"), tmp_path, backend="ray")
    assert time.perf_counter() - started < 5
    assert ray.is_initialized() == was_up  # refused before a private cluster was started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_fails_within_seconds(env, tmp_path):
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump({"train": {"steps": 1, "progress": False}}))
    address = f"127.0.0.1:{free_port()}"
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "egat.cli", "train", "--config", str(config),
         "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, **RAY_ENV, "RAY_ADDRESS": address},
    )
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"RAY_ADDRESS={address} is unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 60, elapsed  # python + imports; the check itself times out after 5 s


def test_a_ray_address_that_is_not_a_ray_cluster_fails_within_seconds(tmp_path, monkeypatch, capsys):
    """A port that answers but is no Ray GCS (the dashboard's HTTP port, an MLflow server, a
    silent listener) is refused in seconds; ray.init would retry it for minutes."""
    import http.server
    import threading

    from egat.cli import main

    http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump({"train": {"steps": 1, "progress": False}}))
    address = f"127.0.0.1:{http_server.server_port}"
    try:
        started = time.perf_counter()
        with pytest.raises(EgatError, match="is not a Ray cluster .it sent nothing back"):
            cluster.check_address(f"127.0.0.1:{silent.getsockname()[1]}", timeout=1)
        with pytest.raises(EgatError, match="is not a Ray cluster .it answered b'"):
            cluster.check_address(address)
        assert time.perf_counter() - started < 5
        monkeypatch.setenv("RAY_ADDRESS", address)
        with pytest.raises(SystemExit) as exit_:
            main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run")])
    finally:
        http_server.shutdown()
        http_server.server_close()
        silent.close()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: RAY_ADDRESS={address} is not a Ray cluster (it answered b'")
    assert "not gRPC): give the head node's GCS address" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("address", ["not an address", "host-without-port", "ray://:10001"])
def test_malformed_ray_address_is_refused(address):
    with pytest.raises(EgatError, match="RAY_ADDRESS"):
        cluster.check_address(address)


def test_report_metrics_flattens_names_and_sums_the_objective():
    got = ray_train.report_metrics(4, {"val/acc": 50.0, "val/aacc": 20.0, "train/loss": 1.5},
                                     "val_cacc+val_aacc")
    assert got == {"step": 4, "val_cacc": 50.0, "val_aacc": 20.0, "train_loss": 1.5,
                   "objective": 70.0}
    assert "objective" not in ray_train.report_metrics(4, {"val/acc": 50.0}, "val_cacc+val_aacc")


def test_worker_resources_follow_rays_defaults():
    assert cluster.worker_resources(False, {}) == {"CPU": 1.0}
    assert cluster.worker_resources(True, {}) == {"GPU": 1.0}
    assert cluster.worker_resources(True, {"CPU": 8}) == {"CPU": 8.0, "GPU": 1.0}
    assert cluster.worker_resources(False, {"CPU": 2, "GPU": 0}) == {"CPU": 2.0}


def test_run_names_are_stable_and_distinct(tmp_path):
    a = ray_train.run_name(tmp_path / "runs" / "egat" / "grass" / "seed0")
    assert a == ray_train.run_name(tmp_path / "runs" / "egat" / "grass" / "seed0")
    assert a != ray_train.run_name(tmp_path / "runs" / "egat" / "grass" / "seed1")
    assert a.startswith("egat-grass-seed0-")


def test_storage_path_is_absolute_or_a_uri(tmp_path):
    params = with_train(params_from_dict({}), out_dir="runs")
    assert Path(cluster.storage_path(params)).is_absolute()
    uri = with_train(params, storage_path="s3://bucket/egat")
    assert cluster.storage_path(uri) == "s3://bucket/egat"


def test_rank_0s_tracker_pickles_without_its_client_and_counts_attempts(tmp_path, monkeypatch):
    """What rank 0 logs through (tracking/run_tracker.py): the driver's MLflow run, by id."""
    import pickle

    from egat.tracking.mlflow_tracker import MlflowTracker
    from egat.tracking.run_tracker import RunTracker, run_tracker_of

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run_tracker_of(None) is None
    with MlflowTracker("test/run-tracker", {"stage": "test"}) as driver:
        tracker = run_tracker_of(driver)
        tracker.log_metrics({"train/loss": 1.0}, 2)  # connects
        tracker = pickle.loads(pickle.dumps(tracker))
        assert isinstance(tracker, RunTracker) and tracker._client is None
        ranks = [{"rank": r, "node_id": f"node{r}" * 4} for r in range(2)]
        tracker.log_attempt(ranks, 0)
        tracker.log_attempt(ranks[:1], 4)
    import mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(driver.run_id)
    assert run.data.tags["ray.attempts"] == "2"
    assert run.data.tags["ray.placement"] == "rank0@node0node0no"
    history = client.get_metric_history(driver.run_id, "ray/world_size")
    assert sorted((m.step, m.value) for m in history) == [(0, 2.0), (4, 1.0)]
    assert client.get_metric_history(driver.run_id, "train/loss")[0].step == 2


EGAT = Path(__file__).resolve().parents[1] / "egat"
RAY_SIDE = ["tune.py", "tune_mlflow.py", "train/launch.py", "train/ray_train.py",
            "train/cluster.py", "tracking/run_tracker.py"]


def test_ray_address_is_read_in_one_place_and_no_fault_injector_ships():
    """cluster.ray_address() is the one reader of RAY_ADDRESS; fault injection lives in tests/."""
    import re

    readers, killers = [], []
    for path in sorted(EGAT.rglob("*.py")):
        text = path.read_text()
        found = re.findall(r"(?:environ\.get|getenv|environ\[)\(?\s*[\"']RAY_ADDRESS", text)
        readers += [path.relative_to(EGAT).as_posix()] * len(found)
        if "SIGKILL" in text:
            killers.append(path.relative_to(EGAT).as_posix())
    assert readers == ["train/cluster.py"]
    assert killers == []


@pytest.mark.parametrize("name", RAY_SIDE)
def test_the_ray_side_uses_only_public_names_of_other_modules(name):
    """No `from egat.x import _y` nor `module._y` on an egat module (tune.py on cluster.py's
    interface, not its internals)."""
    import ast

    tree = ast.parse((EGAT / name).read_text())
    modules, private = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("egat"):
            for alias in node.names:
                if alias.name.startswith("_"):
                    private.append(f"{node.module}.{alias.name}")
                modules.add(alias.asname or alias.name)  # egat.train's modules: cluster, ...
        elif isinstance(node, ast.Import):
            modules.update(a.asname or a.name for a in node.names if a.name.startswith("egat"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                and node.value.id in modules):
            private.append(f"{node.value.id}.{node.attr}")
    assert private == []


# ---------------------------------------------------------------------------- slow: real runs
@pytest.fixture(scope="module")
def ray_session(env):
    import ray

    cluster.connect(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tiny, env):
    return tracked_fit(tiny, env / "local1", "local")


@pytest.fixture(scope="module")
def ray1_run(tiny, env, ray_session):
    return tracked_fit(tiny, env / "ray1", "ray")


@pytest.fixture(scope="module")
def ray2_run(tiny, env, ray_session):
    return tracked_fit(with_train(tiny, workers=2), env / "ray2", "ray")


@pytest.fixture(scope="module")
def ray2_killed_run(tiny, env, ray_session):
    marker = env / "killed.marker"
    fault = WorkerFault(step=6, rank=1, marker=marker)  # checkpoints at 4 and 8
    result, run_id = tracked_fit(with_train(tiny, workers=2), env / "ray2k", "ray", on_report=fault)
    return result, run_id, marker


@pytest.mark.slow
@pytest.mark.parametrize("which", ["local", "ray"])
def test_both_backends_write_the_same_outputs(which, request):
    from egat.run.checkpoint import model_from_checkpoint

    result, run_id = request.getfixturevalue({"local": "local_run", "ray": "ray1_run"}[which])
    for name in ("best.pt", "last.pt", "train_metrics.json", "train_timing.json"):
        assert (result.run_dir / name).is_file(), name
    assert result.best_checkpoint == result.run_dir / "best.pt"
    assert result.metrics["steps"] == STEPS
    assert 0 <= result.metrics["best_val_acc"] <= 100
    assert result.metrics["best_step"] in range(2, STEPS + 1, 2)
    model, params, ckpt = model_from_checkpoint(result.best_checkpoint)
    assert ckpt["step"] == result.metrics["best_step"] and params.train.method == "egat"
    logged = mlflow_metrics(run_id)  # rank 0 logged through the driver's MLflow run
    for key in ("train/loss", "train/acc", "val/acc", "final/best_val_acc", "final/steps"):
        assert key in logged, key
    assert logged["final/best_val_acc"] == result.metrics["best_val_acc"]


@pytest.mark.slow
def test_local_and_ray_backends_give_the_same_metrics(local_run, ray1_run):
    (local, local_id), (ray1, ray_id) = local_run, ray1_run
    keys = ("best_val_acc", "best_step", "steps")
    assert {k: local.metrics[k] for k in keys} == {k: ray1.metrics[k] for k in keys}
    a, b = last_model(local.run_dir), last_model(ray1.run_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    la, lb = mlflow_metrics(local_id), mlflow_metrics(ray_id)
    assert abs(la["train/loss"] - lb["train/loss"]) < 1e-3


@pytest.mark.slow
def test_two_workers_train_like_one_at_the_same_global_batch(local_run, ray2_run):
    """The sampler shards each global batch of 16 over the ranks and the Trainer averages the
    gradients; BatchNorm's batch statistics (over 8 images, not 16) and the random draws (the
    attack's start, dropout: per rank) differ, so the runs agree within a tolerance. The exact
    averaging is checked without BatchNorm by test_sharded_gradients_average_to_the_global_one."""
    (one, one_id), (two, two_id) = local_run, ray2_run
    assert two.metrics["steps"] == one.metrics["steps"] == STEPS
    l1, l2 = mlflow_metrics(one_id)["train/loss"], mlflow_metrics(two_id)["train/loss"]
    print(f"1 vs 2 workers: best val acc {one.metrics['best_val_acc']} vs "
          f"{two.metrics['best_val_acc']}, last train loss {l1:.3f} vs {l2:.3f}")
    assert abs(two.metrics["best_val_acc"] - one.metrics["best_val_acc"]) <= 20.0
    assert abs(l1 - l2) <= 0.25 * max(l1, l2), (l1, l2)


@pytest.mark.slow
def test_a_killed_worker_recovers_and_ends_like_an_uninterrupted_run(ray2_run, ray2_killed_run):
    (clean, _), (killed, killed_id, marker) = ray2_run, ray2_killed_run
    assert marker.is_file(), "the fault was not injected"
    assert "rank 1 at step 6" in marker.read_text()
    keys = ("best_val_acc", "best_step", "steps")
    assert {k: killed.metrics[k] for k in keys} == {k: clean.metrics[k] for k in keys}
    a, b = last_model(clean.run_dir), last_model(killed.run_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_running_a_finished_run_again_resumes_from_its_checkpoint(ray1_run, tiny, env):
    """Same name and storage path: Ray restores the latest checkpoint; nothing is retrained."""
    first, _ = ray1_run
    again = fit(tiny, env / "ray1", backend="ray")
    assert {k: again.metrics[k] for k in ("best_val_acc", "best_step", "steps")} == {
        k: first.metrics[k] for k in ("best_val_acc", "best_step", "steps")
    }
    assert again.metrics["train_time_s"] <= first.metrics["train_time_s"] + 1e-6


@pytest.mark.slow
def test_out_of_memory_in_a_ray_worker_is_the_in_process_error_line(tiny, env, ray_session):
    """torch's OOM inside a worker (injected: there is no GPU here) ends the run with the one
    line the same run gives in process, naming train.batch_size, not Ray's wrapped traceback."""
    from egat.train.trainer import Trainer

    def oom(step: int, metrics: dict, checkpointed: bool) -> None:
        if step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB (injected)")

    with pytest.raises(EgatError) as local:
        Trainer(tiny, env / "oom-local", on_report=oom).fit()
    fault = WorkerFault(step=2, rank=1, marker=env / "oom.marker", action="oom")
    with pytest.raises(EgatError) as remote:
        fit(with_train(tiny, workers=2, max_failures=0), env / "oom-ray", backend="ray",
            on_report=fault)
    assert str(remote.value) == str(local.value)
    assert "lower train.batch_size (now 16)" in str(remote.value)
    assert "\n" not in str(remote.value) and "oom rank 1 at step 2" not in str(remote.value)


@pytest.mark.slow
def test_a_bad_param_inside_a_ray_worker_is_the_in_process_error_line(tiny, env, tmp_path):
    """The same one `error:` line, last, and exit status 2 from `egat train` in process and on
    Ray (whose workers' and controller's own logs, above it, still show their tracebacks)."""
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump(tiny.model_dump(mode="json")))
    lines, stderrs = {}, {}
    for backend, extra in (("local", []), ("ray", ["--set", "train.workers=2",
                                                   "--set", "train.max_failures=0"])):
        proc = subprocess.run(
            [sys.executable, "-m", "egat.cli", "train", "--config", str(config),
             "--set", "train.batch_size=100000", "--set", f"train.backend={backend}", *extra,
             "--run-dir", str(tmp_path / backend)],
            capture_output=True, text=True, timeout=600, env={**os.environ, **RAY_ENV},
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines[backend] = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        stderrs[backend] = proc.stderr
    assert len(lines["local"]) == 1 and "train.batch_size=100000" in lines["local"][0]
    assert lines["ray"] == lines["local"]
    assert "Traceback" not in stderrs["local"]
    assert "WorkerGroupError" not in lines["ray"][0]


def _shard_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from egat.train.sampler import StepBatchSampler
    from egat.train.trainer import _all_reduce_mean
    from tests.helpers import tiny_classifier

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    images, labels = torch.rand(12, 3, 8, 8), torch.randint(0, 3, (12,))
    model = tiny_classifier()
    batch = next(iter(StepBatchSampler(12, 12, 0, 1, 0, rank, world)))
    torch.nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
    grads = [p.grad for p in model.parameters()]
    _all_reduce_mean(grads, world)
    if rank == 0:
        torch.save([g.clone() for g in grads], out)
    dist.destroy_process_group()


def test_sharded_gradients_average_to_the_global_one(tmp_path):
    """Two gloo ranks, each on its shard of one global batch, average to the global gradient
    (a model without BatchNorm: the mean loss of equal shards is the global mean)."""
    import torch.multiprocessing as mp

    from tests.helpers import tiny_classifier

    out = tmp_path / "grads.pt"
    mp.spawn(_shard_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    torch.manual_seed(0)
    images, labels = torch.rand(12, 3, 8, 8), torch.randint(0, 3, (12,))
    model = tiny_classifier()
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    for averaged, whole in zip(torch.load(out, weights_only=True), [p.grad for p in model.parameters()]):
        torch.testing.assert_close(averaged, whole, rtol=1e-5, atol=1e-6)


def test_validation_reports_aacc_and_comp_without_touching_the_training_rng(tiny, env):
    """Tune's objectives need val aAcc / Comp; computing them must not change the run."""
    from egat.train.trainer import Trainer

    plain = with_train(tiny, steps=4, checkpoint_every=4)
    rich = with_train(plain, val_metrics=["aacc", "comp"])
    seen: list[dict] = []
    Trainer(plain, env / "val-plain").fit()
    Trainer(rich, env / "val-rich", on_report=lambda s, m, c: seen.append(m)).fit()
    assert {"val/acc", "val/aacc", "val/comp"} <= set(seen[-1])
    assert all(0 <= seen[-1][k] <= 100 for k in ("val/acc", "val/aacc"))
    a, b = last_model(env / "val-plain"), last_model(env / "val-rich")
    for name in a:
        assert torch.equal(a[name], b[name]), name

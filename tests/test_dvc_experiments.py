"""DVC experiments outside the workspace (`dvc exp run --temp`, `--queue` + `dvc queue start`) log
their MLflow runs into the project's store, not into DVC's temporary copy (issue 16, point 4).
Real DVC (its celery queue included), real MLflow on sqlite with its locking as it is."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_pipeline import TINY, init_project, run

# Only the train stages (and prepare, guides before them), one tiny ERM run per experiment.
TINY_ERM = {**TINY, "train": {**TINY["train"], "steps": 2, "eval_every": 2},
            "study": {**TINY["study"], "methods": ["erm"]},
            "robust": {**TINY["robust"], "transfer_from": "erm", "transfer_fallback": "erm"}}


def test_a_run_whose_process_still_runs_is_not_marked_killed(tmp_path, monkeypatch):
    """Two parallel experiments run the same cell (same key): starting one must not end the
    other; a run whose process is gone is marked KILLED as before."""
    import mlflow
    import psutil

    from egat.tracking.mlflow_tracker import MlflowTracker, ensure_experiment, owner_tags

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    key = "train/erm/grass/seed0"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = ensure_experiment()
    alive = client.create_run(exp_id, tags={"egat_key": key, **owner_tags()}).info.run_id
    proc = subprocess.Popen(["sleep", "60"])
    started = psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait()
    dead = client.create_run(exp_id, tags={
        "egat_key": key, **owner_tags(), "egat_pid": str(proc.pid),
        "egat_pid_started": repr(started)}).info.run_id
    untagged = client.create_run(exp_id, tags={"egat_key": key}).info.run_id
    with MlflowTracker(key, {"stage": "train"}) as tracker:
        status = {r: client.get_run(r).info.status for r in (alive, dead, untagged)}
        assert status == {alive: "RUNNING", dead: "KILLED", untagged: "KILLED"}
        mine = client.get_run(tracker.run_id).data.tags
        assert mine["egat_pid"] == str(os.getpid()) and mine["egat_host"] == socket.gethostname()
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_the_default_store_is_at_the_dvc_root_of_the_experiment(tmp_path, monkeypatch):
    from egat.tracking.mlflow_tracker import dvc_experiment_tags, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", "/project")  # what DVC sets for a temp or queued experiment
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lynx")
    assert tracking_uri() == "sqlite:////project/mlflow.db"
    assert dvc_experiment_tags() == {"dvc_exp": "lucky-lynx"}


def train_runs(proj: Path) -> dict[str, object]:
    """The project store's train runs by the DVC experiment they belong to."""
    import mlflow

    assert (proj / "mlflow.db").is_file(), "no mlflow.db at the project root"
    client = mlflow.MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("egat")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'train'")
    return {r.data.tags.get("dvc_exp"): r for r in runs}


def assert_logged_here(proj: Path, run_) -> None:
    assert run_.info.status == "FINISHED"
    assert run_.data.tags["egat_key"] == "train/erm/grass/seed0"
    artifacts = Path(run_.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(proj / "mlartifacts") and (artifacts / "checkpoint").is_dir()
    # Nothing stayed behind in (or was lost with) DVC's temporary copies.
    assert not list((proj / ".dvc" / "tmp").rglob("mlflow.db"))


@pytest.mark.slow
def test_a_temp_experiment_logs_into_the_projects_store(tmp_path):
    env = init_project(tmp_path, TINY_ERM)
    run(["dvc", "exp", "run", "--temp", "-n", "tmp-lr", "-S", "train.lr=0.002", "train"], tmp_path, env)
    runs = train_runs(tmp_path)
    assert set(runs) == {"tmp-lr"}
    assert runs["tmp-lr"].data.params["train.lr"] == "0.002"
    assert_logged_here(tmp_path, runs["tmp-lr"])


def queue_done(proj: Path, env: dict, names: set[str], timeout: float = 600) -> str:
    """Wait until every named queued experiment has left the queue; `dvc queue status`'s table."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], proj, env)
        rows = [line for line in status.splitlines() if line.split()[1:2] and line.split()[1] in names]
        if len(rows) == len(names) and not any(s in row for row in rows for s in ("Queued", "Running")):
            return status
        time.sleep(2)
    pytest.fail(f"the queue did not finish within {timeout} s:\n{status}")


@pytest.mark.slow
def test_two_queued_experiments_on_two_workers_both_land_in_mlflow(tmp_path):
    env = init_project(tmp_path, TINY_ERM)
    for name, lr in (("q-a", "0.002"), ("q-b", "0.003")):
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}", "train"], tmp_path, env)
    # The queue's workers inherit `dvc queue start`'s stdout and outlive it, so its output goes to
    # a file: with a pipe, reading to EOF waits for the workers (a CI hang of 600 s).
    with open(tmp_path / "queue-start.log", "w") as log:
        started = subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=tmp_path, env=env,
                                 stdout=log, stderr=subprocess.STDOUT, timeout=120)
    assert started.returncode == 0, (tmp_path / "queue-start.log").read_text()[-3000:]
    try:
        status = queue_done(tmp_path, env, {"q-a", "q-b"})
    finally:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=tmp_path, env=env,
                       capture_output=True, timeout=60)
    if status.count("Success") != 2:
        logs = [subprocess.run(["dvc", "queue", "logs", n], cwd=tmp_path, env=env, text=True,
                               capture_output=True, timeout=60).stdout[-3000:] for n in ("q-a", "q-b")]
        pytest.fail(f"{status}\n" + "\n".join(logs))
    runs = train_runs(tmp_path)
    assert set(runs) == {"q-a", "q-b"}
    assert {runs[n].data.params["train.lr"] for n in runs} == {"0.002", "0.003"}
    for run_ in runs.values():
        assert_logged_here(tmp_path, run_)

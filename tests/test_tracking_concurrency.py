"""4 processes logging to one sqlite MLflow store at once (as concurrent Tune trials do) lose no
run, param, metric or artifact: sqlite's "database is locked" is retried. Real MLflow, real sqlite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WRITERS, STEPS = 4, 25
WRITER = """
import sys, time
from pathlib import Path
import mlflow  # imported before the barrier, so that all writers start logging together
from egat.tracking.mlflow_tracker import MlflowTracker

i, writers, steps = (int(a) for a in sys.argv[1:4])
Path(f"ready{i}").touch()
while len(list(Path().glob("ready*"))) < writers:
    time.sleep(0.01)
with MlflowTracker(f"concurrent/{i}", {"stage": "test", "writer": str(i)},
                   {"writer": i, "group": {"a": 1, "b": [1, 2]}}) as tracker:
    for step in range(steps):
        tracker.log_metrics({"loss": 1 / (step + 1), "writer": i}, step)
    artifact = Path(f"artifact{i}.txt")
    artifact.write_text(str(i))
    tracker.log_artifact(artifact, "files")
"""


@pytest.mark.slow
def test_four_concurrent_writers_lose_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a fresh store: its creation races too
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(i), str(WRITERS), str(STEPS)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for i in range(WRITERS)]
    errors = [p.communicate(timeout=300)[1][-2000:] for p in procs]
    assert [p.returncode for p in procs] == [0] * WRITERS, errors

    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("egat").experiment_id])
    assert sorted(r.data.tags["egat_key"] for r in runs) == [f"concurrent/{i}" for i in range(WRITERS)]
    for r in runs:
        i = int(r.data.tags["writer"])
        assert r.info.status == "FINISHED"
        assert r.data.params == {"writer": str(i), "group.a": "1", "group.b": "[1, 2]"}
        history = client.get_metric_history(r.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(STEPS))
        assert len(client.get_metric_history(r.info.run_id, "writer")) == STEPS
        (artifact,) = client.list_artifacts(r.info.run_id, "files")
        local = client.download_artifacts(r.info.run_id, artifact.path, str(tmp_path / f"dl{i}"))
        assert Path(local).read_text() == str(i)

"""A killed `egat tune` resumes (issue 16, point 6): SIGKILL the driver once two trials have
finished, `egat tune --resume` continues the search from its experiment folder; the finished
trials are kept, the unfinished ones go on from their checkpoints, the trial count is as asked,
and the killed search's parent MLflow run is marked KILLED. Real Ray Tune/Train and MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from egat.errors import EgatError
from tests.helpers import RAY_ENV, prepared
from tests.test_pipeline import env_for, write_params

SAMPLES = 3
STEPS = 8


def tune_params(root: Path) -> dict:
    return {
        "data": {"dir": str(root / "data"), "embedded": {"per_class": 20}},
        "attack": {"steps": 1},
        "eval": {"batch_size": 32, "attack": {"steps": 2}},
        "train": {"batch_size": 16, "num_threads": 1, "progress": False,
                  "out_dir": str(root / "runs")},
        "tune": {"num_samples": SAMPLES, "steps": STEPS, "eval_every": 2, "val_batches": 1,
                 "scheduler": "none", "search": "random", "max_concurrent_trials": 2,
                 "resources_per_worker": {"CPU": 0.5},
                 "best_params_file": str(root / "best_params.yaml")},
    }


def runs_of(db: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("egat")
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


def kill_after_two_trials(cmd, root: Path, env: dict) -> tuple[set[str], str]:
    """Start the search, SIGKILL its process group once >= 2 trials have finished, a third has
    reported and Tune has saved its state since; (finished trial ids, the reporting trial's id)."""
    proc = subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True,
                            stdout=open(root / "first.log", "w"), stderr=subprocess.STDOUT)
    deadline, seen_at = time.monotonic() + 900, None
    try:
        while True:
            assert proc.poll() is None, "the search ended before it was killed:\n" + (
                root / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no two finished trials within 900 s"
            _, runs = runs_of(root / "mlflow.db")
            trials = [r for r in runs if r.data.tags.get("stage") == "tune-trial"]
            done = {r.data.tags["trial_id"] for r in trials if r.info.status == "FINISHED"}
            going = [r.data.tags["trial_id"] for r in trials
                     if r.info.status == "RUNNING" and "objective" in r.data.metrics]
            if len(done) >= 2 and going:
                seen_at = seen_at or time.time()
                states = list((root / "runs" / "_ray").glob("*/experiment_state*.json"))
                if states and max(s.stat().st_mtime for s in states) > seen_at:
                    return done, going[0]
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


@pytest.mark.slow
def test_a_killed_search_resumes_with_its_finished_trials(tmp_path):
    prepared(tune_params(tmp_path))
    config = tmp_path / "params.yaml"
    write_params(config, tune_params(tmp_path))
    env = {**env_for(tmp_path), **RAY_ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "egat.cli", "tune", "--config", str(config)]
    finished, resumed = kill_after_two_trials(cmd, tmp_path, env)
    client, runs = runs_of(tmp_path / "mlflow.db")
    (killed,) = [r for r in runs if r.data.tags.get("stage") == "tune"]
    assert killed.info.status == "RUNNING"  # what the kill left

    out = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if "[state-dump]" not in line]
    assert out.returncode == 0, "\n".join(lines[:40] + ["..."] + lines[-40:])
    # The final table lists every trial, the finished ones of the killed run included, and the
    # best-params file counts them.
    printed = out.stdout + out.stderr
    assert all(trial_id in printed for trial_id in finished | {resumed}), printed[-3000:]
    header = (tmp_path / "best_params.yaml").read_text().splitlines()[0]
    assert header.startswith(f"# best of {SAMPLES} trials of search "), header

    client, runs = runs_of(tmp_path / "mlflow.db")
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("stage") == "tune"}
    old, new = parents[killed.info.run_id], next(p for i, p in parents.items() if i != killed.info.run_id)
    assert len(parents) == 2
    assert old.info.status == "KILLED" and old.data.tags["resumed_by"] == new.info.run_id
    assert new.info.status == "FINISHED" and new.data.tags["resumes"] == old.info.run_id
    trials = [r for r in runs if r.data.tags.get("stage") == "tune-trial"]
    assert len(trials) == SAMPLES
    assert all(t.info.status == "FINISHED" for t in trials)
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {new.info.run_id}
    # The trial that was running went on from its checkpoint: no step was reported twice (but
    # the last: the final report repeats it, and a trial killed after its last checkpoint reports
    # it once more on resume, see the next test); a restart from scratch reports 2, 4 again.
    run_id = next(t.info.run_id for t in trials if t.data.tags["trial_id"] == resumed)
    steps = [m.step for m in client.get_metric_history(run_id, "objective")]
    once = steps
    while once[-2:] == [STEPS, STEPS]:
        once = once[:-1]
    assert once == sorted(set(once)) and once[-1] == STEPS, steps
    assert (tmp_path / "best_params.yaml").is_file()


@pytest.mark.slow
def test_a_run_resumed_after_its_last_step_reports_its_objective_again(tmp_path):
    """A trial killed after its last checkpoint: on resume Ray restores that checkpoint and the
    run only reports its summary; Tune needs the objective in that report too."""
    import ray

    from egat.train import cluster, ray_train
    from egat.tune import trial_params
    from tests.helpers import ray_test_env

    with ray_test_env(tmp_path):
        params = trial_params(prepared(tune_params(tmp_path)), {})
        cluster.connect(num_cpus=2)
        try:
            runs = [ray_train.fit_ray(params, None, name="ended", objective=params.tune.objective)
                    for _ in range(2)]
        finally:
            ray.shutdown()
    first, again = (json.loads((r.run_dir / ray_train.REPORT).read_text()) for r in runs)
    assert again["final"] == 1 and again["step"] == STEPS
    terms = params.tune.objective.split("+")  # the default: the two cue-proof metrics
    assert terms == ["val_cue_mismatch_cacc", "val_cue_free_aacc"]
    assert again["objective"] == first["objective"] == sum(first[t] for t in terms)
    assert again["train_time_s"] <= first["train_time_s"] + 1e-6  # restored, not trained again


def test_resume_without_a_search_is_one_error_before_ray_starts(tmp_path, monkeypatch):
    import ray

    from egat.build import params_from_dict
    from egat.tune import run_search

    monkeypatch.chdir(tmp_path)
    params = params_from_dict(tune_params(tmp_path))
    with pytest.raises(EgatError, match=r"tune --resume: no search named egat-tune-\* under "):
        run_search(params, resume=True)
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists()


def test_resume_refuses_other_params_and_a_finished_search(tmp_path):
    from egat.build import params_from_dict
    from egat.tune import SEARCH_FILE, resumable_search

    params = params_from_dict(tune_params(tmp_path))
    storage = tmp_path / "ray"
    folder = storage / f"{params.tune.name}-20260101-000000"
    folder.mkdir(parents=True)
    state = {"name": folder.name, "params": params.model_dump(mode="json"), "num_samples": 4,
             "parent_run_id": "abc", "finished": False}
    (folder / SEARCH_FILE).write_text(json.dumps(state))
    with pytest.raises(EgatError, match="holds no Tune state"):
        resumable_search(str(storage), params.tune.name, params, None)
    (folder / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    assert resumable_search(str(storage), params.tune.name, params, None)["name"] == folder.name
    with pytest.raises(EgatError, match="--samples 5, but search .* was started with 4"):
        resumable_search(str(storage), params.tune.name, params, 5)
    other = params_from_dict({**tune_params(tmp_path), "attack": {"steps": 2}})
    with pytest.raises(EgatError, match=r"started with other params \(attack.steps\)"):
        resumable_search(str(storage), params.tune.name, other, None)
    (folder / SEARCH_FILE).write_text(json.dumps({**state, "finished": True}))
    with pytest.raises(EgatError, match="has finished"):
        resumable_search(str(storage), params.tune.name, params, None)

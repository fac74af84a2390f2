"""The DVC pipeline and MLflow tracking end to end, on a tiny embedded dataset (real DVC, real
MLflow server; nothing mocked)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
import yaml

from egat import stages
from egat.build import load_params, params_from_dict
from egat.errors import EgatError
from tests.helpers import prepared, wait_for_server

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {
    "data": {"embedded": {"per_class": 12}},
    "train": {"steps": 3, "batch_size": 16, "eval_every": 3, "progress": False},
    "attack": {"steps": 2},
    "eval": {"max_examples": 16, "batch_size": 16, "attack": {"steps": 2},
             "sweep": {"attacks": ["fgsm", "pgd"], "eps": [0.01, 0.03], "steps": 2}},
    "study": {"methods": ["erm", "egat"], "train_domains": ["grass"], "seeds": [0]},
    # check (d)'s transfer sources among the study's methods; cheap attacks
    "robust": {"subset": 10, "transfer_from": "egat", "transfer_fallback": "erm",
               "attack": {"steps": 2, "targets": 2, "queries": 5},
               "checklist": {"eps": ["8/255", "64/255"], "steps_factor": 1, "restarts": 1}},
    # No variant runs here (tests/test_studies.py runs them): their stages depend on all of
    # `methods`, because a variant's method is not known to DVC's templating.
    "studies": {"train": []},
}


def env_for(tmp: Path, **extra) -> dict:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               MLFLOW_DISABLE_TELEMETRY="true", MPLCONFIGDIR=str(tmp / ".mpl"), **extra)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict, timeout=600) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def write_params(path: Path, overrides: dict) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())

    def merge(into: dict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(raw, overrides)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def init_project(proj: Path, overrides: dict) -> dict:
    """Make ``proj`` a git + DVC copy of the project with ``overrides`` over params.yaml; returns
    the environment to run DVC in it."""
    for item in ("dvc.yaml", "pipelines", "egat", "examples", ".dvc", ".dvcignore", ".gitignore"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, proj / item, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy(src, proj / item)
    write_params(proj / "params.yaml", overrides)
    env = env_for(proj)
    run(["git", "init", "-q"], proj, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], proj, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], proj, env)
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC copy of the project with tiny params, after one full `dvc repro`."""
    proj = tmp_path_factory.mktemp("project")
    run(["dvc", "repro"], proj, init_project(proj, TINY), timeout=900)
    return proj


def stages_run_by_repro(proj: Path, *flags: str) -> set[str]:
    out = run(["dvc", "repro", *flags], proj, env_for(proj), timeout=900)
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


@pytest.mark.slow
def test_repro_outputs_reports_metrics_and_mlflow_runs(project):
    reports = project / "reports"
    for name in ("table1_in_domain.md", "table2_ood.md", "paired.md", "attack_sweep.png",
                 "metrics.json", "studies_paired.md", "studies_paired_floor.md"):
        assert (reports / name).is_file(), name
    metrics = json.loads((reports / "metrics.json").read_text())
    assert set(metrics) == {"erm", "egat"}
    shown = run(["dvc", "metrics", "show", "--json"], project, env_for(project))
    assert "id_cacc" in shown and "ood_cacc_minus_erm" in shown  # egat - erm, paired by seed
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("egat").experiment_id])
    keys = {r.data.tags["egat_key"] for r in runs}
    assert keys == {f"{s}/{m}/grass/seed0" for s in ("train", "evaluate", "robustness")
                    for m in ("erm", "egat")} | {"studies"}
    assert (reports / "robustness.md").is_file() and "| grass AA" in (
        reports / "table1_in_domain.md").read_text()
    train = next(r for r in runs if r.data.tags["egat_key"] == "train/egat/grass/seed0")
    assert train.info.status == "FINISHED"
    assert {"method", "domain", "seed", "dataset", "git_commit", "stage"} <= set(train.data.tags)
    assert "train/adv" in train.data.metrics and "val/acc" in train.data.metrics
    assert train.data.params["train.steps"] == "3"
    assert train.data.params["methods.egat.lambda_adv"] == "5.024"  # resolved from the default preset
    artifacts = {a.path for a in client.list_artifacts(train.info.run_id)}
    assert {"checkpoint", "train_metrics.json"} <= artifacts
    (logged,) = client.search_logged_models([train.info.experiment_id],
                                            f"source_run_id = '{train.info.run_id}'")
    import mlflow.pytorch
    import torch

    served = mlflow.pytorch.load_model(logged.artifact_location)  # any batch size, as users call it
    assert [tuple(served(torch.zeros(n, 3, 32, 32)).shape) for n in (1, 5)] == [(1, 10), (5, 10)]


@pytest.mark.slow
def test_nothing_changed_reruns_nothing(project):
    assert stages_run_by_repro(project, "--dry") == set()


@pytest.mark.slow
def test_changing_a_lambda_reruns_only_that_method_downstream(project):
    # Runs last in this module: it leaves the project at the new lambda.
    params = project / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["methods"]["egat"]["lambda_adv"] = 2.0
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    # both evaluations: egat's own run and erm's, whose robustness check (d) transfers from
    # egat (robust.transfer_from)
    assert stages_run_by_repro(project) == {
        "train@egat-grass-0", "evaluate@egat-grass-0", "evaluate@erm-grass-0", "report",
        "studies"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_training_logs_to_a_real_mlflow_server(tmp_path, monkeypatch, capfd):
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        env=env_for(tmp_path, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(uri, 60)
        monkeypatch.chdir(tmp_path)
        # Credentials in the URI (the server ignores them) must not reach logs, params or files.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.replace("//", "//egat:s3cr3t@"))
        monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")
        params = prepared({**TINY, "study": {}})
        stages.train_run(params, "erm", "grass", 0)
        body = json.dumps({"experiment_ids": ["0", "1"], "max_results": 10}).encode()
        req = urllib.request.Request(f"{uri}/api/2.0/mlflow/runs/search", body,
                                     {"Content-Type": "application/json"})
        runs = json.load(urllib.request.urlopen(req, timeout=10))["runs"]
        (run_,) = [r for r in runs if r["info"]["run_name"] == "train/erm/grass/seed0"]
        assert run_["info"]["status"] == "FINISHED"
        names = {m["key"] for m in run_["data"]["metrics"]}
        assert {"train/loss", "val/acc", "final/best_val_acc"} <= names
        captured = capfd.readouterr()
        assert "s3cr3t" not in captured.out + captured.err + json.dumps(run_)
        written = [f for f in tmp_path.rglob("*") if f.is_file() and f.suffix != ".db"]
        assert written and not [f for f in written if b"s3cr3t" in f.read_bytes()]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_logged_model_is_exported_without_warnings_and_serves_the_checkpoint(tmp_path, monkeypatch):
    """The checkpoint holds channels_last weights; torch.export's packer warned on every training
    run that it took them for slices ("No complete tensor found in the group")."""
    import mlflow
    import mlflow.pytorch
    import torch

    from egat.run.checkpoint import model_from_checkpoint
    from egat.run.layout import BEST, run_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = prepared({**TINY, "study": {}, "train": {**TINY["train"], "backend": "local"}})
    assert params.model.channels_last
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stages.train_run(params, "erm", "grass", 0)
    assert not [w for w in caught if "complete tensor" in str(w.message)]
    client = mlflow.MlflowClient()
    (run_,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (logged,) = client.search_logged_models([run_.info.experiment_id])
    served = mlflow.pytorch.load_model(logged.artifact_location)
    model, _, _ = model_from_checkpoint(run_dir(params, "erm", "grass", 0) / BEST)
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(served(x), model.eval()(x), atol=1e-5)


def test_unreachable_tracking_server_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = prepared({**TINY, "study": {}})  # the cell's domain is checked against the data first
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:secret@127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(EgatError, match="unreachable") as err:
        stages.train_run(params, "erm", "grass", 0)
    assert time.monotonic() - start < 10
    assert "secret" not in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_params_yaml_validates_and_names_every_method():
    params = load_params(ROOT / "params.yaml")
    from egat.methods import method_registry

    assert set(params.methods) == set(method_registry.names())

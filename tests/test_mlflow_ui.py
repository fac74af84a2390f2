"""MLflow's UI opens the study as a model-training experiment on its runs table, with each run's
data as dataset inputs (issue 16, point 9). A real store written by the real stages, a real
`mlflow server` on 127.0.0.1, headless Chromium (the test skips where Chromium is absent)."""

from __future__ import annotations

import hashlib
import runpy
import subprocess
import tempfile
from pathlib import Path

import pytest

from egat import stages
from egat.build import params_from_dict
from tests.helpers import prepared, ray_test_env, tiny_folder_data, wait_for_server
from tests.test_pipeline import BIN, TINY, env_for, free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = runpy.run_path(str(ROOT / "scripts" / "check_plots_render.py"))
RUNS = ["train/erm/grass/seed0", "train/pgd_at/grass/seed0", "evaluate/erm/grass/seed0"]


def test_a_new_experiment_is_a_model_training_experiment(tmp_path, monkeypatch):
    import mlflow

    from egat.tracking.mlflow_tracker import ensure_experiment

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment(ensure_experiment())
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # A store made before the tag gets it; a kind the user chose stays.
    old = client.create_experiment("older")
    client.get_experiment(ensure_experiment("older"))
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(old, "mlflow.experimentKind", "genai_development")
    ensure_experiment("older")
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "genai_development"


def test_split_inputs_name_and_digest_exactly_the_splits_images(tmp_path):
    from egat.data.splits import images_root, read_splits
    from egat.tracking.datasets import split_inputs

    params = params_from_dict(tiny_folder_data(tmp_path))
    inputs = split_inputs(params.data, ["d2", "d1"], ["train", "test"])
    assert [(i.dataset.name, i.context) for i in inputs] == [
        ("folder/d2/train", "training"), ("folder/d2/test", "testing"),
        ("folder/d1/train", "training"), ("folder/d1/test", "testing")]
    splits = read_splits(params.data.splits_file)
    image_dir = images_root(params.data.root, splits)
    for i in inputs:
        files = splits["splits"][i.tags["domain"]][i.tags["split"]]
        shas = [hashlib.sha256((image_dir / f).read_bytes()).hexdigest() for f in files]
        assert i.dataset.digest == hashlib.sha256("\n".join(shas).encode()).hexdigest()[:16]
        assert i.tags == {"dataset": "folder", "domain": i.tags["domain"],
                          "split": i.tags["split"], "images": str(len(files))}
    assert len({i.dataset.digest for i in inputs}) == 4


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with two training runs and one evaluation, written by the pipeline's stages."""
    with ray_test_env(tmp_path_factory.mktemp("ui")) as root:
        params = prepared({**TINY, "train": {**TINY["train"], "steps": 2, "eval_every": 2},
                           "study": {}})
        for method in ("erm", "pgd_at"):
            stages.train_run(params, method, "grass", 0)
        stages.evaluate_run(params, "erm", "grass", 0)
        yield root


@pytest.mark.slow
def test_every_run_logs_its_splits_as_dataset_inputs(store):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("egat")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == set(RUNS)
    inputs = {name: sorted((i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"])
                           for i in r.inputs.dataset_inputs) for name, r in runs.items()}
    assert inputs["train/erm/grass/seed0"] == [("embedded/grass/train", "training"),
                                               ("embedded/grass/val", "validation")]
    domains = ["brick", "camera", "grass", "gravel"]
    assert inputs["evaluate/erm/grass/seed0"] == [(f"embedded/{d}/test", "testing") for d in domains]
    train_digests = {i.dataset.digest for r in RUNS[:2] for i in runs[r].inputs.dataset_inputs
                     if i.dataset.name == "embedded/grass/train"}
    assert len(train_digests) == 1  # the same data, the same digest


def chromium(browser: str, *args: str, timeout: float = 180) -> str:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        out = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={profile}", "--window-size=1600,1000",
             "--virtual-time-budget=30000", *args],
            check=True, capture_output=True, text=True, timeout=timeout,
        )
    return out.stdout


@pytest.fixture()
def server(store, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}"],
        env=env_for(tmp_path, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(uri, 60)
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_the_ui_opens_the_experiment_on_its_runs_table(store, server, tmp_path):
    browser = CHROMIUM["find_chromium"]()
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium)")
    import mlflow

    exp = mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}").get_experiment_by_name("egat")
    # MLflow 3.17's UI takes the experiment's kind from its GenAI / Model training switch (kept
    # per browser, GenAI at first) or this query, not from the tag: the README's link has it.
    page = f"{server}/#/experiments/{exp.experiment_id}?workflowType=machine_learning"
    dom = chromium(browser, "--dump-dom", page)
    missing = [name for name in RUNS if name not in dom]
    assert not missing, f"the experiment's page does not list {missing}"
    # The Dataset column: a training run's first input, an evaluation's first test split.
    assert "embedded/grass/train" in dom
    assert any(f"embedded/{d}/test" in dom for d in ("brick", "camera", "grass", "gravel"))
    shot = tmp_path / "runs_table.png"
    chromium(browser, f"--screenshot={shot}", page)
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1600, 1000)
        assert len(img.convert("RGB").getcolors(1 << 20) or []) > 50  # a drawn page, not a blank one
    print(f"screenshot: {shot}")

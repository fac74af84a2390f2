"""`egat explain`: overlays and top classes for any image file, from a checkpoint or an MLflow run
(a real sqlite store), and one clear error line for bad input."""

import cv2
import numpy as np
import pytest

from egat.cli import main
from egat.heatmaps import output_paths, overlay
from egat.tracking.mlflow_tracker import MlflowTracker
from egat.train import Trainer
from tests.helpers import prepared

TINY = {
    "data": {"embedded": {"per_class": 10}},
    "train": {"method": "erm", "domains": ["grass"], "steps": 2, "batch_size": 16, "eval_every": 2,
              "progress": False},
    "eval": {"attack": {"steps": 2}},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint, MLflow run id, tracking URI, an image file) of a 2-step ERM run."""
    root = tmp_path_factory.mktemp("explain")
    params = prepared(TINY, root / "data")
    ckpt = Trainer(params, root / "run").fit().best_checkpoint
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)
        with MlflowTracker("train/erm/grass/seed0", {"stage": "train"}) as tracker:
            tracker.log_artifact(ckpt, "checkpoint")
    image = next((root / "data" / "embedded" / "images").rglob("*.png"))
    big = root / "big photo.jpg"  # another format and size than the training images
    cv2.imwrite(str(big), cv2.resize(cv2.imread(str(image)), (97, 61)))
    return ckpt, tracker.run_id, uri, image, big


def explain(capsys, monkeypatch, cwd, *args):
    monkeypatch.chdir(cwd)
    try:
        main(["explain", *map(str, args)])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow  # shares a 12 s fixture: prepare + 2 training steps + MLflow
@pytest.mark.parametrize("explainer", ["gradcam", "smoothgrad", "ig", "finercam"])
def test_checkpoint_overlays_and_top_classes(trained, explainer, tmp_path, capsys, monkeypatch):
    ckpt, _, _, image, big = trained
    code, out, err = explain(capsys, monkeypatch, tmp_path, image, big, "--checkpoint", ckpt,
                             "--explainer", explainer, "--attack", "pgd", "--out", "heat.png")
    assert code == 0, err
    lines = out.splitlines()
    first = lines[0]
    assert first.startswith(f"{image}: ")
    probs = [float(item.rsplit(" ", 1)[1]) for item in first.split(": ", 1)[1].split(", ")]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert lines[1].startswith(f"{image} under pgd: ")
    written = {
        "heat_" + image.stem + ".png": (32, 32), "heat_" + image.stem + "_pgd.png": (32, 32),
        "heat_big photo.png": (61, 97), "heat_big photo_pgd.png": (61, 97),
    }
    for name, shape in written.items():
        img = cv2.imread(str(tmp_path / name))
        assert img is not None and img.shape[:2] == shape, name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)  # no temp files left


@pytest.mark.slow  # shares a 12 s fixture: prepare + 2 training steps + MLflow
def test_run_id_from_mlflow(trained, tmp_path, capsys, monkeypatch):
    ckpt, run_id, uri, image, _ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, out, err = explain(capsys, monkeypatch, tmp_path, image, "--run", run_id, "--out", "one.png")
    assert code == 0, err
    assert (tmp_path / "one.png").is_file() and "wrote one.png" in out
    # The same checkpoint gives the same top classes.
    code, ref, _ = explain(capsys, monkeypatch, tmp_path, image, "--checkpoint", ckpt, "--out", "two.png")
    assert code == 0 and ref.splitlines()[0] == out.splitlines()[0]


@pytest.mark.slow  # shares a 12 s fixture: prepare + 2 training steps + MLflow
def test_bad_input_is_one_error_line(trained, tmp_path, capsys, monkeypatch):
    ckpt, _, uri, image, _ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "notes.png").write_text("not an image")
    cases = [
        ([tmp_path / "notes.png", "--checkpoint", ckpt], "notes.png: not an image OpenCV can decode"),
        ([tmp_path / "missing.png", "--checkpoint", ckpt], "missing.png: cannot read this file"),
        ([image, "--checkpoint", ckpt, "--explainer", "lime"], "unknown explainer 'lime'; valid: "),
        ([image, "--run", "0123abcd"], "MLflow run '0123abcd' does not exist in the store sqlite:"),
    ]
    for args, needle in cases:
        code, _, err = explain(capsys, monkeypatch, tmp_path, *args, "--out", "x.png")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    code, _, err = explain(capsys, monkeypatch, tmp_path, image, "--out", "x.png")
    assert code == 2 and "exactly one of --run MLFLOW_RUN_ID or --checkpoint PATH" in err
    assert not (tmp_path / "x.png").exists()


def test_overlay_blends_the_jet_colour_map():
    rgb = np.full((4, 6, 3), 200, np.uint8)
    out = overlay(rgb, np.ones((2, 3), np.float32))  # map 1 everywhere: JET's dark red
    jet_top = cv2.applyColorMap(np.array([[255]], np.uint8), cv2.COLORMAP_JET)[0, 0][::-1]
    assert out.shape == (4, 6, 3)
    assert np.abs(out.astype(int) - (0.5 * jet_top + 0.5 * 200).round()).max() <= 1


def test_output_paths_name_each_image(tmp_path):
    from pathlib import Path

    assert output_paths(tmp_path / "o.png", [Path("a/cat.jpg")], None) == [[tmp_path / "o.png"]]
    assert output_paths(tmp_path / "o.png", [Path("a/cat.jpg")], "pgd") == [
        [tmp_path / "o.png", tmp_path / "o_pgd.png"]]
    with pytest.raises(Exception, match="share a file name stem"):
        output_paths(tmp_path / "o.png", [Path("a/cat.jpg"), Path("b/cat.png")], None)

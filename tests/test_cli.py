"""The command line: one clear error line and exit status 2 for bad input."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from egat.cli import main

EGAT = [sys.executable, "-m", "egat.cli"]
ROOT = Path(__file__).resolve().parents[1]


def egat(*args, cwd=ROOT):
    """The real entry point in a subprocess (slow to start: torch imports)."""
    return subprocess.run([*EGAT, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def egat_in_process(capsys, monkeypatch, cwd, *args) -> tuple[int, str]:
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    return exit_.value.code, capsys.readouterr().err


def test_methods_lists_the_registry():
    out = egat("methods")
    assert out.returncode == 0
    rows = {name: description.strip() for name, _, description in
            (line.partition(" ") for line in out.stdout.splitlines())}
    assert {"erm", "egat", "egat_wo_at", "egat_wo_egl"} <= set(rows)
    assert [name for name, description in rows.items() if not description] == []
    assert rows["egat"].startswith("L = CE + lambda_adv L_adv")
    out = egat("train", "--set", "train.method=nope", cwd=ROOT)
    assert out.returncode == 2 and out.stderr.startswith("error: ")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--set", "train.method=nope"], "train.method='nope' is unknown; valid: "),
        (["train", "--set", "model.name=vgg"], "model.name='vgg' is unknown; valid: "),
        (["train", "--set", "data.name=imagenet"], "data.name: Input should be 'embedded'"),
        (["train", "--set", "attack.eps=-0.1"], "attack.eps: Input should be greater than or equal to 0"),
        (["train", "--set", "methods.egat.lambda_adv=-1"], "methods.egat.lambda_adv"),
        (["train", "--config", "missing.yaml"], "missing.yaml: params file not found"),
        (["evaluate", "--checkpoint", "nowhere/best.pt"], "checkpoint 'nowhere/best.pt' not found"),
    ],
)
def test_bad_input_is_one_error_line(args, needle, tmp_path, capsys, monkeypatch):
    cfg = [] if "--config" in args or args[0] == "evaluate" else ["--config", str(ROOT / "params.yaml")]
    code, err = egat_in_process(capsys, monkeypatch, tmp_path, *args[:1], *cfg, *args[1:])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0]


def test_missing_data_says_what_to_run(tmp_path, capsys, monkeypatch):
    code, err = egat_in_process(capsys, monkeypatch, tmp_path, "train", "--config",
                                str(ROOT / "params.yaml"), "--set", "data.dir=nowhere")
    assert code == 2
    assert "splits.json not found: run `dvc repro prepare`" in err
    assert not (tmp_path / "runs").exists()


def test_evaluating_a_training_state_names_best_pt(tmp_path, capsys, monkeypatch):
    torch.save({"model": {}, "optimizer": {}, "state": {}}, tmp_path / "last.pt")
    code, err = egat_in_process(capsys, monkeypatch, tmp_path, "evaluate", "--checkpoint", "last.pt")
    assert code == 2
    assert err.strip() == (
        "error: 'last.pt' is not a model checkpoint (params, classes, model); pass a run's best.pt "
        "(last.pt holds the training state for resuming)"
    )


def test_skipped_corrupt_files_warn_in_one_clean_line(tmp_path):
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for domain in ("d1", "d2"):
        for cls in ("a", "b"):
            (tmp_path / "tree" / domain / cls).mkdir(parents=True)
            for i in range(5):
                cv2.imwrite(str(tmp_path / "tree" / domain / cls / f"{i}.png"),
                            rng.integers(0, 256, (16, 16, 3), np.uint8))
    (tmp_path / "tree/d1/a/bad.png").write_bytes(b"junk")
    out = egat("prepare", "--config", str(ROOT / "params.yaml"), "--set", "data.name=folder",
               "--set", "data.folder_root=tree", "--set", "data.dir=data", "--set", "data.on_corrupt=skip",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    # One line, no "UserWarning:" and no Python source line after it.
    assert out.stderr.splitlines() == [
        "warning: tree: 1 unreadable, corrupt or non-image files (d1/a/bad.png); skipped "
        "(data.on_corrupt=skip)"]

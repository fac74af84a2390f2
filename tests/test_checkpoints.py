"""Damaged checkpoints: `egat evaluate`, `egat explain` and a resumed run end with one `error:`
line naming the file and what was expected (exit status 2); a damaged last.pt never makes a run
silently start over, and `train.resume=false` is the way to start over."""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np
import pytest
import torch
import yaml

from egat import io
from egat.cli import main
from egat.errors import CheckpointError
from egat.train.trainer import Trainer
from tests.helpers import tiny_folder_data
from tests.test_cli import egat_in_process

TINY_TRAIN = {"train": {"method": "erm", "steps": 4, "batch_size": 8, "eval_every": 2,
                        "checkpoint_every": 2, "progress": False, "domains": ["d1"]},
              "eval": {"batch_size": 8}}


def damaged(kind: str, path, good_bytes: bytes):
    """Write a damaged checkpoint of ``kind`` to ``path``; returns what the error must say."""
    if kind == "truncated":
        path.write_bytes(good_bytes[: len(good_bytes) // 2])
        return "truncated or corrupt"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
        return "not a file written by torch.save"
    if kind == "empty":
        path.write_bytes(b"")
        return "an empty file"
    # a real torch.save archive, but pickling an object weights_only refuses
    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, path)
    return "refused: it pickles objects of type argparse.Namespace"


KINDS = ["truncated", "random", "empty", "foreign"]


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "ok.pt"
    torch.save({"model": {"w": torch.zeros(64, 64)}}, path)
    return path.read_bytes()


@pytest.mark.parametrize("kind", KINDS)
def test_torch_load_names_the_file_the_problem_and_what_was_expected(kind, good_bytes, tmp_path):
    path = tmp_path / "x.pt"
    needle = damaged(kind, path, good_bytes)
    with pytest.raises(CheckpointError) as exc:
        io.torch_load(path, "a thing")
    message = str(exc.value)
    assert message.startswith(f"{path}: ") and needle in message and message.endswith("; expected a thing")
    assert "\n" not in message


@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_and_explain_refuse_a_damaged_checkpoint_in_one_line(
        kind, good_bytes, tmp_path, capsys, monkeypatch):
    needle = damaged(kind, tmp_path / "best.pt", good_bytes)
    image = tmp_path / "cat.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    expected = "expected a model checkpoint written by egat train (a run's best.pt)"
    for args in (["evaluate", "--checkpoint", "best.pt"],
                 ["explain", "cat.png", "--checkpoint", "best.pt", "--out", "heat.png"]):
        code, err = egat_in_process(capsys, monkeypatch, tmp_path, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (args, err)
        assert lines[0].startswith("error: best.pt: ") and needle in lines[0] and expected in lines[0]
    assert not (tmp_path / "heat.png").exists()


@pytest.fixture(scope="module")
def folder_params(tmp_path_factory) -> dict:
    return {**tiny_folder_data(tmp_path_factory.mktemp("resume")), **TINY_TRAIN}


def config_file(tmp_path, raw: dict):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_last_pt_stops_the_run_and_names_train_resume(
        kind, folder_params, good_bytes, tmp_path, capsys, monkeypatch):
    from egat.build import params_from_dict

    run = tmp_path / "run"
    Trainer(params_from_dict(folder_params), run).fit()
    best = (run / "best.pt").read_bytes()
    needle = damaged(kind, run / "last.pt", good_bytes)
    damaged_bytes = (run / "last.pt").read_bytes()
    cfg = config_file(tmp_path, folder_params)
    code, err = egat_in_process(capsys, monkeypatch, tmp_path, "train", "--config", str(cfg),
                                "--run-dir", "run", "--set", "train.steps=6")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: cannot resume: run/last.pt: ") and needle in lines[0]
    assert "start this run over with train.resume=false" in lines[0]
    # Nothing was trained or overwritten: the damaged file and the best checkpoint are as they were.
    assert (run / "last.pt").read_bytes() == damaged_bytes and (run / "best.pt").read_bytes() == best


def test_a_training_state_of_the_wrong_shape_is_no_resume_point(folder_params, tmp_path):
    from egat.build import params_from_dict

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {}}, run / "last.pt")  # loads, but holds no optimizer, state, fingerprint
    with pytest.raises(CheckpointError, match=r"cannot resume: .*last.pt is no training state .*"
                                              r"train.resume=false"):
        Trainer(params_from_dict(folder_params), run).fit()


def test_train_resume_false_discards_last_pt_and_starts_over(folder_params, good_bytes, tmp_path,
                                                              monkeypatch):
    from egat.build import params_from_dict

    reference = Trainer(params_from_dict(folder_params), tmp_path / "reference").fit()
    run = tmp_path / "run"
    run.mkdir()
    damaged("truncated", run / "last.pt", good_bytes)
    cfg = config_file(tmp_path, folder_params)
    monkeypatch.chdir(tmp_path)
    main(["train", "--config", str(cfg), "--run-dir", "run", "--set", "train.resume=false"])
    # A fresh run from step 0: the same metrics as the uninterrupted reference, a valid last.pt.
    assert json.loads((run / "train_metrics.json").read_text()) == json.loads(
        (reference.run_dir / "train_metrics.json").read_text())
    assert io.torch_load(run / "last.pt")["state"]["step"] == 4


def test_a_finished_run_retrains_when_its_images_changed(tmp_path, caplog):
    from egat import stages
    from egat.build import params_from_dict

    params = params_from_dict({**tiny_folder_data(tmp_path), **TINY_TRAIN})
    run = tmp_path / "run"
    Trainer(params, run).fit()
    first = (run / "best.pt").read_bytes()
    Trainer(params, run).fit()  # finished, same params and images: nothing is trained again
    assert (run / "best.pt").read_bytes() == first
    # One image of the training domain edited in place (what `dvc repro` reruns train for).
    cv2.imwrite(str(tmp_path / "tree/d1/a/0.png"), np.full((16, 16, 3), 255, np.uint8))
    stages.prepare(params)
    stages.guides(params)
    with caplog.at_level("WARNING"):
        Trainer(params, run).fit()
    assert "holds a run with other params or data: starting afresh" in caplog.text
    assert (run / "best.pt").read_bytes() != first

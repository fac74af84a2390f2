"""Determinism: the same params and seed give byte-identical metrics files on CPU across two runs
(separate processes, one worker): train_metrics.json and the evaluation JSON."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import tiny_folder_data

ROOT = Path(__file__).resolve().parents[1]
BUDGET = {
    "train": {"method": "egat", "steps": 6, "batch_size": 16, "eval_every": 3, "checkpoint_every": 3,
              "progress": False, "use_gpu": "false", "backend": "local", "val_metrics": ["aacc"]},
    "data": {"augment": True},
    "attack": {"steps": 2},
    "eval": {"max_examples": 0, "batch_size": 8, "attack": {"steps": 2},
             "sweep": {"attacks": ["fgsm", "mifgsm", "pgd"], "eps": [0.01, 0.03], "steps": 2}},
}


def egat(*args: str, cwd: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "egat.cli", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_two_cpu_runs_write_byte_identical_metrics(tmp_path):
    data = tiny_folder_data(tmp_path)
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump({**BUDGET, "data": {**data["data"], **BUDGET["data"]}}))
    files = []
    for name in ("first", "second"):
        run_dir = tmp_path / name
        egat("train", "--config", str(config), "--run-dir", str(run_dir), cwd=tmp_path)
        egat("evaluate", "--checkpoint", str(run_dir / "best.pt"), "--out", str(run_dir / "eval.json"),
             cwd=tmp_path)
        files.append([(run_dir / f).read_bytes() for f in ("train_metrics.json", "eval.json")])
    assert files[0] == files[1]
    assert b'"aacc"' in files[0][1] and b'"steps": 6' in files[0][0]

"""egat.run: the run layout has one home (no module but egat/run/layout.py spells a run's file or
folder names; docstrings and comments may mention them), and one rule chooses the device."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from egat.build import params_from_dict
from egat.errors import EgatError
from egat.run.device import choose_gpu, resolve_device
from egat.run.layout import (
    BEST, EVAL_FILE, EVALS, LAST, METRICS, ROBUST_FILE, TIMING, VARIANTS, CellFile, cell_files,
    eval_path,
)

PACKAGE = Path(__file__).resolve().parents[1] / "egat"
LAYOUT = PACKAGE / "run" / "layout.py"
FILE_NAMES = (BEST, LAST, METRICS, TIMING, EVAL_FILE, ROBUST_FILE)
FOLDER_NAMES = (VARIANTS, EVALS)
SPELLED = re.compile(
    "|".join([*(rf"(?<![\w.]){re.escape(name)}(?!\w)" for name in FILE_NAMES),
              *(rf"^{name}$|(^|/){name}/|/{name}$" for name in FOLDER_NAMES)])
)
# Pydantic validators name params keys (studies.variants), not folders.
KEY_CALLS = {"field_validator", "model_validator"}


def spelled_run_paths(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string literal in ``source`` that spells a run file or folder name,
    docstrings and params-key arguments of pydantic validators left out."""
    tree = ast.parse(source)
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            skipped.add(id(node.value))  # a docstring (or another bare string statement)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in KEY_CALLS:
            skipped.update(id(arg) for arg in node.args)
    return sorted((node.lineno, node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and id(node) not in skipped and SPELLED.search(node.value))


def test_no_module_but_the_layout_spells_a_run_path():
    found = {
        f"{path.relative_to(PACKAGE.parent)}:{line}": text
        for path in sorted(PACKAGE.rglob("*.py")) if path != LAYOUT
        for line, text in spelled_run_paths(path.read_text())
    }
    assert not found, f"run paths spelled outside egat/run/layout.py (use its names): {found}"


def test_the_check_finds_spelled_names_and_skips_prose_and_params_keys():
    source = '''"""Writes best.pt and evals/variants/... (prose)."""
a = "best.pt"
b = f"runs/{x}/last.pt"
c = Path(root) / "variants"
d = "evals/x"
e = "not_best.pt.bak and evals_of"
@field_validator("variants")
def f():
    """eval.json"""
    return help("the eval.json of a run")
'''
    assert [line for line, _ in spelled_run_paths(source)] == [2, 3, 4, 5, 10]


def test_cell_files_finds_seed_folders_in_path_order(tmp_path):
    for name, domain, seed in [("erm", "grass", 1), ("erm", "grass", 0), ("egat", "sand", 2)]:
        eval_path(name, domain, seed, tmp_path).parent.mkdir(parents=True)
        eval_path(name, domain, seed, tmp_path).write_text("{}")
    (tmp_path / "erm" / "grass" / "seedx").mkdir()
    (tmp_path / "erm" / "grass" / "seedx" / EVAL_FILE).write_text("{}")  # not a seed folder
    assert [(f.name, f.domain, f.seed) for f in cell_files(tmp_path, EVAL_FILE)] == [
        ("egat", "sand", 2), ("erm", "grass", 0), ("erm", "grass", 1)]
    assert all(isinstance(f, CellFile) and f.path.is_file() for f in cell_files(tmp_path, EVAL_FILE))


@pytest.mark.parametrize("want, gpus, chosen", [
    ("auto", 0, False), ("auto", 2, True), ("false", 2, False), ("true", 1, True),
])
def test_choose_gpu(want, gpus, chosen):
    assert choose_gpu(want, gpus, "none here") is chosen


def test_true_without_a_gpu_names_where_none_was_found(monkeypatch):
    with pytest.raises(EgatError, match=r"^train.use_gpu=true but none here; use 'auto' or 'false'$"):
        choose_gpu("true", 0, "none here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(params_from_dict({})) == torch.device("cpu")
    with pytest.raises(EgatError, match="no CUDA device is visible"):
        resolve_device(params_from_dict({"train": {"use_gpu": "true"}}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(params_from_dict({})) == torch.device("cuda")
    assert resolve_device(params_from_dict({"train": {"use_gpu": "false"}})) == torch.device("cpu")

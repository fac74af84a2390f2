"""Your own data through the DVC pipeline: the README's folder line runs as written, and DVC sees
added, removed and edited images of the tree (real DVC and MLflow, nothing mocked)."""

from __future__ import annotations

import json
import re
import shlex

import cv2
import mlflow
import numpy as np
import pytest

from tests.test_pipeline import ROOT, TINY, env_for, init_project, run

FOLDER_TINY = {**TINY, "data": {}, "study": {"methods": ["erm"], "seeds": [0]},
               # 3 classes: APGD-T's DLR loss needs 4 (the README's folder line says so); 6 test images
               "robust": {**TINY["robust"], "transfer_from": "erm", "transfer_fallback": "erm",
                          "subset": "all",
                          "attack": {**TINY["robust"]["attack"], "ensemble": ["apgd", "square"]}}}


def readme_folder_line(root, domain: str) -> list[str]:
    """The README's `dvc exp run -S data.name=folder ...` command with its placeholders filled."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("dvc exp run -S data.name=folder"))
    line = line.replace("/path/to/<root>", str(root)).replace("<domain>", domain)
    assert "<" not in line.split("#")[0], line
    return shlex.split(line, comments=True)


def write_tree(root) -> None:
    rng = np.random.default_rng(0)
    for domain in ("d1", "d2"):
        for cls in ("a", "b", "c"):
            (root / domain / cls).mkdir(parents=True)
            for i in range(12):
                cv2.imwrite(str(root / domain / cls / f"{i}.png"), rng.integers(0, 256, (32, 32, 3), np.uint8))


def stale(proj, env) -> dict:
    return json.loads(run(["dvc", "status", "--json"], proj, env).strip().splitlines()[-1])


def ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out))


ALL = {"prepare", "guides", "train@erm-d1-0", "evaluate@erm-d1-0", "report", "studies"}


@pytest.mark.slow
def test_the_readme_folder_line_runs_and_dvc_sees_every_change_of_the_tree(tmp_path):
    tree = tmp_path / "photos"
    write_tree(tree)
    proj = tmp_path / "proj"
    proj.mkdir()
    env = init_project(proj, FOLDER_TINY)  # study.train_domains stays the embedded [grass]
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    out = run(readme_folder_line(tree, "d1"), proj, env, timeout=1800)
    assert ran(out) == ALL
    assert json.loads((proj / "evals/erm/d1/seed0/eval.json").read_text())["train_domains"] == ["d1"]
    client = mlflow.MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("egat").experiment_id])
    assert {r.data.tags["egat_key"]: r.info.status for r in runs} == {
        "train/erm/d1/seed0": "FINISHED", "evaluate/erm/d1/seed0": "FINISHED",
        "robustness/erm/d1/seed0": "FINISHED", "studies": "FINISHED"}
    assert stale(proj, env) == {}

    # An added, an edited (same path) and a removed image: prepare is stale (its dependency on
    # the tree), prepare and guides rerun, and the training cell is stale after them (it then
    # retrains on the new images: tests/test_checkpoints.py).
    for change in (lambda: cv2.imwrite(str(tree / "d1/a/new.png"), np.zeros((32, 32, 3), np.uint8)),
                   lambda: cv2.imwrite(str(tree / "d1/b/0.png"), np.full((32, 32, 3), 255, np.uint8)),
                   lambda: (tree / "d1/c/3.png").unlink()):
        change()
        assert stale(proj, env) == {"prepare": [{"changed deps": {str(tree): "modified"}}]}
        assert ran(run(["dvc", "repro", "guides"], proj, env)) == {"prepare", "guides"}
        assert {"train@erm-d1-0", "studies"} <= set(stale(proj, env))
        run(["dvc", "commit", "-f", "-q"], proj, env)  # the next change starts from an up-to-date project

"""Robust evaluation (stage `evaluate`, egat/robustness.py): stratified subsets, the
gradient-masking checklist on a plain and a deliberately masked model, the stage's outputs and
its bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from egat.build import params_from_dict
from egat.errors import EgatError, ParamsError
from egat.robustness import robust_metrics, robust_run, stratified_subset
from egat.run.layout import ROBUST_TIMING, eval_path, robust_path, run_dir
from tests.test_autoattack import EPS, linear_problem

# the checklist at test scale: cheap attacks, one large eps for (a)
CHEAP = {
    "eval": {"attack": {"steps": 10}},
    "robust": {"attack": {"steps": 10, "targets": 4, "queries": 300},
               "checklist": {"eps": [4 / 255, 8 / 255, 64 / 255], "steps_factor": 2,
                             "restarts": 2}},
}


class Quantise(nn.Module):
    """A non-differentiable input layer: pixels rounded to 32 levels (step ~ eps). Its gradient is
    zero everywhere, so gradient attacks see nothing, while the model stays as breakable."""

    def forward(self, x):
        return torch.round(x * 32) / 32


def batches(x, y, size=8):
    return [{"image": x[i:i + size], "label": y[i:i + size]} for i in range(0, len(y), size)]


def checklist(model, x, y, transfer_model=None, **overrides):
    params = params_from_dict({**CHEAP, **overrides})
    return robust_metrics(model, params, batches(x, y), "cpu", transfer_model)


@pytest.fixture(scope="module")
def problem():
    return linear_problem(classes=5, n=24)


def test_a_plain_linear_model_passes_the_checklist(problem):
    model, x, y, robust = problem
    other = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))  # another (random) linear model
    result = checklist(model, x, y, transfer_model=other)
    assert result["n"] == 24 and result["clean"] == 100.0
    # AutoAttack reaches the closed-form optimum: exactly the breakable half is fooled
    assert result["aa"] == pytest.approx(100.0 * robust.float().mean().item())
    assert sum(result["aa_fooled_by"].values()) == int((~robust).sum())
    checks = result["checks"]
    assert checks["a"]["accuracy"][-1] == 0.0  # 64/255 breaks every image
    assert checks["c"]["square"] >= checks["c"]["apgd"]
    assert checks["e"]["rising_fraction"] == 1.0 and checks["e"]["flat_fraction"] == 0.0
    assert result["failed"] == [], result["checks"]


def test_a_quantising_input_layer_fails_checks_c_and_e(problem):
    linear, x, y, robust = problem
    masked = nn.Sequential(Quantise(), linear)
    with torch.no_grad():
        assert torch.equal(masked(x).argmax(1), y)
    result = checklist(masked, x, y)
    checks = result["checks"]
    # black-box Square fools images the zero gradients hide from APGD: (c) fails
    assert checks["c"]["square"] < checks["c"]["apgd"]
    # the loss along the gradient sign is exactly flat: (e) fails
    assert checks["e"]["rising_fraction"] == 0.0 and checks["e"]["flat_fraction"] == 1.0
    assert {"c", "e"} <= set(result["failed"])
    assert "d" not in checks  # no transfer model given


def test_the_checklist_is_deterministic(problem):
    model, x, y, _ = problem
    x, y = x[6:18], y[6:18]  # robust and breakable images
    first, second = checklist(model, x, y), checklist(model, x, y)
    first.pop("seconds"), second.pop("seconds")
    assert first == second


def test_stratified_subset_is_equal_per_class_and_seeded():
    labels = torch.arange(5).repeat_interleave(20)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    chosen = stratified_subset(labels, 23, seed=0)
    assert len(chosen) == len(set(chosen)) == 23 and chosen == sorted(chosen)
    counts = torch.bincount(labels[chosen], minlength=5).tolist()
    assert sorted(counts) == [4, 4, 5, 5, 5]
    assert stratified_subset(labels, 23, seed=0) == chosen
    assert stratified_subset(labels, 23, seed=1) != chosen
    assert len(stratified_subset(labels, 100, seed=0)) == 100


@pytest.mark.parametrize("n, needle", [
    (0, "robust.subset=0: must lie in 1..100"), (101, "robust.subset=101: must lie in 1..100"),
])
def test_stratified_subset_rejects_sizes_outside_the_split(n, needle):
    with pytest.raises(EgatError, match=needle.replace(".", r"\.")):
        stratified_subset(torch.arange(5).repeat_interleave(20), n, seed=0)


def test_stratified_subset_fills_a_small_class_from_the_others():
    labels = torch.tensor([0] * 10 + [1] * 2)
    chosen = stratified_subset(labels, 8, seed=0)
    assert len(chosen) == 8 and torch.bincount(labels[chosen]).tolist() == [6, 2]


@pytest.mark.parametrize("key, value, needle", [
    ("robust.attack.name", "foo", "robust.attack.name: Input should be"),
    ("robust.attack.eps", -0.1, "robust.attack.eps: Input should be greater than or equal to 0"),
    ("robust.attack.restarts", 0, "robust.attack.restarts: Input should be greater than or equal to 1"),
    ("robust.subset", 0, "robust.subset: must be an integer >= 1"),
    ("robust.attack.name", "free", "robust.attack: name='free' is a training-time attack"),
    ("robust.transfer_from", "nope", "robust.transfer_from='nope' is unknown"),
    ("robust.checklist.eps", [0.1, 0.05], "robust.checklist.eps: eps must be a non-empty increasing"),
    ("eval.sweep.attacks", ["square"], "eval.sweep.attacks.0: Input should be"),
    ("eval.sweep.eps", [0.02, 0.01], "eval.sweep.eps: eps must be a non-empty increasing"),
    ("eval.sweep.eps", [], "eval.sweep.eps: eps must be a non-empty increasing"),
])
def test_bad_params_name_the_key(key, value, needle):
    group, *rest = key.split(".")
    raw = {}
    node = raw.setdefault(group, {})
    for part in rest[:-1]:
        node = node.setdefault(part, {})
    node[rest[-1]] = value
    with pytest.raises(ParamsError) as err:
        params_from_dict(raw)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_transfer_sources_outside_the_study_are_refused_before_dvc_meets_them():
    # Every robustness cell depends on both sources' runs: DVC would stop on a missing path.
    with pytest.raises(ParamsError) as err:
        params_from_dict({"study": {"methods": ["erm", "egat"]}})
    assert str(err.value).endswith(
        "robust.transfer_fallback='pgd_at' is not in study.methods (erm, egat), so its runs are "
        "never trained; set it to one of them")
    params_from_dict({"study": {"methods": ["erm", "egat"]}, "robust": {"transfer_fallback": "egat"}})


# --- the stage on real (tiny) data and checkpoints ------------------------------------------------

@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    """A tiny folder dataset (3 classes, 6 test images per domain) and two 2-step runs."""
    from egat import stages
    from egat.train.launch import fit
    from tests.helpers import tiny_folder_data

    root = tmp_path_factory.mktemp("robust")
    raw = tiny_folder_data(root)
    raw["train"] = {"steps": 2, "batch_size": 4, "out_dir": str(root / "runs"), "progress": False,
                    "backend": "local", "eval_every": 2, "checkpoint_every": 2}
    raw["robust"] = {"subset": 3, "attack": {"steps": 2, "queries": 5, "ensemble": ["apgd", "square"]},
                     "checklist": {"eps": [8 / 255, 64 / 255], "steps_factor": 1, "restarts": 1,
                                   "scan_points": 3}}
    raw["eval"] = {"attack": {"steps": 2}}
    params = params_from_dict(raw)
    for method in ("erm", "pgd_at"):
        fit(stages.run_params(params, method, "d1", 0), run_dir(params, method, "d1", 0))
    return root, raw


@pytest.mark.slow
def test_the_stage_writes_robust_json_and_logs_to_mlflow(cell, monkeypatch):
    import mlflow

    root, raw = cell
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.chdir(root)
    result = robust_run(params_from_dict(raw), "pgd_at", "d1", 0, evals_root=root / "evals")
    saved = json.loads(robust_path("pgd_at", "d1", 0, root / "evals").read_text())
    assert saved["n"] == 3 and saved["transfer_from"] == "erm" and "seconds" not in saved
    assert set(saved["checks"]) == {"a", "b", "c", "d", "e"}
    assert saved["aa"] == result["aa"] and result["seconds"]["aa"] > 0
    # the seconds go beside it (benchmarks/breakdown.py reads them)
    timing = json.loads(robust_path("pgd_at", "d1", 0, root / "evals").with_name(
        ROBUST_TIMING).read_text())
    assert timing["total"] == pytest.approx(sum(result["seconds"].values()))
    runs = mlflow.search_runs(search_all_experiments=True,
                              filter_string="tags.egat_key = 'robustness/pgd_at/d1/seed0'")
    assert len(runs) == 1 and "metrics.robust/aa" in runs


@pytest.mark.parametrize("command", [["robustness-cell"], ["evaluate-cell", "--robustness"]])
@pytest.mark.parametrize("overrides, needle", [
    ({"subset": 7}, "robust.subset=7: must lie in 1..6"),
    ({"transfer_from": "egat"}, "robust.transfer_from: check (d) needs egat's run of d1/seed0"),
    ({"attack": {"ensemble": ["apgd", "apgdt"]}}, "robust.attack: apgdt (targeted DLR) needs >= 4"),
])
def test_the_stage_refuses_bad_requests_before_any_side_effect(cell, command, overrides, needle,
                                                               capsys, monkeypatch):
    # evaluate-cell --robustness (stage `evaluate`) checks them before it evaluates
    import yaml

    from egat.cli import main

    root, raw = cell
    raw = {**raw, "robust": {**raw["robust"], **overrides,
                             "attack": {**raw["robust"]["attack"], **overrides.get("attack", {})}}}
    config = root / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'refused.db'}")
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--config", str(config), "--method", "erm", "--domain", "d1",
              "--seed", "0"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert needle in lines[0]
    assert not (root / "refused.db").exists() and not robust_path("erm", "d1", 0).exists()
    assert not eval_path("erm", "d1", 0).exists()


def test_robustness_is_refused_for_a_studies_variant(capsys):
    from egat.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["evaluate-cell", "--variant", "oracle", "--domain", "grass", "--seed", "0",
              "--robustness"])
    assert exit_.value.code == 2
    assert "--robustness takes a --method cell" in capsys.readouterr().err

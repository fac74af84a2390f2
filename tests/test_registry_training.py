"""Every registered method trains a few steps on real (tiny) embedded data, saves a checkpoint,
and evaluates on every domain, through the same Trainer and evaluation the pipeline uses."""

import math

import pytest

from egat.build import params_from_dict
from egat.evaluation import evaluate_checkpoint
from egat.methods import method_registry
from egat.train import Trainer
from tests.helpers import prepared

TINY = {
    "data": {"embedded": {"per_class": 12}},
    "train": {"steps": 2, "batch_size": 16, "eval_every": 2, "progress": False},
    "attack": {"steps": 2},
    "methods": {"ign": {"m": 2, "attack_m": 2, "steps": 1}},
    "eval": {"max_examples": 8, "batch_size": 8, "attack": {"steps": 1},
             "sweep": {"attacks": ["fgsm"], "eps": [0.01], "max_examples": 8}},
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    prepared(TINY, root / "data")
    return root / "data"


@pytest.mark.parametrize("method", method_registry.names())
def test_method_trains_checkpoints_and_evaluates(method, data_dir, tmp_path):
    raw = {**TINY, "data": {**TINY["data"], "dir": str(data_dir)},
           "train": {**TINY["train"], "method": method, "domains": ["grass"]}}
    params = params_from_dict(raw)
    result = Trainer(params, tmp_path / "run").fit()
    assert result.best_checkpoint.is_file() and (tmp_path / "run" / "last.pt").is_file()
    assert 0 <= result.metrics["best_val_acc"] <= 100
    metrics = evaluate_checkpoint(result.best_checkpoint)
    assert sorted(metrics["domains"]) == ["brick", "camera", "grass", "gravel"]
    for values in metrics["domains"].values():
        assert all(math.isfinite(values[k]) for k in ("cacc", "aacc", "comp", "suff"))
    assert set(metrics["sweep"]["fgsm"]) == {"0.01"}

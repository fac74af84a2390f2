"""The proof: on the embedded benchmark EGAT is far more robust than ERM, follows the spurious patch
less and explains with the object, at a clean-accuracy cost that this small budget makes visible.

Trains both methods through the real stages (prepare -> guides -> train -> evaluate, MLflow in a
temporary sqlite store) at a small budget; minutes on 2 CPU cores.
"""

import json
import os

import pytest

from egat import stages
from tests.helpers import prepared

pytestmark = pytest.mark.slow

BUDGET = {
    "data": {"dir": "data"},
    # The study's schedule (one-cycle, peak 2e-3) at a smaller budget; best.pt = best validation.
    "train": {"steps": 150, "batch_size": 32, "eval_every": 50, "progress": False,
              "lr_schedule": "onecycle", "lr": 0.002, "select": "val"},
    "eval": {"max_examples": 256, "sweep": {"attacks": ["fgsm"], "eps": [0.01]}},
    "study": {"methods": ["erm", "egat"], "train_domains": ["grass"], "seeds": [0]},
    "robust": {"transfer_fallback": "egat"},  # check (d)'s sources among the study's methods
    # The settings this test was measured at (PGD-10 training, the study_v2 preset's lambda_adv 6
    # and lambda_mix 1 with guide weight 1): at 150 steps lambda_egl 10 costs EGAT 28 points of
    # cAcc (87.5 / 59.4).
    "attack": {"steps": 10, "alpha": 2 / 255},
    "methods": {"egat": {"preset": "study_v2", "lambda_egl": 1.0}},
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    old = os.getcwd()
    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    try:
        params = prepared(BUDGET)
        out = {}
        for method in ("erm", "egat"):
            stages.train_run(params, method, "grass", 0)
            out[method] = stages.evaluate_run(params, method, "grass", 0)
        yield out
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.chdir(old)


def test_egat_is_more_robust_follows_the_cue_less_and_points_at_the_object(results):
    """Measured once (seed 0, 150 steps): aAcc ERM 0 / EGAT 44, cue-follow 71 / 37 %, pointing
    game 0.10 / 0.47, cAcc 88.3 / 70.3 (at the study's 400 steps: 90.0 / 84.8, README)."""
    erm, egat = results["erm"]["domains"]["grass"], results["egat"]["domains"]["grass"]
    print(json.dumps({"erm": erm, "egat": egat}, indent=1))
    assert egat["aacc"] >= erm["aacc"] + 10, (erm["aacc"], egat["aacc"])
    assert egat["cue_follow"] <= erm["cue_follow"] - 15, (erm["cue_follow"], egat["cue_follow"])
    assert egat["pointing_game"] >= erm["pointing_game"] + 0.2, (erm["pointing_game"], egat["pointing_game"])
    assert egat["cacc"] >= erm["cacc"] - 25, (erm["cacc"], egat["cacc"])


def test_every_metric_is_reported_for_every_domain(results):
    for method in ("erm", "egat"):
        domains = results[method]["domains"]
        assert sorted(domains) == ["brick", "camera", "grass", "gravel"]
        for values in domains.values():
            for key in ("cacc", "aacc", "comp", "suff", "spearman", "top_intersection",
                        "pointing_game", "mass_in_mask"):
                assert key in values and values[key] == values[key], key  # present, not NaN
        assert set(results[method]["summary"]) >= {"id_cacc", "id_aacc", "ood_cacc", "ood_aacc"}

"""`egat tune`: the lambda search with Ray Tune (issue 5).

Fast tests cover the schema, the search space, the trial params and the best-params YAML; the
slow one runs a 4-trial ASHA search on tiny data through Ray and checks the MLflow store.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import yaml

from egat import stages
from egat.build import method_hparams, params_from_dict
from egat.config import TuneParams, apply_overrides
from egat.errors import EgatError, ParamsError
from egat.tune import (
    best_params_text,
    make_scheduler,
    make_search,
    param_key,
    search_space,
    trial_params,
)
from tests.helpers import ray_test_env

EMPTY_SPACE = {k: None for k in ("lambda_adv", "lambda_egl", "lambda_mix", "lambda_sparse", "eps")}


# ---------------------------------------------------------------------------------------- fast
def test_default_space_is_three_lambdas_log_uniform_on_a_validation_objective():
    tp = TuneParams()
    assert set(tp.searched()) == {"lambda_adv", "lambda_egl", "lambda_mix"}
    adv, egl = tp.space["lambda_adv"], tp.space["lambda_egl"]
    assert (adv.low, adv.high, adv.log) == (0.25, 16.0, True)
    assert (egl.low, egl.high, egl.log) == (0.3, 30.0, True)
    assert (tp.scheduler, tp.search, tp.objective) == ("asha", "random",
                                                     "val_cue_mismatch_cacc+val_cue_free_aacc")


@pytest.mark.parametrize("space, message", [
    ({"lambda_adv": {"low": 4, "high": 1}}, "low=4.0 > high=1.0"),
    ({"lambda_adv": {"low": 0, "high": 1, "log": True}}, "log range needs low > 0"),
    ({"lambda_adv": {"low": 1}}, "needs low and high"),
    ({"lambda_adv": {"values": []}}, "values is empty"),
    ({"lambda_foo": {"low": 1, "high": 2}}, "unknown key"),
])
def test_bad_search_ranges_are_refused_by_name(space, message):
    with pytest.raises(ParamsError, match=message):
        params_from_dict({"tune": {"space": space}})


def test_eps_accepts_fractions_and_maps_to_the_training_attack():
    params = params_from_dict({"tune": {"space": {"eps": {"low": "2/255", "high": "8/255",
                                                          "log": False}}}})
    assert params.tune.space["eps"].low == pytest.approx(2 / 255)
    assert param_key(params.tune, "eps") == "attack.eps"
    assert trial_params(params, {"eps": 0.02}).attack.eps == pytest.approx(0.02)


def test_empty_space_is_an_error_before_ray_starts():
    import ray

    params = params_from_dict({"tune": {"space": EMPTY_SPACE}})
    with pytest.raises(EgatError, match="tune.space is empty"):
        search_space(params.tune)
    from egat.tune import run_search

    was_up = ray.is_initialized()
    started = time.perf_counter()
    with pytest.raises(EgatError, match="tune.space is empty"):
        run_search(params)
    assert time.perf_counter() - started < 2 and ray.is_initialized() == was_up


def test_cli_reports_an_empty_space_in_one_line(tmp_path, capsys):
    from egat.cli import main

    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump({"tune": {"space": EMPTY_SPACE}}))
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--config", str(config), "--samples", "2"])
    assert exc.value.code == 2
    assert "error: tune.space is empty" in capsys.readouterr().err


def test_search_space_maps_ranges_to_tune_distributions():
    from ray.tune.search.sample import Categorical, Float

    tp = params_from_dict({"tune": {"space": {
        "lambda_adv": {"low": 0.25, "high": 16}, "lambda_egl": {"values": [0.5, 1.0]},
        "lambda_mix": {"low": 0.1, "high": 1, "log": False}, "lambda_sparse": None,
    }}}).tune
    space = search_space(tp)
    assert set(space) == {"lambda_adv", "lambda_egl", "lambda_mix"}
    assert isinstance(space["lambda_adv"], Float) and isinstance(space["lambda_egl"], Categorical)
    for _ in range(20):
        assert 0.25 <= space["lambda_adv"].sample() <= 16
        assert space["lambda_egl"].sample() in (0.5, 1.0)


@pytest.mark.parametrize("objective, val_metrics", [
    ("val_cacc+val_aacc", ["aacc"]), ("val_cacc", []), ("val_comp", ["comp"]),
    ("val_cue_mismatch_cacc+val_cue_free_aacc", ["cue_mismatch", "cue_free_aacc"]),
])
def test_trial_params_set_the_lambdas_budget_and_validation(objective, val_metrics):
    params = params_from_dict({
        "train": {"steps": 100, "eval_every": 50, "workers": 1},
        "tune": {"objective": objective, "steps": 12, "eval_every": 4, "val_batches": 3,
                 "workers": 2},
    })
    trial = trial_params(params, {"lambda_adv": 2.5, "lambda_sparse": 0.05})
    cfg = method_hparams(trial, "egat")
    assert (cfg.lambda_adv, cfg.lambda_sparse, cfg.lambda_egl) == (2.5, 0.05, 3.372)
    t = trial.train
    assert (t.method, t.steps, t.eval_every, t.checkpoint_every) == ("egat", 12, 4, 4)
    assert (t.val_batches, t.val_metrics, t.workers, t.progress) == (3, val_metrics, 2, False)
    assert t.domains == ["grass"]  # the study's training domain, not the data's first (brick)


def test_a_trial_trains_on_train_domains_when_given_else_the_studys_first():
    given = params_from_dict({"train": {"domains": ["gravel"]}, "study": {"train_domains": ["brick"]}})
    assert trial_params(given, {}).train.domains == ["gravel"]
    study = params_from_dict({"study": {"train_domains": ["camera", "brick"]}})
    assert trial_params(study, {}).train.domains == ["camera"]


def test_a_method_without_the_searched_keys_is_refused():
    params = params_from_dict({"tune": {"method": "erm"}})
    with pytest.raises(ParamsError, match="lambda_adv"):
        trial_params(params, {"lambda_adv": 1.0})


def test_best_params_yaml_is_what_dvc_exp_run_and_params_take():
    params = params_from_dict({})
    text = best_params_text(params, {"lambda_adv": 3.14159, "lambda_egl": 0.5}, "best of 4")
    flat = yaml.safe_load(text)
    assert flat == {"methods.egat.lambda_adv": 3.142, "methods.egat.lambda_egl": 0.5}
    command = next(line for line in text.splitlines() if line.startswith("# dvc exp run"))
    sets = [part for part in command.split() if "=" in part]
    assert sets == ["methods.egat.lambda_adv=3.142", "methods.egat.lambda_egl=0.5"]
    merged = params_from_dict(apply_overrides(params.model_dump(mode="json"), sets))
    assert method_hparams(merged, "egat").lambda_adv == 3.142


def test_search_algorithms_and_schedulers():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    alg, limit = make_search(TuneParams(search="optuna"), 3)
    assert isinstance(alg, OptunaSearch) and limit == 3
    alg, limit = make_search(TuneParams(search="random"), 3)
    assert isinstance(alg, BasicVariantGenerator) and limit is None
    asha = make_scheduler(TuneParams(grace_period=None), steps=40, eval_every=5)  # steps / 4
    assert isinstance(asha, ASHAScheduler) and asha._time_attr == "step"
    assert asha._max_t == 40 and [m for m, _ in asha._brackets[0]._rungs] == [40, 20, 10]
    asha = make_scheduler(TuneParams(), steps=400, eval_every=100)  # the study's: a rung at 100
    assert [m for m, _ in asha._brackets[0]._rungs] == [400, 200, 100]
    assert isinstance(make_scheduler(TuneParams(scheduler="none"), 40, 5), FIFOScheduler)


# ---------------------------------------------------------------------------------------- slow
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with ray_test_env(tmp_path_factory.mktemp("tune")) as root:
        yield root


@pytest.fixture(scope="module")
def ray_session(env):
    import ray

    from egat.train.cluster import connect

    connect(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def search(env, ray_session):
    from egat.tune import run_search

    params = params_from_dict({
        "data": {"dir": str(env / "data"), "embedded": {"per_class": 20}},
        "attack": {"steps": 1},
        "eval": {"batch_size": 32, "attack": {"steps": 2}},
        "train": {"batch_size": 16, "num_threads": 1, "progress": False,
                  "out_dir": str(env / "runs")},
        "tune": {"num_samples": 4, "steps": 4, "eval_every": 2, "val_batches": 1,
                 "scheduler": "asha", "search": "random", "grace_period": 2,
                 "resources_per_worker": {"CPU": 0.5},  # all 4 trials at once on 2 CPUs
                 "best_params_file": str(env / "tune" / "best_params.yaml")},
    })
    stages.prepare(params)
    stages.guides(params)
    lines: list[str] = []
    result = run_search(params, echo=lines.append)
    return params, result, "\n".join(lines)


@pytest.mark.slow
def test_a_four_trial_asha_search_completes_and_writes_the_best_lambdas(search):
    params, result, printed = search
    assert len(result.trials) == 4 and not any(t["error"] for t in result.trials)
    assert set(result.best_config) == set(params.tune.searched())
    assert 0.25 <= result.best_config["lambda_adv"] <= 16
    best = yaml.safe_load(result.best_params_file.read_text())
    assert set(best) == {f"methods.egat.{k}" for k in params.tune.searched()}
    assert "| best param" in printed and "dvc exp run -S methods.egat.lambda_adv=" in printed
    objectives = [t["objective"] for t in result.trials]
    assert result.best_metrics["objective"] == max(objectives)


@pytest.mark.slow
def test_mlflow_holds_one_parent_and_four_nested_trials(search):
    import mlflow

    params, result, _ = search
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("egat")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("stage") == "tune"]
    assert len(parents) == 1 and parents[0].info.run_id == result.parent_run_id
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["best_objective"] == result.best_metrics["objective"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert len(children) == 4
    for child in children:
        assert child.info.status == "FINISHED"
        assert set(child.data.params) == set(params.tune.searched())
        # the default objective's two terms, logged beside the objective
        assert {"val_cacc", "val_cue_mismatch_cacc", "val_cue_free_aacc",
                "objective"} <= set(child.data.metrics)
        m = child.data.metrics
        assert m["objective"] == pytest.approx(m["val_cue_mismatch_cacc"] + m["val_cue_free_aacc"])
        lam = float(child.data.params["lambda_adv"])
        assert 0.25 <= lam <= 16
    stopped = [c for c in children if c.data.tags.get("early_stopped") == "true"]
    print(f"{len(stopped)} of 4 trials stopped early by ASHA")


@pytest.mark.slow
def test_placement_groups_of_dead_controllers_are_freed(ray_session):
    """What a stopped trial leaves behind on a cluster without the State API."""
    import ray
    from ray.util import placement_group_table

    from egat.train.cluster import reap_orphan_placement_groups

    @ray.remote(num_cpus=0)
    class Creator:
        def make(self):
            pg = ray.util.placement_group([{"CPU": 1}])
            assert pg.wait(30), "the search left CPUs behind"
            return pg.id.hex()

    creator = Creator.remote()
    pg_id = ray.get(creator.make.remote())
    ray.kill(creator)
    deadline = time.monotonic() + 20
    while reap_orphan_placement_groups() == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert placement_group_table()[pg_id]["state"] == "REMOVED"
    assert os.environ.get("RAY_ADDRESS") is None

"""`egat tune`: Ray Tune's search over EGAT's lambdas, in Ray's V2 driver-function pattern.

Each trial runs :func:`trial_driver`, which builds and fits a Ray Train ``TorchTrainer`` (through
:func:`egat.train.launch.fit`, the one training entry point) named from the trial id, and passes
the workers' reports to Tune with ``TuneReportCallback``. Workers report ``step``, ``val_cacc``,
``val_aacc`` / ``val_comp`` (as the objective needs) and ``objective``; ASHA stops weak trials at
its rungs (in steps) and Optuna's TPE may propose the lambdas.

MLflow: one parent run per search and one child run per trial (tag ``mlflow.parentRunId``), with
the trial's lambdas as params and its reported metrics; the driver writes them all
(:class:`egat.tune_mlflow.MlflowTrialCallback`), so trials that ASHA stops are closed too. The
sqlite store takes a few concurrent writers (writes retry "database is locked"); beyond about 4
concurrent trials, or with trials on several machines, set MLFLOW_TRACKING_URI to an ``mlflow
server`` (README, Reliability).

A killed search resumes (``egat tune --resume``) from its experiment folder with
``Tuner.restore``; ``egat_search.json`` there holds its name, params and parent run.

The best lambdas are printed as a table and written to ``tune.best_params_file`` as flat
``methods.egat.lambda_adv: ...`` keys, with the ``dvc exp run -S ...`` command to run them.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from egat import io
from egat.build import params_from_dict
from egat.config import TUNE_KEYS, Params, TuneParams
from egat.errors import EgatError

# The validation metrics each objective needs from the Trainer.
OBJECTIVE_VAL_METRICS = {"val_cacc+val_aacc": ["aacc"], "val_cacc": [], "val_comp": ["comp"],
                         "val_cue_free_cacc+val_aacc": ["aacc"],
                         "val_cue_mismatch_cacc+val_cue_free_aacc": ["cue_mismatch", "cue_free_aacc"]}
SEARCH_FILE = "egat_search.json"  # in the search's experiment folder: what a resume needs


@dataclass
class SearchResult:
    name: str
    best_config: dict[str, float]
    best_metrics: dict[str, float]
    trials: list[dict[str, Any]] = field(default_factory=list)
    best_params_file: Path | None = None
    parent_run_id: str | None = None


def param_key(tp: TuneParams, key: str) -> str:
    """The params key a searched name sets, e.g. lambda_adv -> methods.egat.lambda_adv."""
    return TUNE_KEYS[key].format(method=tp.method)


def search_space(tp: TuneParams) -> dict[str, Any]:
    """Ray Tune distributions of the searched keys; an empty space is an error."""
    from ray import tune

    searched = tp.searched()
    if not searched:
        raise EgatError(
            "tune.space is empty: give at least one of "
            f"{', '.join(TUNE_KEYS)} a range (low/high) or a list of values"
        )
    space = {}
    for key, r in searched.items():
        if r.values is not None:
            space[key] = tune.choice(list(r.values))
        elif r.low == r.high:
            space[key] = r.low
        elif r.log:
            space[key] = tune.loguniform(r.low, r.high)
        else:
            space[key] = tune.uniform(r.low, r.high)
    return space


def check_objective(params: Params) -> None:
    """A trial asks only for what the data has: its training domains, and for a cue objective
    the embedded benchmark's cue-free renders and cue classes."""
    from egat.data import read_splits
    from egat.run.checkpoint import training_domains
    from egat.train.trainer import check_selection

    trial = trial_params(params, {})
    splits = read_splits(params.data.splits_file)
    try:
        training_domains(trial, splits["domains"])
    except EgatError as e:
        raise EgatError(f"tune: {e} (a trial trains on train.domains, or on study.train_domains' "
                        "first)") from None
    try:
        check_selection(trial, splits)
    except EgatError as e:
        raise EgatError(f"tune.objective={params.tune.objective}: {e}; or use val_cacc+val_aacc") from None


def trial_params(params: Params, sample: Mapping[str, float]) -> Params:
    """The params of one trial: the sampled values set, the search's training budget, and the
    study's (first) training domain unless ``train.domains`` names the domains."""
    tp = params.tune
    raw = params.model_dump(mode="json")
    t = raw["train"]
    t.update(
        method=tp.method, progress=False, val_batches=tp.val_batches,
        val_metrics=OBJECTIVE_VAL_METRICS[tp.objective],
        # the study's training domain, as its cells train on (train.domains: [] would mean the
        # data's first domain in sorted order, not the study's)
        domains=t["domains"] or params.study.train_domains[:1],
    )
    if tp.steps:
        t["steps"] = tp.steps
    t["eval_every"] = min(tp.eval_every or t["eval_every"], t["steps"])
    t["checkpoint_every"] = t["eval_every"]  # every report carries a checkpoint
    if tp.workers:
        t["workers"] = tp.workers
    # A trial has a fixed size: Tune's concurrency counts workers per trial.
    t["min_workers"] = None
    if tp.resources_per_worker is not None:
        t["resources_per_worker"] = tp.resources_per_worker
    for key, value in sample.items():
        _set(raw, param_key(tp, key), float(value))
    return params_from_dict(raw, source="tune trial params")


def _set(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def max_concurrency(params: Params) -> int:
    """Trials that can run at once: the cluster's capacity in workers / workers per trial (and
    each trial's driver CPUs), bounded by ``tune.max_concurrent_trials`` (0 = no other bound)."""
    from egat.train import cluster

    fits = cluster.runs_that_fit(trial_params(params, {}), what="tune workers per trial",
                                 driver_cpus=params.tune.trial_driver_cpus)
    want = params.tune.max_concurrent_trials
    return max(1, min(fits, want) if want else fits)


def trial_driver(config: dict, ctx: dict) -> None:
    """One Tune trial: a TorchTrainer named from the trial id, reporting through Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from egat.train.launch import fit

    os.chdir(ctx["cwd"])  # Tune may have moved this process into the trial folder
    params = trial_params(params_from_dict(ctx["params"]), config)
    trial_id = tune.get_context().get_trial_id()
    fit(
        params, None, backend="ray", name=f"{ctx['name']}-{trial_id}",
        callbacks=[TuneReportCallback()], objective=ctx["objective"], cwd=ctx["cwd"],
        storage_checked=True,
    )


def best_params_text(params: Params, best: Mapping[str, float], header: str) -> str:
    """The best values as flat params keys (YAML), with the commands that use them."""
    tp = params.tune
    flat = {param_key(tp, k): _round(v) for k, v in best.items()}
    sets = " ".join(f"-S {k}={v}" for k, v in flat.items())
    egat_sets = " ".join(f"--set {k}={v}" for k, v in flat.items())
    lines = [
        f"# {header}",
        f"# dvc exp run {sets}",
        f"# egat train --set train.method={tp.method} {egat_sets}",
        yaml.safe_dump(flat, sort_keys=False).rstrip(),
    ]
    return "\n".join(lines) + "\n"


def _round(value: float) -> float:
    return float(f"{float(value):.4g}")


def run_search(
    params: Params, samples: int | None = None, out: str | Path | None = None,
    echo=print, resume: bool = False,
) -> SearchResult:
    """Run the search of ``params.tune`` (``samples`` overrides ``tune.num_samples``).

    ``resume``: continue the newest unfinished search of ``tune.name`` from its experiment folder
    (``Tuner.restore``): finished trials are kept, unfinished ones go on from their last
    checkpoints. Either way the parent (and trial) runs of killed searches of ``tune.name`` are
    marked KILLED.
    """
    from ray import tune

    from egat.tracking.mlflow_tracker import (
        ensure_experiment, flatten, git_commit, mark_orphans_killed, owner_tags, tracking_uri,
    )
    from egat.train import cluster

    tp = params.tune
    space = search_space(tp)  # an empty space fails here, before Ray starts
    storage = cluster.storage_path(params)
    previous = resumable_search(storage, tp.name, params, samples) if resume else None
    num_samples = previous["num_samples"] if previous else samples or tp.num_samples
    probe = trial_params(params, {k: _midpoint(tp, k) for k in space})  # bad keys fail here
    steps = probe.train.steps
    make_search(tp, 1)  # a missing optuna fails here
    check_objective(params)  # an objective the data cannot compute fails here
    if not cluster.ray_address():
        max_concurrency(params)  # too many workers per trial for this machine: fail before Ray
    cluster.check_cluster(probe)  # placement and every node's access to the storage
    concurrency = max_concurrency(params)
    cwd = os.getcwd()
    name = previous["name"] if previous else f"{tp.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    import mlflow

    from egat.tune_mlflow import MlflowTrialCallback, parent_key

    experiment_id = ensure_experiment()
    client = mlflow.MlflowClient(tracking_uri=tracking_uri())
    # Killed searches of this name (their drivers are gone) leave RUNNING parent and trial runs.
    mark_orphans_killed(client, experiment_id, f"tune/{tp.name}-%")
    tags = {"egat_key": parent_key(name), "stage": "tune", "method": tp.method,
            "git_commit": git_commit(), "dataset": params.data.name, "model": params.model.name,
            **owner_tags()}
    if previous:
        tags["resumes"] = previous["parent_run_id"]
    parent_id = client.create_run(experiment_id, run_name=f"tune/{name}", tags=tags).info.run_id
    if previous:
        _adopt_trials(client, experiment_id, name, previous["parent_run_id"], parent_id)
    status = "FAILED"
    try:
        from mlflow.entities import Param

        logged = {f"tune.{k}": v for k, v in flatten(tp.model_dump(mode="json")).items()}
        logged.update({"num_samples": num_samples, "max_concurrent_trials": concurrency,
                       "trial_steps": steps, "workers_per_trial": probe.train.workers,
                       "trial_domains": ",".join(probe.train.domains)})
        client.log_batch(parent_id, params=[Param(k, str(v)[:6000]) for k, v in logged.items()])

        ctx = {"params": params.model_dump(mode="json"), "cwd": cwd, "name": name,
               "objective": tp.objective}
        # Ray refuses an empty request: a driver with no CPU asks for 1 MiB of logical memory.
        driver = {"cpu": tp.trial_driver_cpus} if tp.trial_driver_cpus else {"memory": 2**20}
        trainable = tune.with_resources(tune.with_parameters(trial_driver, ctx=ctx), driver)
        path = f"{storage.rstrip('/')}/{name}"
        if previous:
            # The search algorithm, scheduler and callbacks come back from the folder.
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, param_space=space)
        else:
            search_alg, limit = make_search(tp, concurrency)
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric="objective", mode="max", num_samples=num_samples,
                    scheduler=make_scheduler(tp, steps, probe.train.eval_every),
                    search_alg=search_alg, max_concurrent_trials=limit,
                ),
                run_config=tune.RunConfig(
                    name=name, storage_path=storage,
                    callbacks=[MlflowTrialCallback(name, steps)],
                    failure_config=tune.FailureConfig(max_failures=0),
                ),
            )
        state = {"name": name, "params": ctx["params"], "num_samples": num_samples,
                 "parent_run_id": parent_id, "finished": False}
        _write_search_file(path, state)
        verb = "resuming" if previous else "tune"
        echo(f"{verb} {name}: {num_samples} trials, {concurrency} at a time, {steps} steps each "
             f"on {', '.join(probe.train.domains)}, search={tp.search}, scheduler={tp.scheduler}, "
             f"objective={tp.objective}")
        try:
            grid = tuner.fit()
        finally:
            # Trials stopped by ASHA (at a rung or at max_t) take their Train controllers down
            # with them: free the placement groups those leave behind.
            for _ in range(6):
                time.sleep(0.5)
                cluster.reap_orphan_placement_groups()
        result = _summarise(grid, params, name, parent_id, out)
        _log_parent(client, parent_id, result)
        _write_search_file(path, {**state, "finished": True})
        echo(_table(result, tp))
        echo(f"best {tp.objective} = {result.best_metrics.get('objective', float('nan')):.2f} "
             f"(trial {result.best_metrics.get('trial_id')}); written to {result.best_params_file}")
        echo(result.best_params_file.read_text() if result.best_params_file else "")
        status = "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent_id, status=status)


def _search_fs(path: str):
    """pyarrow's filesystem of a search folder (local or s3://, gs://, as Ray's storage)."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path)


def _write_search_file(folder: str, state: dict) -> None:
    """Write ``<folder>/egat_search.json`` (temp file, then rename)."""
    fs, base = _search_fs(folder)
    fs.create_dir(base, recursive=True)
    tmp = f"{base}/.{SEARCH_FILE}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(state, indent=1).encode())
    fs.move(tmp, f"{base}/{SEARCH_FILE}")


def resumable_search(storage: str, tune_name: str, params: Params, samples: int | None) -> dict:
    """The state of the newest search of ``tune_name`` under ``storage``, checked to be
    resumable with these params; an error says why not."""
    import pyarrow.fs
    from ray import tune

    fs, base = _search_fs(storage)
    found = sorted(
        (info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
         if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith(f"{tune_name}-")),
        reverse=True,
    )
    again = "run `egat tune` without --resume to start a new search"
    searches = [n for n in found if fs.get_file_info(f"{base}/{n}/{SEARCH_FILE}").is_file]
    if not searches:
        raise EgatError(f"tune --resume: no search named {tune_name}-* under {storage} "
                        f"(tune.name={tune_name}, train.storage_path); {again}")
    name = searches[0]
    with fs.open_input_stream(f"{base}/{name}/{SEARCH_FILE}") as f:
        state = json.loads(f.read())
    folder = f"{storage.rstrip('/')}/{name}"
    if state.get("finished"):
        raise EgatError(f"tune --resume: the newest search {name} has finished (MLflow parent run "
                        f"{state['parent_run_id']}); {again}")
    if not tune.Tuner.can_restore(folder):
        raise EgatError(f"tune --resume: {folder} holds no Tune state to resume from; {again}")
    if samples and samples != state["num_samples"]:
        raise EgatError(f"tune --resume: --samples {samples}, but search {name} was started with "
                        f"{state['num_samples']}; leave --samples out, or {again}")
    from egat.tracking.mlflow_tracker import flatten

    started, now = flatten(state["params"]), flatten(params.model_dump(mode="json"))
    changed = sorted(k for k in started.keys() | now.keys() if started.get(k) != now.get(k))
    if changed:
        raise EgatError(f"tune --resume: search {name} was started with other params "
                        f"({', '.join(changed[:8])}); resume with the same --config and --set, or "
                        f"{again}")
    return state


def _adopt_trials(client, experiment_id: str, name: str, old_parent: str, parent_id: str) -> None:
    """Move a resumed search's trial runs under its new parent run."""
    from egat.tracking.mlflow_tracker import retry_locked

    trials = retry_locked(lambda: client.search_runs(
        [experiment_id], f"tags.egat_key LIKE 'tune/{name}/%'"))
    for run in trials:
        retry_locked(lambda: client.set_tag(run.info.run_id, "mlflow.parentRunId", parent_id))
    retry_locked(lambda: client.set_tag(old_parent, "resumed_by", parent_id))


def make_search(tp: TuneParams, concurrency: int):
    """``(search_alg, max_concurrent_trials)`` for ``tune.search``."""
    if tp.search == "optuna":
        try:
            from optuna.samplers import TPESampler
        except ImportError:
            raise EgatError(
                "tune.search=optuna needs the optuna package (pip install optuna)"
            ) from None
        from ray.tune.search.optuna import OptunaSearch

        # Tune wraps a Searcher in a ConcurrencyLimiter of max_concurrent_trials.
        return OptunaSearch(sampler=TPESampler(seed=tp.seed)), concurrency
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune ignores max_concurrent_trials for a BasicVariantGenerator: it takes its own limit.
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=tp.seed), None


def make_scheduler(tp: TuneParams, steps: int, eval_every: int):
    """ASHA over reported ``step`` (rungs at grace_period * reduction_factor^k), or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if tp.scheduler == "none":
        return FIFOScheduler()
    grace = min(tp.grace_period or max(eval_every, steps // 4), steps)
    return ASHAScheduler(
        time_attr="step", max_t=steps, grace_period=grace, reduction_factor=tp.reduction_factor,
    )


def _midpoint(tp: TuneParams, key: str) -> float:
    r = tp.space[key]
    if r.values is not None:
        return float(r.values[0])
    return math.sqrt(r.low * r.high) if r.log else (r.low + r.high) / 2


def _summarise(grid, params: Params, name: str, parent_id: str, out) -> SearchResult:
    from egat.train.ray_train import VAL_REPORTS

    tp = params.tune
    shown = ("step", *VAL_REPORTS, "objective")  # what the workers reported
    trials = []
    for res in grid:
        m = res.metrics or {}
        row = {"trial_id": m.get("trial_id", ""), **{k: res.config.get(k) for k in tp.searched()}}
        row.update({k: m.get(k) for k in shown if k in m})
        row["error"] = str(res.error).splitlines()[0] if res.error else ""
        trials.append(row)
    ok = [t for t in trials if not t["error"] and isinstance(t.get("objective"), (int, float))]
    if not ok:
        errors = "; ".join(t["error"] for t in trials if t["error"]) or "no trial reported"
        raise EgatError(f"tune {name}: no trial finished ({errors})")
    best = grid.get_best_result(metric="objective", mode="max", scope="last")
    best_config = {k: float(best.config[k]) for k in tp.searched()}
    best_metrics = {k: v for k, v in (best.metrics or {}).items() if k in (*shown, "trial_id")}
    path = Path(out or tp.best_params_file)
    header = (f"best of {len(trials)} trials of search {name} (MLflow parent run {parent_id}): "
              f"{tp.objective} = {best_metrics.get('objective', float('nan')):.2f}")
    io.write_text(path, best_params_text(params, best_config, header))  # temp file, then rename
    trials.sort(key=lambda t: -(t.get("objective") or -math.inf))
    return SearchResult(name, best_config, best_metrics, trials, path, parent_id)


def _log_parent(client, parent_id: str, result: SearchResult) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    metrics = [Metric(f"best_{k}", float(v), now, 0) for k, v in result.best_metrics.items()
               if isinstance(v, (int, float))]
    params = [Param(f"best.{k}", repr(v)) for k, v in result.best_config.items()]
    client.log_batch(parent_id, metrics=metrics, params=params)
    if result.best_params_file:
        client.log_artifact(parent_id, str(result.best_params_file))


def _table(result: SearchResult, tp: TuneParams) -> str:
    from tabulate import tabulate

    keys = list(tp.searched())
    rows = []
    for t in result.trials:
        mark = "*" if t.get("trial_id") == result.best_metrics.get("trial_id") else ""
        rows.append([mark, t.get("trial_id", ""), *[_fmt(t.get(k)) for k in keys],
                     t.get("step", ""), _fmt(t.get("val_cacc")), _fmt(t.get("val_aacc")),
                     _fmt(t.get("val_comp")), _fmt(t.get("val_cue_free_cacc")),
                     _fmt(t.get("val_cue_mismatch_cacc")), _fmt(t.get("val_cue_free_aacc")),
                     _fmt(t.get("objective")),
                     t.get("error", "")[:40]])
    headers = ["", "trial", *keys, "step", "val cAcc", "val aAcc", "val Comp", "val cue-free cAcc",
               "val cue-mismatch cAcc", "val cue-free aAcc", "objective", "error"]
    best = tabulate(
        [[param_key(tp, k), _round(v)] for k, v in result.best_config.items()],
        headers=["best param", "value"], tablefmt="github",
    )
    return tabulate(rows, headers=headers, tablefmt="github") + "\n\n" + best


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

"""The `egat` command line: train, evaluate, tune, list methods (and the pipeline stages' verbs)."""

from __future__ import annotations

import gc
import json
import sys
import warnings
from pathlib import Path

import click

from egat.errors import EgatError
from egat.run.layout import BEST, EVAL_FILE, EVALS

CONFIG = click.option(
    "--config", "config", default="params.yaml", show_default=True,
    type=click.Path(dir_okay=False), help="params file",
)
OVERRIDES = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="override a param, e.g. --set train.steps=100 (repeatable; values parsed as YAML)",
)


def _params(config: str, overrides: tuple[str, ...]):
    from egat.build import load_params

    return load_params(config, list(overrides))


@click.group()
def cli() -> None:
    """Explanation-Guided Adversarial Training."""


@cli.command()
def methods() -> None:
    """List the registered training methods."""
    from egat.methods import method_registry

    for name in method_registry.names():
        doc = (method_registry.get(name).__doc__ or "").strip().splitlines()
        click.echo(f"{name:14s} {doc[0] if doc else ''}")


@cli.command()
@CONFIG
@OVERRIDES
@click.option("--run-dir", default=None, help="output folder (default: <train.out_dir>/<method>)")
def train(config: str, overrides: tuple[str, ...], run_dir: str | None) -> None:
    """Train one model; writes best.pt, last.pt and train_metrics.json to the run folder.

    Runs in this process or on Ray Train (train.backend, train.workers, RAY_ADDRESS).
    """
    from egat.run.layout import default_run_dir
    from egat.train.launch import fit

    params = _params(config, overrides)
    run_dir = run_dir or str(default_run_dir(params))
    result = fit(params, run_dir)
    click.echo(json.dumps(result.metrics, indent=2))


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help=f"{BEST} of a run")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="metrics JSON to write")
@OVERRIDES
def evaluate(checkpoint: str, out: str | None, overrides: tuple[str, ...]) -> None:
    """Evaluate a checkpoint on the test split of every domain (cAcc, aAcc, Comp, Suff, ...)."""
    from egat import io
    from egat.evaluation import evaluate_checkpoint

    metrics = evaluate_checkpoint(checkpoint, list(overrides))
    if out:
        io.write_json(out, metrics)
    click.echo(json.dumps(metrics, indent=2))


CELL = [
    click.option("--method", default=None, help="a registered method (see `egat methods`)"),
    click.option("--variant", default=None, help="a studies.variants name instead of --method"),
    click.option("--domain", required=True, help="the training domain"),
    click.option("--seed", required=True, type=int),
]


def _cell(fn):
    for option in reversed(CELL):
        fn = option(fn)
    return fn


@cli.command()
@CONFIG
@OVERRIDES
def prepare(config: str, overrides: tuple[str, ...]) -> None:
    """Stage `prepare`: build or download the dataset and write its splits."""
    from egat import stages

    click.echo(json.dumps(stages.prepare(_params(config, overrides)), indent=1))


@cli.command()
@CONFIG
@OVERRIDES
def guides(config: str, overrides: tuple[str, ...]) -> None:
    """Stage `guides`: precompute the guide maps of every image."""
    from egat import stages

    stages.guides(_params(config, overrides))


def _cell_params(params, method: str | None, variant: str | None):
    """(params, method) of a cell: --method as is, or a studies variant's overrides and method."""
    if (method is None) == (variant is None):
        raise click.UsageError("give exactly one of --method or --variant")
    if variant is None:
        return params, method
    from egat.studies import variant_params

    return variant_params(params, variant)


@cli.command("train-cell")
@CONFIG
@OVERRIDES
@_cell
def train_cell(config, overrides, method, variant, domain, seed) -> None:
    """Stages `train`/`variant_train`: one (method or variant, domain, seed) run, tracked in MLflow."""
    from egat import stages

    params, method = _cell_params(_params(config, overrides), method, variant)
    click.echo(json.dumps(stages.train_run(params, method, domain, seed, name=variant)))


@cli.command("evaluate-cell")
@CONFIG
@OVERRIDES
@_cell
@click.option("--robustness", is_flag=True,
              help="then AutoAttack and the masking checklist (robustness-cell) in the same "
                   "process, as stage `evaluate` runs a method's cell")
def evaluate_cell(config, overrides, method, variant, domain, seed, robustness) -> None:
    """Stage `evaluate` (with --robustness) / `variant_evaluate`: test one run on every domain,
    tracked in MLflow."""
    from egat import stages
    from egat.run.layout import evals_root

    if robustness and variant is not None:
        raise click.UsageError("--robustness takes a --method cell (robust.* checks the study's "
                               "methods), not a --variant")
    params, method = _cell_params(_params(config, overrides), method, variant)
    # One process per cell pays the stage start-up once (docs/results/v4_make_run_breakdown.md);
    # the robustness request is checked before the evaluation leaves anything behind.
    job = _robust_job(params, method, domain, seed) if robustness else None
    root = evals_root(variant is not None)
    metrics = stages.evaluate_run(params, method, domain, seed, name=variant, evals_root=root)
    click.echo(json.dumps(metrics["summary"], indent=1))
    if job is not None:
        _echo_robust(job.run())


def _robust_job(params, method: str, domain: str, seed: int):
    from egat.build import check_name
    from egat.methods import method_registry
    from egat.robustness import robust_job

    try:
        check_name("--method", method, method_registry.names())
    except ValueError as exc:
        raise EgatError(str(exc)) from None
    return robust_job(params, method, domain, seed)


def _echo_robust(result: dict) -> None:
    click.echo(json.dumps({k: result[k] for k in ("n", "clean", "aa", "failed", "seconds")}, indent=1))


@cli.command("robustness-cell")
@CONFIG
@OVERRIDES
@click.option("--method", required=True, help="a registered method (see `egat methods`)")
@click.option("--domain", required=True, help="the training domain")
@click.option("--seed", required=True, type=int)
def robustness_cell(config, overrides, method, domain, seed) -> None:
    """AutoAttack and the gradient-masking checklist on one run (the params' `robust` group),
    tracked in MLflow; writes evals/<method>/<domain>/seed<seed>/robust.json. Stage `evaluate`
    runs it after the evaluation (evaluate-cell --robustness)."""
    _echo_robust(_robust_job(_params(config, overrides), method, domain, seed).run())


@cli.command()
@CONFIG
@OVERRIDES
@click.option("--runs", default=EVALS, show_default=True,
              help=f"folder of <method>/<domain>/seed<seed>/{EVAL_FILE} (the evaluate stage's)")
@click.option("--out", default="reports", show_default=True, help="folder the report goes to")
def report(config, overrides, runs: str, out: str) -> None:
    """Stage `report`: tables I/II, explanation table, figures, metrics.json, plot data."""
    from egat.report import build_report

    params = _params(config, overrides)
    for path in build_report(runs, out, methods_order=params.study.methods,
                             references=params.study.references):
        click.echo(path)


@cli.command()
@CONFIG
@OVERRIDES
@click.option("--evals", default=EVALS, show_default=True, help="the evaluate stages' folder")
@click.option("--out", default="reports", show_default=True, help="folder the study outputs go to")
def studies(config, overrides, evals: str, out: str) -> None:
    """Stage `studies`: Tables III (sensitivity) and IV (ablation), Fig. 3 (runtime, Pareto
    front) and Fig. 4 (case study), logged to MLflow."""
    from egat.studies import studies_run

    for path in studies_run(_params(config, overrides), evals, out):
        click.echo(path)


@cli.command()
@CONFIG
@OVERRIDES
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="number of trials (default: tune.num_samples)")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="YAML of the best params (default: tune.best_params_file)")
@click.option("--resume", is_flag=True,
              help="continue the newest unfinished search of tune.name (same --config and --set): "
              "finished trials are kept, unfinished ones go on from their last checkpoints")
def tune(config: str, overrides: tuple[str, ...], samples: int | None, out: str | None,
         resume: bool) -> None:
    """Search EGAT's lambdas with Ray Tune (the `tune` group of params.yaml); each trial is a Ray
    Train run and a nested MLflow run; the best values go to a YAML for `dvc exp run -S`."""
    from egat.tune import run_search

    run_search(_params(config, overrides), samples=samples, out=out, echo=click.echo, resume=resume)


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--run", "run_id", default=None, help="MLflow run id of a training run")
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False), help=f"{BEST} of a run")
@click.option("--explainer", default=None, help="gradcam | smoothgrad | ig | finercam "
              "(default: the checkpoint's eval.explainer)")
@click.option("--attack", default=None, type=click.Choice(["fgsm", "mifgsm", "pgd"]),
              help="also explain the image under this attack (the checkpoint's eval.attack budget)")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="overlay PNG; several images or --attack add _<image>/_<attack> to its name")
@click.option("--top", default=3, show_default=True, type=click.IntRange(min=1), help="classes shown")
def explain(images, run_id, checkpoint, explainer, attack, out, top) -> None:
    """Heatmap overlays of IMAGE... (any image files) and the model's top classes."""
    import tempfile

    from egat.heatmaps import checkpoint_of_run, explain_images

    if (run_id is None) == (checkpoint is None):
        raise click.UsageError("give exactly one of --run MLFLOW_RUN_ID or --checkpoint PATH")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint or checkpoint_of_run(run_id, tmp)
        results = explain_images(images, ckpt, out, explainer, attack, top)
    for r in results:
        click.echo(f"{r.image}: " + ", ".join(f"{c} {p:.3f}" for c, p in r.top))
        if r.adv_top is not None:
            click.echo(f"{r.image} under {attack}: " + ", ".join(f"{c} {p:.3f}" for c, p in r.adv_top))
        for path in r.overlays:
            click.echo(f"  wrote {path}")


PACKAGE_DIR = Path(__file__).resolve().parent


def _one_line_warnings(show):
    """A ``warnings.showwarning`` that prints egat's own warnings (bad data skipped, a missing
    mask, ...) as one ``warning: ...`` line, without Python's source line; others via ``show``."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if Path(filename).resolve().is_relative_to(PACKAGE_DIR):
            click.echo(f"warning: {message}", err=True)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def main(argv: list[str] | None = None) -> None:
    try:
        with warnings.catch_warnings():  # restores warnings.showwarning on the way out
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            _main(argv)
    finally:
        # Exempt what the process built from the collections of interpreter shutdown: with torch
        # and MLflow loaded they took 1.2-2 s of every stage process
        # (docs/results/v4_make_run_breakdown.md).
        gc.freeze()


def _main(argv: list[str] | None) -> None:
    try:
        cli(args=argv, standalone_mode=False)
    except EgatError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()

"""The pipeline's stages as functions: DVC entry points (pipelines/) and the CLI call these."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from egat import io
from egat.build import method_hparams, params_from_dict
from egat.config import Params
from egat.errors import DataError, ParamsError
from egat.run.layout import (
    BEST, CHECKPOINT_ARTIFACTS, EVAL_TIMING, EVALS, METRICS, eval_path, run_dir,
)
from egat.tracking.datasets import split_inputs
from egat.tracking.mlflow_tracker import MlflowTracker


def prepare(params: Params) -> dict:
    """Build or download the dataset, index it and write the seeded 60/20/20 splits."""
    from egat.data import build_embedded, make_splits, save_sample_grid, scan_folder, write_splits
    from egat.data.embedded import embedded_cues
    from egat.data.domainbed_sources import prepare_source

    data = params.data
    root = data.root
    if data.name == "embedded":
        build_embedded(data.embedded, root, cache_dir=data.raw_dir)
        image_root = root / "images"
    elif data.name == "folder":
        image_root = Path(data.folder_root)
        if not image_root.is_dir():  # checked before anything is written (splits, samples.png)
            raise DataError(
                f"data.folder_root={data.folder_root}: no such folder; expected your "
                "<root>/<domain>/<class>/<image> tree"
            )
    else:
        image_root = prepare_source(data.name, data.sources, data.raw_dir, root / "images")
    index = scan_folder(image_root, on_corrupt=data.on_corrupt)
    splits = make_splits(index, data.split, data.split_seed)
    if data.name == "embedded":
        splits.update(embedded_cues(root))
    write_splits(data.splits_file, splits)
    if data.name == "folder":
        write_file_stats(root / FILE_STATS, index)
    save_sample_grid(root, splits, root / "samples.png", image_size=data.image_size)
    counts = {d: {k: len(v) for k, v in s.items()} for d, s in splits["splits"].items()}
    return {"domains": splits["domains"], "classes": splits["classes"], "counts": counts}


FILE_STATS = "files.json"


def write_file_stats(path: Path, index) -> None:
    """Size and mtime of every image (and mask) of a user's tree, next to its splits: an image
    edited in place changes this file, so DVC reruns the stages after prepare (splits.json names
    paths only). Stats, not hashes: DVC has hashed the tree already as prepare's dependency."""
    out = {"images": _file_stats(index.root, index.paths)}
    if index.masks_root is not None:
        out["masks"] = _file_stats(index.masks_root, [m for m in index.masks if m is not None])
    io.write_json(path, out)


def _file_stats(root: Path, relpaths: list[str]) -> dict[str, list[int]]:
    stats = {}
    for rel in relpaths:
        st = (root / rel).stat()
        stats[rel] = [st.st_size, st.st_mtime_ns]
    return stats


def guides(params: Params) -> None:
    """Precompute grayscale guides (and golden masks where the data has them) for every image."""
    from egat.data import compute_guides, read_splits
    from egat.data.guides import cue_free_guides_root
    from egat.data.splits import cue_free_root

    data = params.data
    splits = read_splits(data.splits_file)
    compute_guides(data.root, splits, data.image_size, data.guides_root)
    if cue_free_root(data.root, splits) is not None:  # the counterfactual renders get their own
        compute_guides(data.root, splits, data.image_size, cue_free_guides_root(data.guides_root),
                       images="cue_free")


def run_params(params: Params, method: str, domain: str, seed: int) -> Params:
    """The params of one cell of the study matrix (method x training domain x seed)."""
    raw = params.model_dump(mode="json")
    raw["train"].update(method=method, domains=[domain], seed=seed)
    return params_from_dict(raw)


def check_domain(params: Params, domain: str) -> None:
    """A cell's training domain (the DVC matrix takes it from ``study.train_domains``) must be
    one of the prepared data's, and ``train.select``/``train.images`` must ask only for what the
    data has: checked before any MLflow run, folder or file is created."""
    from egat.data import read_splits
    from egat.train.trainer import check_selection

    splits = read_splits(params.data.splits_file)
    check_selection(params, splits)
    domains = splits["domains"]
    if domain not in domains:
        raise ParamsError(
            f"study.train_domains: {domain!r} is not a domain of the {params.data.name} data "
            f"({params.data.root}); valid: {', '.join(domains)} "
            f"(e.g. dvc exp run -S 'study.train_domains=[{domains[0]}]')"
        )


def _logged_params(cell: Params, method: str) -> dict:
    """Params for MLflow: everything, with the run's method hyperparameters fully resolved."""
    raw = cell.model_dump(mode="json")
    raw["methods"] = {method: method_hparams(cell, method).model_dump(mode="json")}
    return raw


def _tags(params: Params, stage: str, method: str, domain: str, seed: int) -> dict[str, str]:
    return {
        "stage": stage, "method": method, "domain": domain, "seed": str(seed),
        "dataset": params.data.name, "model": params.model.name,
    }


def train_run(params: Params, method: str, domain: str, seed: int, name: str | None = None) -> dict:
    """Train one cell (in process or on Ray Train, see ``train.backend``), tracked in MLflow with
    its checkpoint and model. ``name`` (a studies variant) replaces the method in folder and key."""
    import torch

    from egat.run.checkpoint import model_from_checkpoint
    from egat.train.launch import fit, preflight

    cell = run_params(params, method, domain, seed)
    check_domain(cell, domain)
    name = name or method
    out = run_dir(params, name, domain, seed)
    key = f"train/{name}/{domain}/seed{seed}"
    tags = {**_tags(cell, "train", method, domain, seed), "run": name}
    preflight(cell)  # a run the cluster cannot hold leaves no MLflow run behind
    tracker = MlflowTracker(key, tags, _logged_params(cell, method))
    with tracker:
        result = fit(cell, out, tracker)
        tracker.log_inputs(split_inputs(cell.data, cell.train.domains, ["train", "val"]))
        tracker.log_artifact(result.best_checkpoint, CHECKPOINT_ARTIFACTS)
        tracker.log_artifact(out / METRICS)
        model, _, _ = model_from_checkpoint(result.best_checkpoint)
        size = cell.data.image_size
        # An example batch of 2: torch.export specialises a batch dimension of 1, and the logged
        # model would then refuse any other batch size. Contiguous weights: torch.export's packer
        # takes channels_last ones for slices of a larger tensor and warns on every run.
        tracker.log_model(model.eval().to_memory_format(torch.contiguous_format),
                          np.zeros((2, 3, size, size), np.float32), name="model")
    return result.metrics


def evaluate_run(params: Params, method: str, domain: str, seed: int, name: str | None = None,
                 evals_root: str | Path = EVALS) -> dict:
    """Evaluate one cell's best checkpoint on every domain; writes <evals_root>/.../eval.json."""
    from egat.evaluation import PartClock, evaluate_model
    from egat.run.checkpoint import model_from_checkpoint
    from egat.run.device import resolve_device

    cell = run_params(params, method, domain, seed)
    check_domain(cell, domain)
    name = name or method
    model, _, _ = model_from_checkpoint(run_dir(params, name, domain, seed) / BEST)
    key = f"evaluate/{name}/{domain}/seed{seed}"
    path = eval_path(name, domain, seed, evals_root)
    tags = {**_tags(cell, "evaluate", method, domain, seed), "run": name}
    clock = PartClock()
    with MlflowTracker(key, tags, _logged_params(cell, method)) as tracker:
        metrics = evaluate_model(model, cell, [domain], resolve_device(cell), clock)
        metrics.update(method=method, seed=seed)
        tracker.log_inputs(split_inputs(cell.data, list(metrics["domains"]), ["test"]))
        io.write_json(path, metrics)
        seconds = clock.as_dict()
        io.write_json(path.with_name(EVAL_TIMING), seconds)
        tracker.log_metrics({f"test/{k}": v for k, v in metrics["summary"].items()}, step=0)
        tracker.log_metrics({f"time/{k}_s": v for k, v in seconds.items()}, step=0)
        for d, values in metrics["domains"].items():
            tracker.log_metrics(
                {f"test/{d}/{k}": float(v) for k, v in values.items() if not isinstance(v, bool)}, step=0
            )
        tracker.log_artifact(path)
    return metrics

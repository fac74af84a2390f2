"""Robust evaluation of one trained run: AutoAttack and the gradient-masking checklist
(README, "Robust evaluation"; Croce & Hein 2020, Carlini et al. 2019, "On Evaluating
Adversarial Robustness").

On a stratified, seeded subset of the in-domain test split (``robust.subset``; "all" = the whole
split) the stage computes clean accuracy, accuracy under ``robust.attack`` (AutoAttack: the AA
column of Table I, with how many images each member fooled) and the checks

- (a) APGD-CE accuracy at ``robust.checklist.eps`` falls with eps and is <= ``max_final_acc`` at
  the largest;
- (b) PGD with ``steps_factor`` x the steps of ``eval.attack`` and ``restarts`` restarts (per image
  the worst case) is no better for the model than ``eval.attack`` (PGD-10);
- (c) black-box Square accuracy >= white-box APGD-CE accuracy at ``robust.attack.eps``;
- (d) ``eval.attack`` transferred from another method's run of the same domain and seed
  (``robust.transfer_from``) is weaker than the same attack white-box;
- (e) the cross-entropy along the gradient sign (``scan_points`` steps up to ``robust.attack.eps``)
  rises on at least ``min_rising`` of the images (a flat loss surface hides the attack's direction),

each with its numbers and pass/fail; ``tolerance`` points of slack where accuracies are compared.
Every accuracy under attack counts a clean mistake as not robust (AutoAttack's convention), so
each attack runs only on the images the model gets right clean (egat.metrics.robust).
Writes ``evals/<method>/<domain>/seed<k>/robust.json``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from egat import io
from egat.attacks import Ensemble
from egat.attacks.apgdt import MIN_CLASSES as APGDT_MIN_CLASSES
from egat.build import build_attack
from egat.config import Params
from egat.data.subsets import stratified_indices
from egat.errors import EgatError
from egat.metrics import correct, iterate_batches, robust
from egat.models.mode import model_mode
from egat.run.layout import BEST, EVALS, ROBUST_TIMING, robust_path, run_dir
from egat.seeding import seeded_scope

# (e): the loss "rises" at the scan's end when it exceeds the clean loss by this factor plus
# RISE_ABS (nats): an exactly flat scan (zero gradient) never rises, a confident image's
# small but real rise does.
RISE_REL, RISE_ABS = 1e-2, 1e-6


def stratified_subset(labels: torch.Tensor | list[int], n: int, seed: int) -> list[int]:
    """``n`` indices into ``labels``, stratified and seeded (egat/data/subsets.py); sorted.
    Raises EgatError (naming ``robust.subset``) when n < 1 or n > len(labels)."""
    if not 1 <= n <= len(labels):
        raise EgatError(
            f"robust.subset={n}: must lie in 1..{len(labels)} (the size of the in-domain test "
            f"split), or be 'all'"
        )
    return stratified_indices(labels, n, seed).tolist()


def _loader(params: Params, domain: str) -> DataLoader:
    """The in-domain test split, or its stratified subset; validated before any attack runs."""
    from egat.data import DomainDataset, read_splits

    ds = DomainDataset(params.data.root, read_splits(params.data.splits_file), [domain], "test",
                       params.data.image_size, "grayscale", guides_root=params.data.guides_root)
    subset = params.robust.subset
    if subset != "all":
        ds = Subset(ds, stratified_subset(ds.labels, subset, params.robust.seed))
    return DataLoader(ds, batch_size=params.eval.batch_size, num_workers=params.data.num_workers)


class _Counts:
    """Running sums of correct predictions (and per-step seconds) over the batches."""

    def __init__(self):
        self.correct: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def add(self, key: str, hits: torch.Tensor, started: float) -> None:
        self.correct[key] = self.correct.get(key, 0) + int(hits.sum())
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started


def _loss_scan(model, x: torch.Tensor, y: torch.Tensor, eps: float, points: int) -> torch.Tensor:
    """Per-image cross-entropy at x + t eps sign(grad) (clipped to [0, 1]), t = 0..1: (B, points)."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    direction = grad.sign()
    with torch.no_grad():
        return torch.stack([
            F.cross_entropy(model((x + t * eps * direction).clamp(0, 1)), y, reduction="none")
            for t in torch.linspace(0, 1, points).tolist()
        ], 1)


def robust_metrics(model, params: Params, loader, device, transfer_model=None) -> dict:
    """AutoAttack and the checklist on ``loader``'s images (see the module docstring).

    Returns ``{"n", "clean", "aa", "aa_fooled_by", "checks", "seconds"}`` (accuracies in %); without
    ``transfer_model`` check (d) is left out. Seeded by ``robust.seed``.
    """
    rb, ck, ev = params.robust, params.robust.checklist, params.eval
    eps = rb.attack.eps
    aa = build_attack(model, rb.attack)
    members = aa.attacks if isinstance(aa, Ensemble) else [aa]
    apgd_cfg = rb.attack.model_copy(update={"name": "apgd"})
    sweep_eps = sorted(set(ck.eps) | {eps})
    apgd = {e: build_attack(model, apgd_cfg, e) for e in sweep_eps}
    square = build_attack(model, rb.attack.model_copy(update={"name": "square"}))
    pgd = build_attack(model, ev.attack)
    strong_cfg = ev.attack.model_copy(update={"steps": ev.attack.steps * ck.steps_factor})
    strong = Ensemble(model, [build_attack(model, strong_cfg) for _ in range(ck.restarts)])
    transfer = build_attack(transfer_model, ev.attack) if transfer_model is not None else None
    # the attacks scored after AutoAttack, by their robust.json key
    scored = {**{f"apgd@{e:g}": a for e, a in apgd.items()},
              "square": square, "pgd": pgd, "strong_pgd": strong}
    if transfer is not None:
        scored["transfer"] = transfer
    counts = _Counts()
    fooled_by = [0] * len(members)
    n = rising = zero_grad = 0
    scan_sum = torch.zeros(ck.scan_points, dtype=torch.float64)
    with seeded_scope(rb.seed, device), model_mode(model, "eval"):
        for batch in iterate_batches(loader, device):
            x, y = batch["image"], batch["label"]
            started = time.perf_counter()
            clean = correct(model, x, y)
            counts.add("clean", clean, started)
            started = time.perf_counter()
            if isinstance(aa, Ensemble):
                x_aa, by = aa.run(x, y)
                for k in range(len(members)):
                    fooled_by[k] += int((by == k).sum())
                counts.add("aa", correct(model, x_aa, y), started)
            else:
                counts.add("aa", robust(model, aa, x, y, clean), started)
            for key, attack in scored.items():
                started = time.perf_counter()
                counts.add(key, robust(model, attack, x, y, clean), started)
            started = time.perf_counter()
            with torch.enable_grad():
                scan = _loss_scan(model, x, y, eps, ck.scan_points)
            grad_free = (scan[:, 1:] == scan[:, :1]).all(1)
            rising += int((scan[:, -1] > scan[:, 0] * (1 + RISE_REL) + RISE_ABS).sum())
            zero_grad += int(grad_free.sum())
            scan_sum += scan.double().sum(0).cpu()
            counts.seconds["scan"] = counts.seconds.get("scan", 0.0) + time.perf_counter() - started
            n += len(y)
    if n == 0:
        raise EgatError("robust.subset: the in-domain test split has no images")
    acc = {k: 100.0 * v / n for k, v in counts.correct.items()}
    tol = ck.tolerance
    curve = [acc["clean"]] + [acc[f"apgd@{e:g}"] for e in ck.eps]
    checks = {
        "a": {"eps": ck.eps, "accuracy": curve[1:], "clean": acc["clean"],
              "passed": all(b <= a + tol for a, b in zip(curve, curve[1:]))
              and curve[-1] <= ck.max_final_acc + tol},
        "b": {"pgd": acc["pgd"], "strong_pgd": acc["strong_pgd"],
              "steps": strong_cfg.steps, "restarts": ck.restarts,
              "passed": acc["strong_pgd"] <= acc["pgd"] + tol},
        "c": {"square": acc["square"], "apgd": acc[f"apgd@{eps:g}"],
              "passed": acc["square"] >= acc[f"apgd@{eps:g}"] - tol},
        "e": {"rising_fraction": rising / n, "flat_fraction": zero_grad / n,
              "mean_loss": [float(v) / n for v in scan_sum], "min_rising": ck.min_rising,
              "passed": rising / n >= ck.min_rising},
    }
    if transfer is not None:
        checks["d"] = {"transfer": acc["transfer"], "white_box": acc["pgd"],
                       "passed": acc["transfer"] >= acc["pgd"] - tol}
    checks = {k: checks[k] for k in sorted(checks)}
    names = [type(m).__name__ for m in members]
    return {
        "n": n, "eps": eps, "clean": acc["clean"], "aa": acc["aa"],
        "aa_fooled_by": dict(zip(names, fooled_by)),
        "checks": checks, "failed": [k for k, c in checks.items() if not c["passed"]],
        "seconds": counts.seconds,
    }


def transfer_source(params: Params, method: str) -> str:
    rb = params.robust
    return rb.transfer_fallback if method == rb.transfer_from else rb.transfer_from


@dataclass
class RobustJob:
    """One robustness cell whose request passed every check (:func:`robust_job`): its models and
    subset are loaded, nothing is written yet."""

    cell: Params
    method: str
    domain: str
    seed: int
    source: str  # the run check (d) transfers from
    model: nn.Module
    source_model: nn.Module
    loader: DataLoader

    def run(self, evals_root: str | Path = EVALS) -> dict:
        """AutoAttack and the checklist, tracked in MLflow; writes
        <evals_root>/<method>/<domain>/seed<seed>/robust.json (without the seconds, so the file
        is the same in every run; they go to MLflow and robust_timing.json beside it)."""
        from egat.run.device import resolve_device
        from egat.stages import _logged_params, _tags
        from egat.tracking.mlflow_tracker import MlflowTracker

        cell, method, domain, seed = self.cell, self.method, self.domain, self.seed
        device = resolve_device(cell)
        key = f"robustness/{method}/{domain}/seed{seed}"
        tags = {**_tags(cell, "robustness", method, domain, seed), "run": method,
                "transfer_from": self.source}
        with MlflowTracker(key, tags, _logged_params(cell, method)) as tracker:
            result = robust_metrics(self.model.to(device), cell, self.loader, device,
                                    self.source_model.to(device))
            seconds = result.pop("seconds")
            total = sum(seconds.values())
            result.update(method=method, seed=seed, train_domain=domain, transfer_from=self.source)
            path = robust_path(method, domain, seed, evals_root)
            io.write_json(path, result)
            io.write_json(path.with_name(ROBUST_TIMING), {**seconds, "total": total})
            tracker.log_metrics({"robust/clean": result["clean"], "robust/aa": result["aa"],
                                 **{f"robust/check_{k}": float(c["passed"])
                                    for k, c in result["checks"].items()},
                                 **{f"robust/seconds/{k.replace('@', '_eps')}": v
                                    for k, v in seconds.items()},
                                 "robust/seconds/total": total}, step=0)
            tracker.log_artifact(path)
        return {**result, "seconds": seconds}


def robust_job(params: Params, method: str, domain: str, seed: int) -> RobustJob:
    """Check a robustness request on one cell's best checkpoint and load what it needs: everything
    a refused request could trip on fails here, before any MLflow run or file (the evaluate stage
    checks this before it evaluates)."""
    from egat.run.checkpoint import model_from_checkpoint
    from egat.stages import run_params

    cell = run_params(params, method, domain, seed)
    source = transfer_source(cell, method)
    model, _, ckpt = model_from_checkpoint(run_dir(params, method, domain, seed) / BEST)
    attack = cell.robust.attack
    if "apgdt" in {attack.name, *(attack.ensemble if attack.name == "autoattack" else [])} \
            and len(ckpt["classes"]) < APGDT_MIN_CLASSES:
        raise EgatError(
            f"robust.attack: apgdt (targeted DLR) needs >= {APGDT_MIN_CLASSES} classes, the data "
            f"has {len(ckpt['classes'])}; leave apgdt out of robust.attack.ensemble"
        )
    source_ckpt = run_dir(params, source, domain, seed) / BEST
    if not source_ckpt.is_file():
        raise EgatError(
            f"robust.transfer_from: check (d) needs {source}'s run of {domain}/seed{seed}, but "
            f"{str(source_ckpt)!r} does not exist; train it or set robust.transfer_from"
        )
    source_model, _, _ = model_from_checkpoint(source_ckpt)
    return RobustJob(cell, method, domain, seed, source, model, source_model, _loader(cell, domain))


def robust_run(params: Params, method: str, domain: str, seed: int,
               evals_root: str | Path = EVALS) -> dict:
    """AutoAttack and the checklist on one cell (:func:`robust_job`, then :meth:`RobustJob.run`)."""
    return robust_job(params, method, domain, seed).run(evals_root)

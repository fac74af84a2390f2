"""Evaluate a trained model on the test split of every domain (docs/method.md, Metrics).

One pass per domain computes cAcc, aAcc (the evaluation attack), Comp/Suff, explanation stability
under that same attack (the attack runs once per batch), golden-mask alignment, accuracy with the
object erased, and, where the data knows each image's spurious cue (the embedded benchmark), the
cue-follow rate and accuracy on the cue-free renders of the same images; the attack sweep (FGSM,
MI-FGSM, PGD over eps) runs on the training domains' test split. Every subset is stratified by
class and seeded by ``data.split_seed`` (egat/data/subsets.py), the same for every method and seed.
A :class:`PartClock` passed in sums the wall seconds of each part (the throughput breakdown).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from egat.build import build_attack, build_explainer
from egat.config import Params
from egat.data import DomainDataset, read_splits
from egat.data.splits import cue_free_root
from egat.data.subsets import stratified_indices, stratified_subset
from egat.metrics import (
    accumulate,
    alignment_scores,
    correct,
    cue_scores,
    erasure_scores,
    evaluate_accuracy,
    object_erased_correct,
    stability_scores,
)
from egat.metrics.catalog import METRIC_NAMES, PERCENT_METRICS
from egat.models import Classifier, model_mode
from egat.resources import suggest_batch_size_on_oom
from egat.seeding import seeded_scope


class PartClock:
    """Wall seconds per evaluation part, summed over domains and batches: ``clean`` (the forward
    pass, cAcc and the cue metrics), ``counterfactual`` (cue-free and object-erased cAcc), ``pgd``
    (the evaluation attack), ``comp_suff`` (the explanation of the prediction and the erasures),
    ``explanations`` (stability's map under attack and alignment's), ``sweep``; ``total`` is the
    whole evaluation, so that ``total`` minus the parts is data loading and bookkeeping."""

    PARTS = ("clean", "counterfactual", "pgd", "comp_suff", "explanations", "sweep")

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def part(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def as_dict(self) -> dict[str, float]:
        return {k: round(self.seconds.get(k, 0.0), 3) for k in (*self.PARTS, "total")}


def _loader(params: Params, splits: dict, domains: list[str], max_examples: int,
            images: str = "observed") -> DataLoader:  # fmt: skip
    """The test split of ``domains``, cut to a stratified subset of ``max_examples`` (0 = all),
    in split order (so that the observed and the cue-free loader yield the same images)."""
    # Guides play no part in evaluation; golden masks come with the batches where they exist.
    ds = DomainDataset(
        params.data.root, splits, domains, "test", params.data.image_size, "grayscale",
        guides_root=params.data.guides_root, images=images,
    )
    subset = stratified_subset(ds, max_examples, params.data.split_seed)
    return DataLoader(subset, batch_size=params.eval.batch_size, num_workers=params.data.num_workers)


def _seeded(fn):
    """Run ``fn(model, params, loader, device)`` on a forked RNG seeded by ``train.seed``: the
    attacks' random starts are the same in every run and every domain order, and the caller's
    RNG stream is left as it was."""

    @functools.wraps(fn)
    def wrapper(model: Classifier, params: Params, loader, device, *args, **kwargs):
        device = torch.device(device)
        with seeded_scope(params.train.seed, device):
            return fn(model, params, loader, device, *args, **kwargs)

    return wrapper


@_seeded
def evaluate_domain(model: Classifier, params: Params, loader, device, cue_free_loader=None,
                    costly_ids: torch.Tensor | None = None,
                    clock: PartClock | None = None) -> dict[str, float]:  # fmt: skip
    """All per-domain metrics in one pass over ``loader`` (and, in step, ``cue_free_loader``: the
    cue-free renders of the same images in the same order, where the data has them).

    The metrics that need an attack or explanations (aAcc, Comp/Suff, stability, alignment;
    :func:`costly_scores`) run on the images whose ``index`` is in ``costly_ids`` (None: all); the
    forward-only ones (cAcc, the cue metrics, cue-free and object-erased cAcc) on every image.
    Streams (egat.metrics.stream): only running sums outlive a batch, so memory is flat in the
    test-set size. Per-image sums of squares of Comp and Suff are kept for their confidence
    intervals (``comp_sd``).
    """
    ev, clock = params.eval, clock or PartClock()
    attack = build_attack(model, ev.attack)
    explainer = build_explainer(ev.explainer, model, params.explainer)
    cue_free = iter(cue_free_loader) if cue_free_loader is not None else None

    def score(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch["image"], batch["label"]
        with clock.part("clean"):
            with torch.no_grad():
                probs = model(x).softmax(1)
            pred = probs.argmax(1)
            scores = {"cacc": pred == y}
            cue = batch.get("cue")
            if cue is not None and bool((cue >= 0).all()):  # -1: the data knows no cue
                scores.update(cue_scores(pred, y, cue))
        with clock.part("counterfactual"):
            if "mask" in batch:
                scores["object_erased_cacc"] = object_erased_correct(
                    model, x, y, batch["mask"], ev.faithfulness.baseline)
            if cue_free is not None:
                scores["cue_free_cacc"] = correct(model, next(cue_free)["image"].to(device), y)
        costly = (torch.isin(batch["index"], costly_ids.to(device)) if costly_ids is not None
                  else torch.ones_like(y, dtype=torch.bool))
        if bool(costly.any()):
            scores.update(costly_scores(
                model, explainer, attack, x[costly], y[costly], probs[costly],
                batch["mask"][costly] if "mask" in batch else None,
                ks=ev.faithfulness.ks, baseline=ev.faithfulness.baseline, top=ev.stability_top,
                clock=clock,
            ))
        return scores

    with model_mode(model, "eval"):
        sums = accumulate(loader, device, score)
    out = {key: value for key, value in sums.means().items() if not key.endswith("_sq")}
    for key in ("comp", "suff"):  # per-image std, for confidence intervals over test images
        mean_sq = sums.mean(f"{key}_sq")
        out[f"{key}_sd"] = 100.0 * max(mean_sq - out[key] ** 2, 0.0) ** 0.5
    for key in PERCENT_METRICS & out.keys():
        out[key] *= 100.0
    out["n"] = sums.counts["cacc"]
    out["n_costly"] = sums.counts["aacc"]
    if "cue_follow" in sums.counts:
        out["n_cue_mismatch"] = sums.counts["cue_follow"]
    return out


def costly_scores(model, explainer, attack, images: torch.Tensor, labels: torch.Tensor,
                  probs: torch.Tensor, masks: torch.Tensor | None, *, ks: Sequence[float],
                  baseline: str, top: float,
                  clock: PartClock | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per-image aAcc, Comp/Suff (and their squares), stability under the attack and, where
    ``masks`` are given, alignment, of one batch's chosen images (``probs``: the model's softmax
    on ``images``). Comp/Suff explain the predicted class c; stability compares E(x) with E(x')
    for that same c; alignment explains the true class (the pointing-game protocol). Scores that
    are float32 come back as float64, so that sums over a test set are in double precision.

    The attack runs once, then the explainer on (c, x), (c, x') and, with masks, (label, x), in this
    order: their random draws (random start, SmoothGrad's noise) follow one another as listed.
    """
    pred, clock = probs.argmax(1), clock or PartClock()
    with clock.part("pgd"):
        # every image is attacked (stability compares E(x) and E(x') on all of them); aAcc still
        # counts a clean mistake as not robust, like egat.metrics.accuracy.robust
        adversarial = attack(images, labels)
        scores = {"aacc": (pred == labels) & correct(model, adversarial, labels)}
    with clock.part("comp_suff"):
        maps = explainer.attribute(images, pred)
        c, s = erasure_scores(model, images, maps, pred, ks, baseline,
                              clean_prob=probs.gather(1, pred[:, None])[:, 0])
        comp, suff = c.mean(0), s.mean(0)  # per image, averaged over the k bins
        scores.update(comp=comp.double(), comp_sq=(comp**2).double(),
                      suff=suff.double(), suff_sq=(suff**2).double())
    with clock.part("explanations"):
        scores.update(stability_scores(maps, explainer.attribute(adversarial, pred), top))
        if masks is not None:
            hits, mass = alignment_scores(explainer.attribute(images, labels), masks)
            scores.update(pointing_game=hits, mass_in_mask=mass.double())
    return scores


@_seeded
def attack_sweep(model: Classifier, params: Params, loader, device) -> dict[str, dict[str, float]]:
    """Accuracy (%) under each sweep attack and eps: {attack: {eps: acc}}.

    With ``eval.sweep.nested`` each attack's eps (an increasing list) attacks only the
    images the smaller ones left right: an example within a smaller ball lies in every larger one,
    so the result is the per-image worst case over eps' <= eps (monotone in eps; with the same
    random starts never above the eps-by-eps accuracy) at a fraction of the cost once the small
    eps have fooled most images.
    """
    sweep = params.eval.sweep
    attacks, survivors_of = {}, {}
    for name in sweep.attacks:
        cfg = params.eval.attack.model_copy(update={"name": name, "steps": sweep.steps})
        smaller = None
        for eps in sweep.eps:
            # PGD keeps its eps/alpha ratio of the main evaluation attack; MI-FGSM uses eps/T.
            alpha = eps * params.eval.attack.alpha / max(params.eval.attack.eps, 1e-12)
            attack_cfg = cfg.model_copy(update={"alpha": alpha})
            key = f"{name}@{eps:g}"
            attacks[key] = build_attack(model, attack_cfg, eps)
            if sweep.nested and smaller is not None:
                survivors_of[key] = smaller
            smaller = key
    acc = evaluate_accuracy(model, loader, device, attacks, survivors_of=survivors_of)
    result: dict[str, dict[str, float]] = {name: {} for name in sweep.attacks}
    for key, value in acc.items():
        if key != "clean":
            name, eps = key.split("@")
            result[name][eps] = value
    return result


def attack_sweep_loader(params: Params, splits: dict, train_domains: list[str]) -> DataLoader:
    """The sweep's images: a stratified, seeded ``eval.sweep.max_examples`` of the training
    domains' test split."""
    return _loader(params, splits, train_domains, params.eval.sweep.max_examples)


def costly_ids(loader: DataLoader, params: Params, in_domain: bool) -> torch.Tensor:
    """The ``index`` of the images the costly metrics run on: a stratified subset of
    ``eval.costly_examples`` of the loader's images, or of ``eval.ood_costly_examples`` where the
    loader holds a test domain outside the training domains (0 = all)."""
    ev = params.eval
    count = ev.costly_examples if in_domain or ev.ood_costly_examples is None \
        else ev.ood_costly_examples
    ds, rows = loader.dataset, None
    if isinstance(ds, torch.utils.data.Subset):
        ds, rows = ds.dataset, torch.as_tensor(ds.indices)
    labels = ds.labels if rows is None else ds.labels[rows]
    indices = ds.indices if rows is None else ds.indices[rows]
    chosen = stratified_indices(labels, count, params.data.split_seed)
    return indices[torch.from_numpy(chosen)]


@suggest_batch_size_on_oom("eval.batch_size", "evaluation")
def evaluate_model(
    model: Classifier, params: Params, train_domains: list[str], device=None,
    clock: PartClock | None = None,
) -> dict:
    """Metrics on every domain's test split, the attack sweep, and a flat summary for DVC
    (``clock``: where the seconds per part are summed)."""
    clock = clock or PartClock()
    with clock.part("total"):
        return _evaluate_model(model, params, train_domains, device, clock)


def _evaluate_model(model: Classifier, params: Params, train_domains: list[str], device,
                    clock: PartClock) -> dict:  # fmt: skip
    """:func:`evaluate_model`'s body, inside the clock's ``total``."""
    device = device or torch.device("cpu")
    model = model.to(device)
    splits = read_splits(params.data.splits_file)
    per_domain = {}
    has_cue_free = cue_free_root(params.data.root, splits) is not None
    n = params.eval.max_examples
    for domain in tqdm(splits["domains"], desc="evaluate", unit="domain", disable=not params.train.progress):
        loader = _loader(params, splits, [domain], n)
        cue_free = _loader(params, splits, [domain], n, "cue_free") if has_cue_free else None
        in_domain = domain in train_domains
        metrics = evaluate_domain(model, params, loader, device, cue_free,
                                  costly_ids(loader, params, in_domain), clock=clock)
        metrics["in_domain"] = in_domain
        per_domain[domain] = metrics
    sweep_loader = attack_sweep_loader(params, splits, train_domains)
    with clock.part("sweep"):
        sweep = attack_sweep(model, params, sweep_loader, device)
    summary = {}
    for group, in_domain in (("id", True), ("ood", False)):
        chosen = [m for m in per_domain.values() if m["in_domain"] == in_domain]
        if not chosen:
            continue
        for key in METRIC_NAMES:  # each metric averaged over the group's test domains
            values = [m[key] for m in chosen if key in m]
            if values:
                summary[f"{group}_{key}"] = sum(values) / len(values)
    return {"train_domains": train_domains, "domains": per_domain, "sweep": sweep,
            "sweep_n": len(sweep_loader.dataset), "summary": summary}


def evaluate_checkpoint(checkpoint: str | Path, overrides: list[str] | None = None) -> dict:
    """Evaluate a best.pt with the params stored in it (``overrides`` adjust eval/data keys)."""
    from egat.build import params_from_dict
    from egat.config import apply_overrides
    from egat.run.checkpoint import model_from_checkpoint, training_domains
    from egat.run.device import resolve_device

    model, params, ckpt = model_from_checkpoint(checkpoint)
    if overrides:
        params = params_from_dict(apply_overrides(params.model_dump(mode="json"), overrides))
    device = resolve_device(params)
    return evaluate_model(model, params, training_domains(params, ckpt["domains"]), device)

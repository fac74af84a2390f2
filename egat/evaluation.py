"""Evaluate a trained model on the test split of every domain (SPEC section 4).

One pass per domain computes cAcc, aAcc (the evaluation attack), Comp/Suff, explanation stability
under that same attack (the attack runs once per batch) and golden-mask alignment; the attack
sweep (FGSM, MI-FGSM, PGD over eps) runs on the training domains' test split.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from egat.attacks import build_attack, model_mode
from egat.config import Params
from egat.data import DomainDataset, read_splits
from egat.explain import build_explainer
from egat.metrics import (
    alignment_scores,
    erasure_scores,
    evaluate_accuracy,
    iterate_batches,
    spearman_rows,
    top_intersection,
)
from egat.models import Classifier
from egat.resources import suggest_batch_size_on_oom
from egat.seeding import seeded_scope


def _loader(params: Params, splits: dict, domains: list[str]) -> DataLoader:
    # Guides play no part in evaluation; golden masks come with the batches where they exist.
    ds = DomainDataset(
        params.data.root, splits, domains, "test", params.data.image_size, "grayscale",
        guides_root=params.data.guides_root,
    )
    return DataLoader(ds, batch_size=params.eval.batch_size, num_workers=params.data.num_workers)


def _seeded(fn):
    """Run ``fn(model, params, loader, device)`` on a forked RNG seeded by ``train.seed``: the
    attacks' random starts are the same in every run and every domain order, and the caller's
    RNG stream is left as it was."""

    @functools.wraps(fn)
    def wrapper(model: Classifier, params: Params, loader, device):
        device = torch.device(device)
        with seeded_scope(params.train.seed, device):
            return fn(model, params, loader, device)

    return wrapper


@_seeded
def evaluate_domain(model: Classifier, params: Params, loader, device) -> dict[str, float]:
    """All per-domain metrics in one pass over ``loader``.

    Streams: only running sums outlive a batch, so memory is flat in the test-set size.
    """
    ev = params.eval
    attack = build_attack(model, ev.attack)
    explainer = build_explainer(ev.explainer, model, params.explainer)
    n = clean = adv = rho_n = masked = 0
    comp = suff = rho_sum = top_sum = hit_sum = mass_sum = 0.0
    with model_mode(model, "eval"):
        for batch in iterate_batches(loader, device, ev.max_examples):
            x, y = batch["image"], batch["label"]
            with torch.no_grad():
                probs = model(x).softmax(1)
            pred = probs.argmax(1)
            x_adv = attack(x, y)
            with torch.no_grad():
                adv += int((model(x_adv).argmax(1) == y).sum())
            clean += int((pred == y).sum())
            maps = explainer.attribute(x, pred)
            c, s = erasure_scores(
                model, x, maps, pred, ev.faithfulness.ks, ev.faithfulness.baseline,
                clean_prob=probs.gather(1, pred[:, None])[:, 0],
            )
            comp += float(c.mean(0).sum())
            suff += float(s.mean(0).sum())
            adv_maps = explainer.attribute(x_adv, pred)
            flat, adv_flat = maps.flatten(1), adv_maps.flatten(1)
            rho = spearman_rows(flat, adv_flat)
            rho_sum += float(rho.double().nansum())
            rho_n += int((~rho.isnan()).sum())
            top_sum += float(top_intersection(flat, adv_flat, ev.stability_top).double().sum())
            if "mask" in batch:
                h, m = alignment_scores(explainer.attribute(x, y), batch["mask"])
                hit_sum += float(h.double().sum())
                mass_sum += float(m.double().sum())
                masked += len(y)
            n += len(y)
    out = {
        "cacc": 100.0 * clean / n,
        "aacc": 100.0 * adv / n,
        "comp": 100.0 * comp / n,
        "suff": 100.0 * suff / n,
        "spearman": rho_sum / rho_n if rho_n else float("nan"),
        "top_intersection": top_sum / n,
        "n": n,
    }
    if masked:
        out["pointing_game"] = hit_sum / masked
        out["mass_in_mask"] = mass_sum / masked
    return out


@_seeded
def attack_sweep(model: Classifier, params: Params, loader, device) -> dict[str, dict[str, float]]:
    """Accuracy (%) under each sweep attack and eps: {attack: {eps: acc}}."""
    sweep = params.eval.sweep
    attacks = {}
    for name in sweep.attacks:
        cfg = params.eval.attack.model_copy(update={"name": name, "steps": sweep.steps})
        for eps in sweep.eps:
            # PGD keeps its eps/alpha ratio of the main evaluation attack; MI-FGSM uses eps/T.
            alpha = eps * params.eval.attack.alpha / max(params.eval.attack.eps, 1e-12)
            attack_cfg = cfg.model_copy(update={"alpha": alpha})
            attacks[f"{name}@{eps:g}"] = build_attack(model, attack_cfg, eps)
    acc = evaluate_accuracy(model, loader, device, attacks, sweep.max_examples)
    result: dict[str, dict[str, float]] = {name: {} for name in sweep.attacks}
    for key, value in acc.items():
        if key != "clean":
            name, eps = key.split("@")
            result[name][eps] = value
    return result


@suggest_batch_size_on_oom("eval.batch_size", "evaluation")
def evaluate_model(
    model: Classifier, params: Params, train_domains: list[str], device=None
) -> dict:
    """Metrics on every domain's test split, the attack sweep, and a flat summary for DVC."""
    device = device or torch.device("cpu")
    model = model.to(device)
    splits = read_splits(params.data.splits_file)
    per_domain = {}
    for domain in tqdm(splits["domains"], desc="evaluate", unit="domain", disable=not params.train.progress):
        metrics = evaluate_domain(model, params, _loader(params, splits, [domain]), device)
        metrics["in_domain"] = domain in train_domains
        per_domain[domain] = metrics
    sweep = attack_sweep(model, params, _loader(params, splits, train_domains), device)
    summary = {}
    for group, in_domain in (("id", True), ("ood", False)):
        chosen = [m for m in per_domain.values() if m["in_domain"] == in_domain]
        if not chosen:
            continue
        for key in ("cacc", "aacc", "comp", "suff", "spearman", "top_intersection",
                    "pointing_game", "mass_in_mask"):
            values = [m[key] for m in chosen if key in m]
            if values:
                summary[f"{group}_{key}"] = sum(values) / len(values)
    return {"train_domains": train_domains, "domains": per_domain, "sweep": sweep, "summary": summary}


def evaluate_checkpoint(checkpoint: str | Path, overrides: list[str] | None = None) -> dict:
    """Evaluate a best.pt with the params stored in it (``overrides`` adjust eval/data keys)."""
    from egat.config import apply_overrides, params_from_dict
    from egat.train.trainer import model_from_checkpoint, resolve_device, training_domains

    model, params, ckpt = model_from_checkpoint(checkpoint)
    if overrides:
        params = params_from_dict(apply_overrides(params.model_dump(mode="json"), overrides))
    device = resolve_device(params)
    return evaluate_model(model, params, training_domains(params, ckpt["domains"]), device)

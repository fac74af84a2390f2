"""Stability of explanations under attack (beyond the paper; docs/method.md, Metrics).

For each image, E(x) (the explanation of the predicted class c on x) is compared with E(x') (the
explanation of the same class c on x' = attack(x, y)) on the flattened feature-resolution maps by
* Spearman's rank correlation (average ranks for ties), and
* top-p intersection: the fraction of the top-p entries of E(x) that are also top-p in E(x')
  (Ghorbani et al., "Interpretation of Neural Networks Is Fragile", AAAI 2019).
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Mapping

import torch
from scipy.stats import ConstantInputWarning, pearsonr, rankdata
from torch import nn

from egat.metrics.accuracy import iterate_batches
from egat.metrics.faithfulness import descending_ranks, top_count
from egat.models.mode import model_mode


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of each row of ``a`` with the same row of ``b`` ((B, N) -> (B,)).

    NaN where a row is constant (the correlation is undefined there, e.g. an all-zero map).
    """
    ranks_a = rankdata(a.detach().cpu().double().numpy(), axis=1)
    ranks_b = rankdata(b.detach().cpu().double().numpy(), axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        return torch.from_numpy(pearsonr(ranks_a, ranks_b, axis=1).statistic)


def top_intersection(a: torch.Tensor, b: torch.Tensor, fraction: float) -> torch.Tensor:
    """Share of each row's top-``fraction`` entries of ``a`` that are also top in ``b`` (B,).

    Both tops hold :func:`top_count` entries; ties are broken by index (deterministic).
    """
    count = top_count(fraction, a.shape[1])
    in_top_a = descending_ranks(a) < count
    in_top_b = descending_ranks(b) < count
    return (in_top_a & in_top_b).sum(1).double() / count


def explanation_stability(
    model: nn.Module,
    explainer,
    loader: Iterable[Mapping[str, object]],
    attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device | str,
    top: float = 0.1,
    max_examples: int = 0,
) -> dict[str, float]:
    """Mean Spearman correlation and top-p intersection between E(x) and E(attack(x, y)).

    Args:
        model: on ``device``; evaluated in eval mode (previous modes restored afterwards).
        explainer: ``explainer.attribute(images, target) -> (B, h, w)`` maps.
        loader: dict batches with "image" (B, 3, H, W) in [0, 1] and "label" (B,).
        attack: ``attack(x, y) -> x_adv`` (e.g. the evaluation PGD).
        top: p of the top-p intersection (``EvalParams.stability_top``).
        max_examples: evaluate only the first N images (0 = all).

    Returns:
        ``{"spearman": ..., "top_intersection": ..., "spearman_undefined": ...}``, all in [0, 1]
        (Spearman in [-1, 1]). The Spearman mean skips images where either map is constant;
        ``spearman_undefined`` is the fraction of such images.

    Example::

        explanation_stability(model, GradCAM(model), loader, PGD(model, 8/255, 2/255, 10), "cpu")
    """
    rho_sum = top_sum = 0.0
    defined = total = 0  # running sums only: memory stays flat in the number of images
    with model_mode(model, "eval"):
        for batch in iterate_batches(loader, device, max_examples):
            images, labels = batch["image"], batch["label"]
            with torch.no_grad():
                target = model(images).argmax(1)
            adversarial = attack(images, labels)
            clean_maps = explainer.attribute(images, target).detach().flatten(1)
            adversarial_maps = explainer.attribute(adversarial, target).detach().flatten(1)
            rho = spearman_rows(clean_maps, adversarial_maps)
            rho_sum += float(rho.double().nansum())
            defined += int((~rho.isnan()).sum())
            top_sum += float(top_intersection(clean_maps, adversarial_maps, top).double().sum())
            total += len(images)
    if total == 0:
        raise ValueError("explanation_stability: the loader yielded no examples")
    return {
        "spearman": rho_sum / defined if defined else float("nan"),
        "top_intersection": top_sum / total,
        "spearman_undefined": (total - defined) / total,
    }

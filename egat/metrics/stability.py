"""Stability of explanations under attack (beyond the paper; docs/method.md, Metrics).

For each image, E(x) (the explanation of the predicted class c on x) is compared with E(x') (the
explanation of the same class c on x' = attack(x, y)) on the flattened feature-resolution maps by
* Spearman's rank correlation (average ranks for ties), and
* top-p intersection: the fraction of the top-p entries of E(x) that are also top-p in E(x')
  (Ghorbani et al., "Interpretation of Neural Networks Is Fragile", AAAI 2019).
"""

from __future__ import annotations

import warnings

import torch

from egat.metrics.faithfulness import descending_ranks, top_count


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of each row of ``a`` with the same row of ``b`` ((B, N) -> (B,)).

    NaN where a row is constant (the correlation is undefined there, e.g. an all-zero map).
    """
    # scipy here, not at module level: a training process imports this package and never ranks
    from scipy.stats import ConstantInputWarning, pearsonr, rankdata

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


def stability_scores(maps: torch.Tensor, adversarial_maps: torch.Tensor, top: float
                     ) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per-image stability of E(x) (``maps``) under attack (``adversarial_maps``, E(x') of the
    same class), both (B, ...) and flattened here: ``spearman`` for the images where it is defined
    (an image where either map is constant is left out of its mean) and ``top_intersection`` (B,)
    with p = ``top`` (``EvalParams.stability_top``)."""
    flat, adversarial_flat = maps.flatten(1), adversarial_maps.flatten(1)
    rho = spearman_rows(flat, adversarial_flat)
    return {"spearman": rho[~rho.isnan()],
            "top_intersection": top_intersection(flat, adversarial_flat, top)}

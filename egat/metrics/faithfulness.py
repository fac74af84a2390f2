"""Comprehensiveness and sufficiency of explanations (ERASER AOPC form, docs/method.md, Metrics).

DeYoung et al., "ERASER: A Benchmark to Evaluate Rationalized NLP Models", ACL 2020, adapted to
images: for the predicted class c and each k in ``ks`` (percent of pixels),

    comp_k = p_c(x) - p_c(x with the top-k% pixels replaced by the baseline)
    suff_k = p_c(x) - p_c(x with all but the top-k% pixels replaced by the baseline)

averaged over k, then over images, times 100. Higher comp and lower suff are better.
Pixels are ranked by the explanation of c upsampled (bilinear) to the image size; a "pixel" is a
spatial position, all channels together.

Also home of the ranking helpers the stability and alignment metrics share, and of the accuracy
with the object erased (:func:`object_erased_correct`, the same baselines).
"""

from __future__ import annotations

import math
from typing import Iterable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from egat.metrics.accuracy import correct
from egat.metrics.stream import accumulate
from egat.models.mode import model_mode

Baseline = Literal["black", "blur", "mean"]


def descending_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry within its row of ``scores`` (B, N): 0 = largest.

    Ties go to the lower index (stable sort), so the ranking is deterministic.
    """
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def top_count(fraction: float, n: int) -> int:
    """How many of ``n`` entries the top ``fraction`` holds: round(fraction * n), at least 1."""
    return max(1, math.floor(fraction * n + 0.5))


def upsample_maps(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear upsampling of explanation maps (B, h, w) to (B, *size)."""
    upsampled = F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)
    return upsampled[:, 0]


def blur_baseline(images: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """Gaussian-blurred copy of ``images`` (B, C, H, W): the `blur` erasure baseline.

    ``sigma`` defaults to min(H, W) / 16 pixels (2 px at 32 px, 14 px at 224 px: the same blur
    relative to the image); the kernel spans +-3 sigma, size 2 * ceil(3 sigma) + 1.
    """
    # torchvision only for this baseline (egat/models/zoo.py says what the import costs)
    from torchvision.transforms.functional import gaussian_blur

    if sigma is None:
        sigma = min(images.shape[-2:]) / 16
    kernel = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur(images, [kernel, kernel], [sigma, sigma])


def baseline_fill(images: torch.Tensor, baseline: Baseline, blur_sigma: float | None = None):
    """What erased pixels become: black (0), a blurred copy (:func:`blur_baseline`), or each
    image's mean colour (B, C, 1, 1)."""
    if baseline == "black":
        return torch.zeros_like(images)
    if baseline == "blur":
        return blur_baseline(images, blur_sigma)
    if baseline == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    raise ValueError(f"baseline must be 'black', 'blur' or 'mean', got {baseline!r}")


def erasure_scores(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    target: torch.Tensor,
    ks: Sequence[float],
    baseline: Baseline = "black",
    clean_prob: torch.Tensor | None = None,
    blur_sigma: float | None = None,
    forward_batch: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image comprehensiveness and sufficiency for one batch, in probability units.

    Args:
        model: returns logits; used as is (set its mode before calling).
        images: (B, C, H, W) in [0, 1].
        maps: explanations of ``target``, (B, h, w) at any resolution (upsampled to H x W).
        target: (B,) class whose probability is measured (the predicted class).
        ks: percentages of pixels, each in (0, 100]; k% of H*W is rounded, at least one pixel.
        baseline: "black", "blur" or "mean" (:func:`baseline_fill`).
        clean_prob: p_target(images), (B,), if already known (saves a forward pass).
        blur_sigma: see :func:`blur_baseline`.
        forward_batch: most images per forward pass; the 2 * len(ks) variants of the batch go
            through in as few passes as this allows (256 ran fastest per image on CPU; raise it
            on a GPU).

    Returns:
        ``(comp, suff)``, each (len(ks), B): ``p_c(x) - p_c(x_erased)``.
    """
    batch, _, height, width = images.shape
    rows = torch.arange(batch, device=images.device)
    with torch.no_grad():
        if clean_prob is None:
            clean_prob = model(images).softmax(1)[rows, target]
        ranks = descending_ranks(upsample_maps(maps.detach(), (height, width)).flatten(1))
        counts = torch.tensor([top_count(k / 100, height * width) for k in ks], device=ranks.device)
        top = ranks[None] < counts[:, None, None]  # (K, B, H*W)
        # comp erases the top pixels, suff erases the others: 2K variants of every image.
        erase = torch.cat([top, ~top]).view(2 * len(ks), batch, 1, height, width)
        fill = baseline_fill(images, baseline, blur_sigma)
        per_pass = max(1, forward_batch // batch)
        erased_probs = []
        for group in erase.split(per_pass):
            variants = torch.where(group, fill, images).flatten(0, 1)
            probs = model(variants).softmax(1).view(len(group), batch, -1)
            erased_probs.append(probs[:, rows, target])
        drops = clean_prob - torch.cat(erased_probs)
    return drops[: len(ks)], drops[len(ks) :]


def faithfulness(
    model: nn.Module,
    explainer,
    loader: Iterable[Mapping[str, object]],
    device: torch.device | str,
    ks: Sequence[float] = (1, 5, 10, 20, 50),
    baseline: Baseline = "black",
    max_examples: int = 0,
    blur_sigma: float | None = None,
    forward_batch: int = 256,
) -> dict[str, float]:
    """Comprehensiveness and sufficiency (x100) of ``explainer`` for ``model`` over ``loader``.

    Args:
        model: on ``device``; evaluated in eval mode (previous modes restored afterwards).
        explainer: ``explainer.attribute(images, target) -> (B, h, w)`` maps.
        loader: dict batches with "image" (B, 3, H, W) in [0, 1].
        ks, baseline: see :class:`egat.config.FaithfulnessParams`.
        max_examples: evaluate only the first N images (0 = all).
        blur_sigma, forward_batch: see :func:`erasure_scores`.

    Returns:
        ``{"comp": ..., "suff": ..., "comp_k<k>": ..., "suff_k<k>": ...}`` (e.g. "comp_k5").

    Example::

        faithfulness(model, GradCAM(model), test_loader, "cpu", ks=[1, 5, 10, 20, 50])
        # {"comp": 31.2, "suff": 12.5, "comp_k1": 4.0, ...}
    """
    if baseline not in ("black", "blur", "mean"):
        raise ValueError(f"faithfulness: baseline must be 'black', 'blur' or 'mean', got {baseline!r}")

    def score(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        with torch.no_grad():
            probs = model(images).softmax(1)
        target = probs.argmax(1)
        maps = explainer.attribute(images, target)
        comp, suff = erasure_scores(
            model,
            images,
            maps,
            target,
            ks,
            baseline,
            clean_prob=probs[torch.arange(len(target)), target],
            blur_sigma=blur_sigma,
            forward_batch=forward_batch,
        )
        # Row i is k = ks[i]; float32 scores, so each batch sums in float32 (validation's
        # val/comp as it has always been computed).
        return {**{f"comp{i}": row for i, row in enumerate(comp)},
                **{f"suff{i}": row for i, row in enumerate(suff)}}

    with model_mode(model, "eval"):
        sums = accumulate(loader, device, score, max_examples)
    total = sums.counts.get("comp0", 0)
    if total == 0:
        raise ValueError("faithfulness: the loader yielded no examples")
    comp_k = [100 * sums.sums[f"comp{i}"] / total for i in range(len(ks))]
    suff_k = [100 * sums.sums[f"suff{i}"] / total for i in range(len(ks))]
    result = {"comp": sum(comp_k) / len(ks), "suff": sum(suff_k) / len(ks)}
    for k, comp_value, suff_value in zip(ks, comp_k, suff_k):
        result[f"comp_k{k:g}"] = comp_value
        result[f"suff_k{k:g}"] = suff_value
    return result


def object_erased_correct(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
    baseline: Baseline = "black",
) -> torch.Tensor:
    """Per image (B,) bool: is the prediction still the label with the object's pixels (``masks``
    (B, 1, H, W) in {0, 1}) replaced by the erasure ``baseline`` (:func:`baseline_fill`)?"""
    with torch.no_grad():
        erased = torch.where(masks.bool(), baseline_fill(images, baseline), images)
    return correct(model, erased, labels)

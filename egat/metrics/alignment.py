"""Alignment of explanations with golden object masks (beyond the paper; docs/method.md, Metrics).

* Pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016; here
  without tolerance): a hit when the maximum of the upsampled explanation lies inside the mask.
* Mass in mask: the share of the upsampled explanation's total mass that lies inside the mask.

An all-zero explanation points nowhere and holds no mass: it counts as a miss with mass 0.
"""

from __future__ import annotations

from typing import Iterable, Literal, Mapping

import torch
from torch import nn

from egat.errors import EgatError
from egat.metrics.accuracy import iterate_batches
from egat.metrics.faithfulness import upsample_maps
from egat.models.mode import model_mode


def alignment_scores(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointing-game hits (B,) bool and mass in mask (B,) for maps (B, h, w) >= 0 and masks
    (B, 1, H, W) or (B, H, W) in {0, 1}; maps are upsampled (bilinear) to H x W first.
    """
    height, width = masks.shape[-2:]
    maps = upsample_maps(maps.detach(), (height, width)).flatten(1)
    inside = masks.reshape(len(masks), height * width) > 0.5
    total = maps.sum(1)
    nonempty = total > 0
    hits = inside.gather(1, maps.argmax(1, keepdim=True))[:, 0] & nonempty
    mass = torch.where(nonempty, (maps * inside).sum(1) / total.clamp_min(1e-12), 0.0)
    return hits, mass


def explanation_alignment(
    model: nn.Module,
    explainer,
    loader: Iterable[Mapping[str, object]],
    device: torch.device | str,
    target: Literal["label", "pred"] = "label",
    max_examples: int = 0,
) -> dict[str, float]:
    """Pointing-game hit rate and mean mass in mask, both fractions in [0, 1].

    Args:
        model: on ``device``; evaluated in eval mode (previous modes restored afterwards).
        explainer: ``explainer.attribute(images, target) -> (B, h, w)`` maps.
        loader: dict batches with "image", "label" and "mask" (B, 1, H, W) in {0, 1}.
        target: explain the true class ("label", the pointing-game protocol) or the predicted one.
        max_examples: evaluate only the first N images (0 = all).

    Returns:
        ``{"pointing_game": ..., "mass_in_mask": ..., "empty": ...}``; ``empty`` is the fraction of
        all-zero explanations (scored as misses with mass 0).

    Example::

        explanation_alignment(model, GradCAM(model), test_loader, "cpu")
        # {"pointing_game": 0.81, "mass_in_mask": 0.50, "empty": 0.0}
    """
    if target not in ("label", "pred"):
        raise ValueError(f"explanation_alignment: target must be 'label' or 'pred', got {target!r}")
    hits, masses, empty, total = 0, 0.0, 0, 0
    with model_mode(model, "eval"):
        for batch in iterate_batches(loader, device, max_examples):
            if "mask" not in batch:
                raise EgatError(
                    "explanation alignment needs golden object masks: the batches have no 'mask'"
                )
            images = batch["image"]
            if target == "label":
                classes = batch["label"]
            else:
                with torch.no_grad():
                    classes = model(images).argmax(1)
            maps = explainer.attribute(images, classes)
            batch_hits, batch_mass = alignment_scores(maps, batch["mask"])
            hits += int(batch_hits.sum())
            masses += float(batch_mass.double().sum())
            empty += int((maps.detach().flatten(1).sum(1) <= 0).sum())
            total += len(images)
    if total == 0:
        raise ValueError("explanation_alignment: the loader yielded no examples")
    return {"pointing_game": hits / total, "mass_in_mask": masses / total, "empty": empty / total}

"""Alignment of explanations with golden object masks (beyond the paper; docs/method.md, Metrics).

* Pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016; here
  without tolerance): a hit when the maximum of the upsampled explanation lies inside the mask.
* Mass in mask: the share of the upsampled explanation's total mass that lies inside the mask.

An all-zero explanation points nowhere and holds no mass: it counts as a miss with mass 0.
"""

from __future__ import annotations

import torch

from egat.metrics.faithfulness import upsample_maps


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

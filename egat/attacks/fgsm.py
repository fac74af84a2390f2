"""FGSM: Goodfellow, Shlens & Szegedy,
"Explaining and Harnessing Adversarial Examples", ICLR 2015.
"""

from __future__ import annotations

import torch

from egat.attacks.base import Attack, attack_registry


@attack_registry.register("fgsm")
class FGSM(Attack):
    """One signed-gradient step of size eps: ``x' = clip(x + eps * sign(grad_x CE), 0, 1)``.

    Args: ``model``, ``eps``, ``model_mode`` as in :class:`Attack`.
    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x' (B, C, H, W).

    Example::

        attack = FGSM(model, eps=8 / 255)
        x_adv = attack(images, labels)
    """

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lower, upper = self.bounds(x)
        return self.ascend_(x.clone(), self.input_gradient(x, y), self.eps, lower, upper)

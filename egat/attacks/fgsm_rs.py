"""FGSM with random start: Wong, Rice & Kolter, "Fast is better than free: Revisiting adversarial
training", ICLR 2020.
"""

from __future__ import annotations

import torch
from torch import nn

from egat.attacks.base import Attack, attack_registry
from egat.models.mode import ModelMode


@attack_registry.register("fgsm_rs")
class FGSMRandomStart(Attack):
    """One signed-gradient step from a uniform random point of the eps ball (a training attack).

    ``x_0 = clip(x + U(-eps, eps), 0, 1)``, then
    ``x' = Proj_{B(x, eps) & [0,1]}(x_0 + alpha * sign(grad_x CE(f(x_0), y)))`` with
    ``alpha = 1.25 eps`` by default (the paper's choice: larger steps than eps need the projection,
    smaller ones under-attack; alpha >= 2 eps led to catastrophic overfitting in the paper).

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x' (B, C, H, W). The random start uses torch's
    global RNG.

    Example::

        attack = FGSMRandomStart(model, eps=8 / 255)       # alpha = 10/255
        x_adv = attack(images, labels)
    """

    training_only = True

    def __init__(
        self, model: nn.Module, eps: float, alpha: float | None = None, model_mode: ModelMode = "eval"
    ):
        super().__init__(model, eps, model_mode)
        alpha = 1.25 * eps if alpha is None else alpha
        self._require_non_negative("alpha", alpha)
        self.alpha = float(alpha)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lower, upper = self.bounds(x)
        x_adv = self.uniform_start(x, lower, upper)
        return self.ascend_(x_adv, self.input_gradient(x_adv, y), self.alpha, lower, upper)

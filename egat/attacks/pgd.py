"""PGD: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018."""

from __future__ import annotations

import torch
from torch import nn

from egat.attacks.base import Attack, attack_registry
from egat.models.mode import ModelMode


@attack_registry.register("pgd")
class PGD(Attack):
    """Projected gradient descent on the L_inf ball (the training and default evaluation attack).

    ``x_0 = clip(x + U(-eps, eps), 0, 1)`` (or ``x`` without random start), then ``steps`` times
    ``x_{t+1} = Proj_{B(x, eps) & [0,1]}(x_t + alpha * sign(grad_x CE(f(x_t), y)))``.

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x' (B, C, H, W). The random start uses torch's
    global RNG (seed it for reproducible attacks).

    Example::

        attack = PGD(model, eps=8 / 255, alpha=2 / 255, steps=10)
        x_adv = attack(images, labels)
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        alpha: float,
        steps: int,
        random_start: bool = True,
        model_mode: ModelMode = "eval",
    ):
        super().__init__(model, eps, model_mode)
        self._require_non_negative("alpha", alpha)
        self._require_steps(steps)
        self.alpha = float(alpha)
        self.steps = int(steps)
        self.random_start = bool(random_start)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lower, upper = self.bounds(x)  # computed once; each projection is one in-place clamp
        if self.random_start:
            x_adv = self.uniform_start(x, lower, upper)
        else:
            x_adv = x.clone()
        for _ in range(self.steps):
            self.ascend_(x_adv, self.input_gradient(x_adv, y), self.alpha, lower, upper)
        return x_adv

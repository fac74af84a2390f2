"""MI-FGSM: Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018."""

from __future__ import annotations

import torch
from torch import nn

from egat.attacks.base import Attack, attack_registry
from egat.models.mode import ModelMode

# Guards the L1 normalisation of an all-zero gradient (whose direction is then zero anyway).
_TINY = 1e-12


@attack_registry.register("mifgsm")
class MIFGSM(Attack):
    """Iterative FGSM with momentum, no random start.

    ``g_{t+1} = decay * g_t + grad_t / mean|grad_t|`` (per sample: the L1 norm up to a constant) and
    ``x_{t+1} = Proj_{B(x, eps) & [0,1]}(x_t + alpha * sign(g_{t+1}))``, with
    ``alpha = eps / steps`` by default (so the last iterate can reach the ball's surface).

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x' (B, C, H, W).

    Example::

        attack = MIFGSM(model, eps=0.03, steps=10, decay=1.0)
        x_adv = attack(images, labels)
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        alpha: float | None = None,
        steps: int = 10,
        decay: float = 1.0,
        model_mode: ModelMode = "eval",
    ):
        super().__init__(model, eps, model_mode)
        self._require_steps(steps)
        alpha = eps / steps if alpha is None else alpha
        self._require_non_negative("alpha", alpha)
        self._require_non_negative("decay", decay)
        self.alpha = float(alpha)
        self.steps = int(steps)
        self.decay = float(decay)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lower, upper = self.bounds(x)
        x_adv = x.clone()
        momentum = torch.zeros_like(x)
        sample_dims = tuple(range(1, x.ndim))
        for _ in range(self.steps):
            grad = self.input_gradient(x_adv, y)
            grad /= grad.abs().mean(dim=sample_dims, keepdim=True).clamp_min_(_TINY)
            momentum.mul_(self.decay).add_(grad)
            self.ascend_(x_adv, momentum, self.alpha, lower, upper)
        return x_adv

"""APGD-CE: Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020 (torchattacks' implementation)."""

from __future__ import annotations

from torch import nn

from egat.attacks.base import attack_registry
from egat.attacks.library import LibraryAttack
from egat.models.mode import ModelMode


@attack_registry.register("apgd")
class APGD(LibraryAttack):
    """Auto-PGD on the cross-entropy: PGD with momentum and a step size that starts at 2 eps and
    halves when the loss stops improving (no step-size parameter); keeps each image's best point.

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x' (B, C, H, W). ``restarts`` random starts, the
    best kept per image. Seeded from torch's global RNG (see :class:`LibraryAttack`).

    Example::

        attack = APGD(model, eps=8 / 255, steps=100)
        x_adv = attack(images, labels)
    """

    def __init__(self, model: nn.Module, eps: float, steps: int = 100, restarts: int = 1,
                 model_mode: ModelMode = "eval"):
        super().__init__(model, eps, restarts, model_mode)
        self._require_steps(steps)
        self.steps = int(steps)

    def build(self, num_classes: int):
        return self._torchattacks.APGD(self.model, norm="Linf", eps=self.eps, steps=self.steps,
                                       n_restarts=self.restarts, loss="ce")

"""APGD-T: targeted APGD on the DLR loss, Croce & Hein, ICML 2020 (torchattacks' implementation)."""

from __future__ import annotations

from torch import nn

from egat.attacks.apgd import APGD
from egat.attacks.base import attack_registry
from egat.models.mode import ModelMode

# The targeted DLR loss divides by z_max - (z_3 + z_4) / 2: it needs four classes.
MIN_CLASSES = 4


@attack_registry.register("apgdt")
class APGDT(APGD):
    """APGD on the targeted difference-of-logits-ratio loss, once per target class: the
    ``targets`` classes ranked highest after the true one (AutoAttack: 9), per image the first
    that fools the model kept. The DLR loss is invariant to the logits' scale and shift, so it does
    not saturate where cross-entropy does.

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x' (B, C, H, W); at least 4 classes. Seeded from
    torch's global RNG (see :class:`LibraryAttack`).

    Example::

        attack = APGDT(model, eps=8 / 255, steps=100, targets=9)
        x_adv = attack(images, labels)
    """

    def __init__(self, model: nn.Module, eps: float, steps: int = 100, restarts: int = 1,
                 targets: int = 9, model_mode: ModelMode = "eval"):
        super().__init__(model, eps, steps, restarts, model_mode)
        if targets < 1:
            raise ValueError(f"{type(self).__name__}: targets must be >= 1, got {targets}")
        self.targets = int(targets)

    def build(self, num_classes: int):
        if num_classes < MIN_CLASSES:
            raise ValueError(
                f"{type(self).__name__}: the targeted DLR loss needs >= {MIN_CLASSES} classes, "
                f"the model has {num_classes}"
            )
        targets = min(self.targets, num_classes - 1)  # torchattacks: n_classes - 1 targets
        return self._torchattacks.APGDT(self.model, norm="Linf", eps=self.eps, steps=self.steps,
                                        n_restarts=self.restarts, n_classes=targets + 1)

"""AutoAttack's ensemble: Croce & Hein, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", ICML 2020.

The combination is written here rather than taken from torchattacks (``MultiAttack``): its members
are any attacks of our registry (AutoAttack's, or PGD restarts for the masking checklist), and it
reports which member fooled each image.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from egat.attacks.base import Attack, attack_registry
from egat.models.mode import ModelMode, model_mode

# fooled_by codes besides a member's index
ROBUST = -1  # no member fooled the image
CLEAN_WRONG = -2  # misclassified before any attack


class Ensemble(Attack):
    """Per image, the worst case over ``attacks``: they run in turn, each on the images that are
    still classified correctly, and an image keeps the first adversarial example that fools the
    model (the clean image where none does). Robust accuracy is therefore that of the image-wise
    intersection of the members' successes, computed at the cost of running later members on
    fewer images.

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x' (B, C, H, W).

    Example::

        ensemble = Ensemble(model, [APGD(model, 8 / 255), Square(model, 8 / 255)])
        x_adv, fooled_by = ensemble.run(images, labels)   # fooled_by: member index, -1, -2
    """

    perturbs_every_image = False

    def __init__(self, model: nn.Module, attacks: Sequence[Attack], model_mode: ModelMode = "eval"):
        if not attacks:
            raise ValueError(f"{type(self).__name__}: needs at least one attack")
        eps = {a.eps for a in attacks}
        if len(eps) != 1:
            raise ValueError(f"{type(self).__name__}: the attacks have different eps {sorted(eps)}")
        super().__init__(model, eps.pop(), model_mode)
        self.attacks = list(attacks)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._run(x, y)[0]

    def run(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x', fooled_by): ``fooled_by[i]`` is the index of the first attack that fooled image i,
        :data:`ROBUST` (-1) where none did, :data:`CLEAN_WRONG` (-2) where the clean image is
        already misclassified."""
        x = x.detach()
        with model_mode(self.model, self.model_mode), torch.enable_grad():
            x_adv, fooled_by = self._run(x, y)
        return x_adv.detach(), fooled_by

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = x.clone()
        with torch.no_grad():
            correct = self.model(x).argmax(1) == y
        fooled_by = torch.where(correct, ROBUST, CLEAN_WRONG)
        for index, attack in enumerate(self.attacks):
            todo = correct.nonzero().flatten()
            if len(todo) == 0:
                break
            candidate = attack(x[todo], y[todo])
            with torch.no_grad():
                fooled = self.model(candidate).argmax(1) != y[todo]
            hit = todo[fooled]
            x_adv[hit] = candidate[fooled]
            fooled_by[hit] = index
            correct[hit] = False
        return x_adv, fooled_by


@attack_registry.register("autoattack")
class AutoAttack(Ensemble):
    """The AutoAttack ensemble: the :class:`Ensemble` of its members, by default APGD-CE, APGD-T
    and Square (the standard version without FAB-T; egat/build.py builds the members of
    ``params.ensemble``, each with the same params and eps).

    Example::

        attack = AutoAttack(model, [APGD(model, 8 / 255), APGDT(model, 8 / 255),
                                    Square(model, 8 / 255)])
        x_adv = attack(images, labels)
    """

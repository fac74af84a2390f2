"""Square Attack: Andriushchenko et al., "Square Attack: a query-efficient black-box adversarial
attack via random search", ECCV 2020 (torchattacks' implementation)."""

from __future__ import annotations

from torch import nn

from egat.attacks.base import attack_registry
from egat.attacks.library import LibraryAttack
from egat.models.mode import ModelMode


@attack_registry.register("square")
class Square(LibraryAttack):
    """Score-based black-box random search: starts from vertical stripes of +-eps, then proposes
    squares of +-eps (side shrinking with the query count from ``p_init`` of the image) and keeps a
    proposal when the margin loss drops. Uses the model's outputs only, never its gradients: the
    masking checklist's check (c).

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x' (B, C, H, W). ``queries`` per image and restart;
    an image stops once it is misclassified. Seeded from torch's global RNG.

    Example::

        attack = Square(model, eps=8 / 255, queries=5000)
        x_adv = attack(images, labels)
    """

    def __init__(self, model: nn.Module, eps: float, queries: int = 5000, restarts: int = 1,
                 p_init: float = 0.8, model_mode: ModelMode = "eval"):
        super().__init__(model, eps, restarts, model_mode)
        if queries < 1:
            raise ValueError(f"{type(self).__name__}: queries must be >= 1, got {queries}")
        if not 0 < p_init <= 1:
            raise ValueError(f"{type(self).__name__}: p_init must lie in (0, 1], got {p_init}")
        self.queries = int(queries)
        self.p_init = float(p_init)

    def build(self, num_classes: int):
        # resc_schedule: the square-size schedule (written for 10000 queries) is stretched to the
        # query budget, so that a CPU budget of a few hundred queries still reaches small squares.
        return self._torchattacks.Square(self.model, norm="Linf", eps=self.eps,
                                         n_queries=self.queries, n_restarts=self.restarts,
                                         p_init=self.p_init, resc_schedule=True)

"""The attack base class and the attack registry.

Every attack is an L_inf attack in pixel scale: it maximises the cross-entropy of the model on the
true labels within ``||x' - x||_inf <= eps`` and keeps ``x'`` in [0, 1]. Models normalise inside
(:class:`egat.models.Classifier`), so ``eps`` and step sizes are fractions of the pixel range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from egat.models.mode import ModelMode, model_mode
from egat.registry import Registry

attack_registry: Registry[type["Attack"]] = Registry("attack")


class Attack:
    """Base class: ``attack(x, y) -> x_adv``.

    Args:
        model: maps pixel-scale images (B, C, H, W) in [0, 1] to logits (B, num_classes).
        eps: L_inf radius in pixel scale (e.g. 8/255). ``eps == 0`` returns a copy of ``x``.
        model_mode: the mode the model runs in during the attack ("eval" by default, so BatchNorm
            uses running statistics and dropout is off); every submodule's previous mode is restored
            afterwards, also when the attack raises.

    The attack differentiates the loss w.r.t. the input only (``torch.autograd.grad``): the model's
    parameters never receive a ``.grad``. It works under an outer ``torch.no_grad()`` too.

    Subclasses implement :meth:`perturb`; egat/build.py maps params onto their arguments.
    """

    training_only = False  # True: a fast-training attack, not an evaluation one
    replays = 1  # consecutive training steps on each minibatch (free adversarial training: m)
    # False: images the attack does not fool come back unchanged (AutoAttack's convention)
    perturbs_every_image = True

    def __init__(self, model: nn.Module, eps: float, model_mode: ModelMode = "eval"):
        self._require_non_negative("eps", eps)
        if model_mode not in ("eval", "train"):
            raise ValueError(
                f"{type(self).__name__}: model_mode must be 'eval' or 'train', got {model_mode!r}"
            )
        self.model = model
        self.eps = float(eps)
        self.model_mode: ModelMode = model_mode

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for images ``x`` (B, C, H, W) in [0, 1] and labels ``y`` (B,).

        Returns a detached tensor of the same shape, dtype and device as ``x``.
        """
        x = x.detach()
        if self.eps == 0:
            return x.clone()
        with model_mode(self.model, self.model_mode), torch.enable_grad():
            return self.perturb(x, y).detach()

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attack itself; ``x`` is detached and the model is already in the attack's mode."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """State a resumed training run restores to continue exactly (stateless attacks: none)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s output."""

    @classmethod
    def reshard(
        cls, states: list[dict[str, torch.Tensor]], world_size: int
    ) -> list[dict[str, torch.Tensor]]:
        """The states of ``world_size`` ranks from ``states``, one per rank of a run that had
        another number of ranks (Ray's elastic training resized it). Default: none (the state
        restarts, as stateless attacks have none anyway)."""
        return [{} for _ in range(world_size)]

    def input_gradient(self, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """d CE(model(x_adv), y) / d x_adv, (B, C, H, W).

        The loss is summed over the batch so that each sample's gradient does not shrink with the
        batch size (all attacks here are invariant to a per-sample positive scale anyway).
        """
        x_adv = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(self.model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        return grad

    def bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Element-wise lower/upper limits: the eps ball around ``x`` intersected with [0, 1]."""
        return (x - self.eps).clamp_(min=0.0), (x + self.eps).clamp_(max=1.0)

    def uniform_start(
        self, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor
    ) -> torch.Tensor:
        """A random start: ``clip(x + U(-eps, eps), lower, upper)``, drawn from torch's global RNG."""
        return torch.empty_like(x).uniform_(-self.eps, self.eps).add_(x).clamp_(lower, upper)

    @staticmethod
    def ascend_(
        x_adv: torch.Tensor,
        direction: torch.Tensor,
        step: float,
        lower: torch.Tensor,
        upper: torch.Tensor,
    ) -> torch.Tensor:
        """In place: ``x_adv <- clip(x_adv + step * sign(direction), lower, upper)``."""
        return x_adv.add_(direction.sign(), alpha=step).clamp_(lower, upper)

    def _require_non_negative(self, key: str, value: float) -> None:
        if value < 0:
            raise ValueError(f"{type(self).__name__}: {key} must be >= 0, got {value}")

    def _require_steps(self, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"{type(self).__name__}: steps must be >= 1, got {steps}")

    def __repr__(self) -> str:
        hparams = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                            if k != "model" and not k.startswith("_"))
        return f"{type(self).__name__}({hparams})"


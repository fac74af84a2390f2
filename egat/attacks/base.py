"""The attack base class, its model-mode policy and the attack registry.

Every attack is an L_inf attack in pixel scale: it maximises the cross-entropy of the model on the
true labels within ``||x' - x||_inf <= eps`` and keeps ``x'`` in [0, 1]. Models normalise inside
(:class:`egat.models.Classifier`), so ``eps`` and step sizes are fractions of the pixel range.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from egat.config import AttackParams
from egat.registry import Registry

ModelMode = Literal["eval", "train"]

attack_registry: Registry[type["Attack"]] = Registry("attack")


@contextmanager
def model_mode(model: nn.Module, mode: ModelMode) -> Iterator[nn.Module]:
    """Put ``model`` in ``mode`` ("eval" | "train") for the block, then restore every submodule's.

    Restoring module-wise (rather than ``model.train(previous)``) keeps mixed states intact, e.g. a
    frozen BatchNorm left in eval inside a model in train mode. The restore runs on exceptions too.

    Example::

        with model_mode(model, "eval"):
            logits = model(x)
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"model_mode must be 'eval' or 'train', got {mode!r}")
    previous = [(module, module.training) for module in model.modules()]
    model.train(mode == "train")
    try:
        yield model
    finally:
        for module, training in previous:
            module.training = training


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

    Subclasses implement :meth:`perturb` (and :meth:`from_params` for :func:`build_attack`).
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

    @classmethod
    def from_params(cls, model: nn.Module, params: AttackParams, eps: float) -> "Attack":
        """Build the attack from the params keys it uses (``eps`` already resolved)."""
        raise NotImplementedError

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

    def _require_restarts(self, restarts: int) -> None:
        if restarts < 1:
            raise ValueError(f"{type(self).__name__}: restarts must be >= 1, got {restarts}")

    def __repr__(self) -> str:
        hparams = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                            if k != "model" and not k.startswith("_"))
        return f"{type(self).__name__}({hparams})"


def build_attack(model: nn.Module, params: AttackParams, eps: float | None = None) -> Attack:
    """The attack ``params.name`` built from ``params``; ``eps`` overrides ``params.eps`` (sweeps).

    Example::

        attack = build_attack(model, params.eval.attack)            # PGD-10, eps 8/255
        sweep = [build_attack(model, params.eval.attack, e) for e in (0.01, 0.02)]
    """
    attack_cls = attack_registry.get(params.name)
    return attack_cls.from_params(model, params, params.eps if eps is None else eps)

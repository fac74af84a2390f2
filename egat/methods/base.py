"""The method interface: ``Method.loss(batch) -> LossOutput`` with every loss term separately.

A method takes its model, the components its constructor names (an attack, an explainer, guide
settings) and its hyperparameters as keyword arguments, validated by its ``Config``: the one home
of their defaults and ranges (``params.yaml``'s ``methods.<name>`` is checked against it).
egat/build.py supplies the components from the params; docs/architecture.md says where a new
method goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from egat.models.classifier import Classifier
from egat.registry import Registry

if TYPE_CHECKING:
    from egat.attacks import Attack

method_registry: Registry[type["Method"]] = Registry("method")


class MethodConfig(BaseModel):
    """A method's hyperparameters; subclasses add fields with their papers' defaults."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass
class LossOutput:
    loss: torch.Tensor  # the scalar to backpropagate
    logits: torch.Tensor  # clean-input logits (B, K), for training accuracy
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # each term, detached


class Method:
    """A training objective on a :class:`Classifier`; ``hparams`` are validated by ``Config``.

    ``batch`` is a dict of tensors: image (B,3,H,W) in [0,1], label (B,), domain (B,), index (B,),
    guide (B,1,H,W) in [0,1] and optionally mask (B,1,H,W).

    Example::

        method = IGR(model, lambda_grad=3.0)
        out = method.loss(batch)     # out.loss, out.logits, out.terms["grad_norm"]
    """

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    attack: "Attack | None" = None  # the training-time attack, where the method has one

    def __init__(self, model: Classifier, **hparams: Any):
        self.model = model
        self.config = self.Config(**hparams)
        self.step = 0  # training steps taken; the Trainer restores it when a run resumes

    def loss(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Training state beyond the weights and ``step`` that a resumed run restores: the
        training attack's (free AT's persistent perturbation)."""
        return {"attack": self.attack.state_dict()} if self.attack is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.attack is not None:
            self.attack.load_state_dict(state.get("attack", {}))

    def reshard_states(self, states: list[dict], world_size: int) -> list[dict]:
        """:meth:`state_dict` of each of ``world_size`` ranks from ``states``, those of a run with
        another number of ranks (the training attack's :meth:`~egat.attacks.Attack.reshard`)."""
        if self.attack is None:
            return [{} for _ in range(world_size)]
        attack = self.attack.reshard([s.get("attack", {}) for s in states], world_size)
        return [{"attack": a} for a in attack]

    @property
    def batch_replays(self) -> int:
        """Consecutive training steps on each minibatch: the training attack's (free AT: m)."""
        return self.attack.replays if self.attack is not None else 1


def distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """D(a, b) between explanation maps in [0, 1], averaged over pixels and samples."""
    if kind == "mse":
        return F.mse_loss(a, b)
    if kind == "l1":
        return F.l1_loss(a, b)
    if kind == "bce":
        return F.binary_cross_entropy(a.clamp(1e-6, 1 - 1e-6), b)
    raise ValueError(f"unknown distance {kind!r}; valid: mse, l1, bce")

"""The explainer interface shared by Grad-CAM, SmoothGrad, IG and Finer-CAM."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from egat.models.classifier import Classifier
from egat.registry import Registry

explainer_registry: Registry[type["Explainer"]] = Registry("explainer")


def normalise_maps(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample max normalisation of non-negative maps (B, h, w) to [0, 1] (SPEC section 1)."""
    return maps / (maps.amax(dim=(1, 2), keepdim=True) + eps)


class Explainer(ABC):
    """Explains a :class:`Classifier`'s logit for ``target`` as a (B, h, w) map in [0, 1].

    ``attribute`` never changes the model's train/eval mode. With ``create_graph=True`` the maps are
    differentiable w.r.t. the model's parameters (training-time use); otherwise they are detached.
    """

    def __init__(self, model: Classifier):
        self.model = model

    @abstractmethod
    def attribute(
        self, inputs: torch.Tensor, target: torch.Tensor, create_graph: bool = False
    ) -> torch.Tensor: ...

    def logits_and_maps(
        self, inputs: torch.Tensor, targets: Sequence[torch.Tensor], create_graph: bool = True
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and one map per target tensor. Subclasses share the forward pass when they can."""
        logits = self.model(inputs)
        return logits, [self.attribute(inputs, t, create_graph=create_graph) for t in targets]


def build_explainer(name: str, model: Classifier) -> Explainer:
    return explainer_registry.create(name, model)

"""The explainer interface shared by Grad-CAM, SmoothGrad, IG and Finer-CAM."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from egat.models.classifier import Classifier
from egat.registry import Registry

explainer_registry: Registry[type["Explainer"]] = Registry("explainer")


def normalise_maps(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample max normalisation of non-negative maps (B, h, w) to [0, 1] (docs/method.md, Notation)."""
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


class InputGradientExplainer(Explainer):
    """Maps from input gradients dS_c/dx at S points per image (SmoothGrad's noisy copies, IG's
    path). All B*S points go through one batched forward pass; with ``create_graph=True`` the
    input gradients keep their graph (double backward), which captum does not build.
    """

    @abstractmethod
    def points(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, S, C, H, W) points at which to take input gradients."""

    @abstractmethod
    def combine(self, inputs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """Non-negative (B, H, W) maps from the gradients (B, S, C, H, W) at ``points``."""

    def attribute(self, inputs, target, create_graph=False):
        return self.maps(inputs, [target], create_graph)[0]

    def logits_and_maps(self, inputs, targets, create_graph=True):
        return self.model(inputs), self.maps(inputs, targets, create_graph)

    def maps(self, inputs: torch.Tensor, targets: Sequence[torch.Tensor], create_graph: bool):
        inputs = inputs.detach()
        with torch.enable_grad():
            pts = self.points(inputs)
            samples = pts.shape[1]
            flat = pts.flatten(0, 1).requires_grad_(True)
            logits = self.model(flat)
            out = []
            for i, target in enumerate(targets):
                score = logits.gather(1, target.repeat_interleave(samples)[:, None]).sum()
                (grads,) = torch.autograd.grad(
                    score, flat, create_graph=create_graph,
                    retain_graph=create_graph or i < len(targets) - 1,
                )
                out.append(normalise_maps(self.combine(inputs, grads.view_as(pts))))
        return out if create_graph else [m.detach() for m in out]


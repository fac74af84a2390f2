"""Integrated Gradients (Sundararajan et al., ICML 2017) from a black baseline.

IG_c(x) = (x - x0) * integral_0^1 dS_c/dx (x0 + a (x - x0)) da, approximated with the midpoint
Riemann sum over ``steps`` points (captum's ``riemann_middle``); the map is |sum over channels|,
normalised per sample. Hand-written for the differentiable training path (captum builds no
double-backward graph); tests check it equals captum's IntegratedGradients.

Shapes: inputs (B, 3, H, W) in [0, 1]; target (B,) int64; maps (B, H, W) in [0, 1] (input
resolution). Example::

    maps = IntegratedGradients(model, steps=16).attribute(x, target=y)
"""

from __future__ import annotations

import torch

from egat.explain.base import InputGradientExplainer, explainer_registry
from egat.models.classifier import Classifier


@explainer_registry.register("ig")
class IntegratedGradients(InputGradientExplainer):
    def __init__(self, model: Classifier, steps: int = 4):
        super().__init__(model)
        self.steps = steps

    def alphas(self, device=None) -> torch.Tensor:
        return (torch.arange(self.steps, device=device, dtype=torch.float32) + 0.5) / self.steps

    def points(self, inputs):
        a = self.alphas(inputs.device).view(1, -1, *([1] * (inputs.dim() - 1)))
        return a * inputs[:, None]  # baseline x0 = 0 (black)

    def combine(self, inputs, grads):
        return (inputs * grads.mean(1)).sum(1).abs()

"""SmoothGrad (Smilkov et al., 2017, arXiv:1706.03825): input-gradient saliency averaged over
noisy copies of the image.

E_c(x) = sum_ch (1/S) sum_s |dS_c/dx (x + n_s)|,  n_s ~ N(0, stdev^2),  normalised per sample.
The noise comes from torch's global RNG in captum's order (image-major), so with the same seed
the maps equal captum's NoiseTunnel(Saliency) smoothgrad summed over channels; hand-written for
the differentiable training path (captum builds no double-backward graph).

Shapes: inputs (B, 3, H, W) in [0, 1]; target (B,) int64; maps (B, H, W) in [0, 1] (input
resolution). Example::

    maps = SmoothGrad(model, samples=8, stdev=0.15).attribute(x, target=y)
"""

from __future__ import annotations

import torch

from egat.explain.base import InputGradientExplainer, explainer_registry
from egat.models.classifier import Classifier


@explainer_registry.register("smoothgrad")
class SmoothGrad(InputGradientExplainer):
    def __init__(self, model: Classifier, samples: int = 4, stdev: float = 0.15):
        super().__init__(model)
        self.samples = samples
        self.stdev = stdev  # absolute, on pixel values in [0, 1]: 15% of the input range

    def points(self, inputs):
        copies = inputs.repeat_interleave(self.samples, dim=0)
        noise = torch.normal(0.0, torch.full_like(copies, self.stdev))
        return (copies + noise).view(len(inputs), self.samples, *inputs.shape[1:])

    def combine(self, inputs, grads):
        return grads.abs().mean(1).sum(1)

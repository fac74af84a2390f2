"""Finer-CAM (Zhang et al., "Finer-CAM: Spotting the Difference Reveals Finer Details for Visual
Explanation", CVPR 2025): Grad-CAM of the target logit minus its most similar classes' logits.

S = S_c - alpha * sum_j w_j S_j over the ``similar`` classes j whose logits lie closest to S_c,
w_j = softmax(S)_j renormalised over them (the authors' weighted target). The w_j are constants
of the explained score (no gradient through the softmax), so with our linear CAM head the map has
Grad-CAM's closed form with the weight row W_c - alpha sum_j w_j W_j; the autograd path serves
other heads. Features shared by similar classes cancel; what tells c apart remains.

Shapes: inputs (B, 3, H, W) in [0, 1]; target (B,) int64; maps (B, h, w) in [0, 1] (feature
resolution). Example::

    maps = FinerCAM(model, similar=3, alpha=1.0).attribute(x, target=y)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from egat.explain.base import explainer_registry
from egat.explain.gradcam import GradCAM
from egat.models.classifier import Classifier


@explainer_registry.register("finercam")
class FinerCAM(GradCAM):
    def __init__(self, model: Classifier, similar: int = 3, alpha: float = 1.0,
                 closed_form: bool | None = None):  # fmt: skip
        super().__init__(model, closed_form)
        self.similar = similar
        self.alpha = alpha

    def class_coefficients(self, target, logits, feats):
        if logits is None:
            logits = self.model.head(feats)
        z = logits.detach()
        coeffs = F.one_hot(target, z.shape[1]).to(feats.dtype)
        k = min(self.similar, z.shape[1] - 1)
        if k == 0 or self.alpha == 0:
            return coeffs
        gap = (z - z.gather(1, target[:, None])).abs().scatter(1, target[:, None], float("inf"))
        similar = gap.topk(k, dim=1, largest=False).indices  # (B, k), most similar first
        probs = z.softmax(1).gather(1, similar)
        weights = probs / probs.sum(1, keepdim=True).clamp_min(1e-12)
        return coeffs.scatter_add(1, similar, -self.alpha * weights.to(feats.dtype))

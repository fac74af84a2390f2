"""Batched, differentiable Grad-CAM (Selvaraju et al., ICCV 2017 / IJCV 2020).

alpha_k = mean_ij dS_c/dA_kij,  E_c = ReLU(sum_k alpha_k A_k),  normalised per sample to [0, 1].
For a Classifier (GAP -> dropout -> linear head) at the last block, dS_c/dA_kij = W[c, k] / (h w):
Grad-CAM is exactly CAM, so the closed form needs no backward pass and stays differentiable for
free. The autograd path (create_graph=True for training) serves any other head. Hand-written
because captum's LayerGradCam is neither batched over per-sample targets with one forward pass
nor cheap to differentiate through; tests check both paths against captum.

Shapes: inputs (B, 3, H, W) in [0, 1]; target (B,) int64; maps (B, h, w) in [0, 1].
Example::

    cam = GradCAM(model)
    maps = cam.attribute(x, target=y)          # detached, for evaluation
    logits, [m] = cam.logits_and_maps(x, [y])  # one forward pass, differentiable, for training
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from egat.explain.base import Explainer, explainer_registry, normalise_maps
from egat.models.classifier import Classifier


def has_cam_head(model: nn.Module) -> bool:
    """True when the head is GAP -> dropout -> linear, where Grad-CAM has the CAM closed form."""
    return type(model).head is Classifier.head and isinstance(getattr(model, "fc", None), nn.Linear)


@explainer_registry.register("gradcam")
class GradCAM(Explainer):
    def __init__(self, model: Classifier, closed_form: bool | None = None):
        super().__init__(model)
        self.closed_form = has_cam_head(model) if closed_form is None else closed_form

    def class_coefficients(
        self, target: torch.Tensor, logits: torch.Tensor | None, feats: torch.Tensor
    ) -> torch.Tensor:
        """(B, K) constants c of the explained score sum_k c_k S_k: one-hot at ``target``."""
        return F.one_hot(target, self.model.num_classes).to(feats.dtype)

    def maps_from_features(
        self, feats: torch.Tensor, target: torch.Tensor, logits: torch.Tensor | None = None,
        create_graph: bool = True,
    ) -> torch.Tensor:
        """Grad-CAM maps from the target layer's activations ``feats`` (B, C, h, w)."""
        if self.closed_form:
            h, w = feats.shape[-2:]
            coeffs = self.class_coefficients(target, logits, feats)
            weights = coeffs @ self.model.fc.weight / (h * w)  # (B, C)
        else:
            if logits is None:
                logits = self.model.head(feats)
            score = (logits * self.class_coefficients(target, logits, feats)).sum()
            (grads,) = torch.autograd.grad(
                score, feats, create_graph=create_graph, retain_graph=True
            )
            weights = grads.mean(dim=(2, 3))
        cam = F.relu(torch.einsum("bc,bchw->bhw", weights, feats))
        return normalise_maps(cam)

    def attribute(self, inputs, target, create_graph=False):
        # The closed form of detached maps needs no graph: no autograd bookkeeping in the forward.
        graph = create_graph or not self.closed_form
        with torch.enable_grad() if graph else torch.no_grad():
            feats = self.model.features(inputs)
            if not self.closed_form and not feats.requires_grad:
                # Frozen model: the autograd path still needs dS/dA, so make A a graph leaf.
                feats = feats.detach().requires_grad_(True)
            maps = self.maps_from_features(feats, target, create_graph=create_graph)
        return maps if create_graph else maps.detach()

    def logits_and_maps(self, inputs, targets: Sequence[torch.Tensor], create_graph=True):
        feats = self.model.features(inputs)
        logits = self.model.head(feats)
        maps = [
            self.maps_from_features(feats, t, logits=logits, create_graph=create_graph)
            for t in targets
        ]
        return logits, maps

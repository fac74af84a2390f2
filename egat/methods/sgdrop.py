"""SGDrop: saliency-guided dropout, "The Overfocusing Bias of Convolutional Neural Networks: A
Saliency-Guided Regularization Approach", arXiv 2409.17370, 2024 (the paper's reference [4]).

A = features(x) (last block, (B, C, h, w)); saliency S = ReLU(dS_y/dA * A) (detached; S_y the
true-class logit); the top-rho fraction of the C*h*w entries of S per sample are dropped:
L = CE(head(A * M), y),  M = 0 on the round(rho * C*h*w) most salient entries, 1 elsewhere.
rho = 0.1 (docs/method.md, Baselines). No rescaling of the kept entries. The saliency gradient only runs
through the head (GAP -> dropout -> linear), so it costs almost nothing; the returned logits are
the clean head(A) of the same forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from egat.methods.base import LossOutput, Method, MethodConfig, method_registry


class SGDropConfig(MethodConfig):
    rho: float = Field(0.1, gt=0, lt=1)  # fraction of feature-map entries dropped per sample


@method_registry.register("sgdrop")
class SGDrop(Method):
    """L = CE(head(A * M), y), M drops the top-rho entries of ReLU(grad * A)."""

    Config = SGDropConfig

    def drop_mask(self, feats: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """M (B, C, h, w): 0 on the round(rho * C*h*w) most salient entries of each sample."""
        score = logits.gather(1, y[:, None]).sum()
        (grad,) = torch.autograd.grad(score, feats, retain_graph=True)
        saliency = F.relu(grad * feats).detach().flatten(1)
        k = round(self.config.rho * saliency.shape[1])
        mask = torch.ones_like(saliency)
        mask.scatter_(1, saliency.topk(k, dim=1).indices, 0.0)
        return mask.view_as(feats)

    def loss(self, batch):
        y = batch["label"]
        feats = self.model.features(batch["image"])
        logits = self.model.head(feats)
        ce = F.cross_entropy(self.model.head(feats * self.drop_mask(feats, logits, y)), y)
        return LossOutput(loss=ce, logits=logits.detach(), terms={"cls": ce.detach()})

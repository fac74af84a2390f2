"""DRE: T. Li, F. Qiao, M. Ma & X. Peng, "Are Data-driven Explanations Robust against
Out-of-distribution Data?", CVPR 2023 (Distributionally Robust Explanations), with Grad-CAM
explanations (docs/method.md, Baselines).

Per class c in the batch, samples of class c are mixed with a random partner of the same class:
x~ = lam x + (1 - lam) x_perm,  lam ~ Beta(a, a), one lam per batch, perm within each class;
L = CE(f(x), y) + lambda_expl * L1(E_y(x~), lam E_y(x) + (1 - lam) E_y(x_perm))
    + lambda_sparse * mean |E_y(x~)| + lambda_mix * CE(f(x~), y)
Defaults (docs/method.md, Baselines): lambda_expl 1.0, lambda_sparse 0.5, lambda_mix 0.1, a 0.2. E is the training
explainer (``explainer``: the params' ``explainer``, Grad-CAM), differentiable; x and x~ share one
forward pass.
A class with one sample in the batch is mixed with itself (its consistency term is 0).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from egat.explain import Explainer
from egat.methods.base import LossOutput, Method, MethodConfig, method_registry


class DREConfig(MethodConfig):
    lambda_expl: float = Field(1.0, ge=0)  # L1 explanation consistency under mixup
    lambda_sparse: float = Field(0.5, ge=0)  # mean |E(x~)|
    lambda_mix: float = Field(0.1, ge=0)  # CE on the mixed samples
    mix_alpha: float = Field(0.2, gt=0)  # Beta(a, a) of the mixing weight


def within_class_permutation(y: torch.Tensor) -> torch.Tensor:
    """perm with y[perm] == y: a random permutation inside each class (classes in sorted order)."""
    perm = torch.arange(y.shape[0], device=y.device)
    for c in y.unique(sorted=True):
        idx = (y == c).nonzero(as_tuple=True)[0]
        perm[idx] = idx[torch.randperm(len(idx), device=y.device)]
    return perm


@method_registry.register("dre")
class DRE(Method):
    """L = CE + explanation consistency under same-class mixup + sparsity + mixed CE."""

    Config = DREConfig

    def __init__(self, model, *, explainer: Explainer, **hparams: Any):
        super().__init__(model, **hparams)
        self.explainer = explainer

    def loss(self, batch):
        cfg = self.config
        x, y = batch["image"], batch["label"]
        n = x.shape[0]
        lam = float(torch.distributions.Beta(cfg.mix_alpha, cfg.mix_alpha).sample())
        perm = within_class_permutation(y)
        x_mix = lam * x + (1 - lam) * x[perm]
        logits_all, (maps,) = self.explainer.logits_and_maps(
            torch.cat([x, x_mix]), [torch.cat([y, y])], create_graph=True
        )
        logits, mix_logits = logits_all[:n], logits_all[n:]
        clean_map, mix_map = maps[:n], maps[n:]
        terms = {
            "cls": F.cross_entropy(logits, y),
            "expl": F.l1_loss(mix_map, lam * clean_map + (1 - lam) * clean_map[perm]),
            "sparse": mix_map.abs().mean(),
            "mix": F.cross_entropy(mix_logits, y),
        }
        loss = (terms["cls"] + cfg.lambda_expl * terms["expl"]
                + cfg.lambda_sparse * terms["sparse"] + cfg.lambda_mix * terms["mix"])
        return LossOutput(loss=loss, logits=logits, terms={k: v.detach() for k, v in terms.items()})

"""IRM: Arjovsky, Bottou, Gulrajani & Lopez-Paz, "Invariant Risk Minimization", arXiv 1907.02893,
2019, in DomainBed's form (Gulrajani & Lopez-Paz, ICLR 2021, ``algorithms.IRM``).

L = mean_e CE_e + lambda_t * mean_e penalty_e,
penalty_e = grad_w CE(w f(x_e[0::2]), y_e[0::2]) * grad_w CE(w f(x_e[1::2]), y_e[1::2]) at w = 1,
lambda_t = 1 for the first ``anneal_iters`` steps, then ``irm_lambda`` (DomainBed: 1e2 and 500).

Environments are the values of ``batch["domain"]``. With one domain in the batch (training on one
domain), the batch is split into two random halves as pseudo-environments. An environment with
fewer than 2 samples has no even/odd split: it adds to the CE but not to the penalty.
The gradient w.r.t. the scalar w has the closed form mean_i (softmax(z_i) - onehot(y_i)) . z_i,
used here instead of two autograd calls (the tests check it against DomainBed's autograd form).

DomainBed resets Adam when the penalty weight jumps; the Trainer owns the optimizer here, so
instead (``rescale``, default on) the whole loss is divided by lambda_t once lambda_t > 1, as in the
original IRM code (github.com/facebookresearch/InvariantRiskMinimization), which keeps the gradient
scale seen by Adam's moment estimates from jumping 100-fold. The terms are logged unscaled.
``step`` counts calls of :meth:`loss` (one per training step); set it when resuming a run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from egat.methods.base import LossOutput, Method, MethodConfig, method_registry


class IRMConfig(MethodConfig):
    irm_lambda: float = Field(1e2, ge=0)  # penalty weight after annealing
    anneal_iters: int = Field(500, ge=0)  # steps with penalty weight 1
    rescale: bool = True  # divide the loss by the penalty weight when it exceeds 1 (see above)


def irm_penalty(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DomainBed's ``_irm_penalty``: d CE(w z, y)/dw at w = 1, even half times odd half."""

    def dce_dw(z, t):
        return ((z.softmax(1) - F.one_hot(t, z.shape[1]).to(z.dtype)) * z).sum(1).mean()

    return dce_dw(logits[0::2], y[0::2]) * dce_dw(logits[1::2], y[1::2])


def environments(domain: torch.Tensor) -> list[torch.Tensor]:
    """Index sets of the environments: one per domain value, or two random halves for one domain."""
    values = domain.unique(sorted=True)
    if len(values) > 1:
        return [(domain == d).nonzero(as_tuple=True)[0] for d in values]
    perm = torch.randperm(domain.shape[0], device=domain.device)
    half = domain.shape[0] // 2
    return [env for env in (perm[:half], perm[half:]) if len(env)]


@method_registry.register("irm")
class IRM(Method):
    """L = mean_e CE_e + lambda_t mean_e IRM-penalty_e (DomainBed)."""

    Config = IRMConfig

    def penalty_weight(self) -> float:
        cfg = self.config
        return cfg.irm_lambda if self.step >= cfg.anneal_iters else 1.0

    def loss(self, batch):
        x, y = batch["image"], batch["label"]
        weight = self.penalty_weight()
        logits = self.model(x)
        nll, penalties = [], []
        for idx in environments(batch["domain"]):
            env_logits, env_y = logits[idx], y[idx]
            nll.append(F.cross_entropy(env_logits, env_y))
            if len(idx) >= 2:
                penalties.append(irm_penalty(env_logits, env_y))
        cls = torch.stack(nll).mean()
        penalty = torch.stack(penalties).mean() if penalties else cls.new_zeros(())
        loss = cls + weight * penalty
        if self.config.rescale and weight > 1.0:
            loss = loss / weight
        self.step += 1
        return LossOutput(
            loss=loss, logits=logits,
            terms={"cls": cls.detach(), "penalty": penalty.detach(),
                   "penalty_weight": torch.tensor(weight)},
        )

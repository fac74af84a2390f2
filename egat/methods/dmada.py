"""DMADA as DomainBed's ``Mixup`` (Yan et al., "Improve Unsupervised Domain Adaptation with Mixup
Training", arXiv 2001.00677, 2020, after DM-ADA: Xu et al., "Adversarial Domain Adaptation with
Domain Mixup", AAAI 2020): inter-domain mixup for domain generalisation (docs/method.md, Baselines).

For each pair (i, j) of DomainBed's ``random_pairs_of_minibatches`` over the batch's domains
(a random order of the domains, each paired with the next, cyclically; both truncated to the
smaller size), lam ~ Beta(a, a), x~ = lam x_i + (1 - lam) x_j and
L = mean_pairs [lam CE(f(x~), y_i) + (1 - lam) CE(f(x~), y_j)],   a = 0.2 (DomainBed's mixup_alpha).

With one domain in the batch (training on one domain) there is nothing to pair across: the batch
is paired with a random permutation of itself (plain input mixup, Zhang et al. 2018). All mixed
inputs go through the model in one forward pass (DomainBed runs one pass per pair; identical without
BatchNorm). Clean logits (training accuracy only) come from a ``no_grad`` pass in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from egat.methods.base import LossOutput, Method, MethodConfig, method_registry
from egat.models.mode import model_mode


class DMADAConfig(MethodConfig):
    mix_alpha: float = Field(0.2, gt=0)  # Beta(a, a) of the mixing weight


def domain_pairs(domain: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Index pairs (i, j) of equal length: DomainBed's random_pairs_of_minibatches over domains.

    One domain: a single pair (arange, randperm) of the whole batch.
    """
    groups = [(domain == d).nonzero(as_tuple=True)[0] for d in domain.unique(sorted=True)]
    if len(groups) < 2:
        n = domain.shape[0]
        return [(torch.arange(n, device=domain.device), torch.randperm(n, device=domain.device))]
    order = torch.randperm(len(groups)).tolist()
    pairs = []
    for k in range(len(groups)):
        gi, gj = groups[order[k]], groups[order[(k + 1) % len(groups)]]
        n = min(len(gi), len(gj))
        pairs.append((gi[:n], gj[:n]))
    return pairs


@method_registry.register("dmada")
class DMADA(Method):
    """L = mean over domain pairs of lam CE(f(x~), y_i) + (1 - lam) CE(f(x~), y_j)."""

    Config = DMADAConfig

    def loss(self, batch):
        x, y = batch["image"], batch["label"]
        beta = torch.distributions.Beta(self.config.mix_alpha, self.config.mix_alpha)
        pairs = domain_pairs(batch["domain"])
        lams = [float(beta.sample()) for _ in pairs]
        mixed = torch.cat([lam * x[i] + (1 - lam) * x[j] for lam, (i, j) in zip(lams, pairs)])
        chunks = self.model(mixed).split([len(i) for i, _ in pairs])
        mix = sum(
            lam * F.cross_entropy(out, y[i]) + (1 - lam) * F.cross_entropy(out, y[j])
            for lam, (i, j), out in zip(lams, pairs, chunks)
        ) / len(pairs)
        with torch.no_grad(), model_mode(self.model, "eval"):
            logits = self.model(x)
        return LossOutput(loss=mix, logits=logits, terms={"mix": mix.detach()})

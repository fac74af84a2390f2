"""IGR: Ross & Doshi-Velez, "Improving the Adversarial Robustness and Interpretability of Deep
Neural Networks by Regularizing their Input Gradients", AAAI 2018 (input gradient regularisation).

L = CE(f(x), y) + lambda * 0.5 * mean_i ||d CE_i / d x_i||_2^2     (double backprop, create_graph)

Gradients are taken w.r.t. the pixel-scale input x in [0, 1] (normalisation is inside the model).
The authors' code (github.com/dtak/adversarial-robustness-public) penalises ``tf.nn.l2_loss`` of the
gradient of the *batch-mean* CE, i.e. 0.5 / B^2 * sum_i ||g_i||^2, and sweeps its weight over
1e2 .. 1e5 at batch size 256. Here the penalty is per sample (batch-size free), so their weight w
corresponds to lambda = w / 256, i.e. 0.4 .. 390; the default lambda = 10 (their w = 2560) sits near
the geometric centre of their sweep. DomainBed has no IGR. With BatchNorm in train mode the input
gradient of sample i also carries the batch-statistics terms of the other samples, as in every
double-backprop implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from egat.methods.base import LossOutput, Method, MethodConfig, method_registry


class IGRConfig(MethodConfig):
    lambda_grad: float = Field(10.0, ge=0)  # weight of 0.5 * mean_i ||grad_x CE_i||^2


@method_registry.register("igr")
class IGR(Method):
    """L = CE + lambda * 0.5 * ||grad_x CE||^2 per sample, averaged over the batch."""

    Config = IGRConfig

    def loss(self, batch):
        x = batch["image"].detach().requires_grad_(True)
        y = batch["label"]
        logits = self.model(x)
        ce = F.cross_entropy(logits, y, reduction="none")
        (grad,) = torch.autograd.grad(ce.sum(), x, create_graph=True)
        penalty = 0.5 * grad.pow(2).flatten(1).sum(1).mean()
        cls = ce.mean()
        loss = cls + self.config.lambda_grad * penalty
        return LossOutput(
            loss=loss, logits=logits, terms={"cls": cls.detach(), "grad_norm": penalty.detach()}
        )

"""SGT: Ismail, Corrada Bravo & Feizi, "Improving Deep Learning Interpretability by Saliency Guided
Training", NeurIPS 2021.

S = |grad_x f_t(x)| (t the true label, or the predicted one); x_masked = x with the
round(k * C*H*W) input features of lowest S replaced by U(0, 1) values (random masking in pixel
scale);
L = CE(f(x), y) + lambda * KL(p(x) || p(x_masked)),   k = 0.1, lambda = 1 (docs/method.md, Baselines).
As in the authors' code (github.com/ayaabdelsalam91/saliency_guided_training) the saliency is
computed with the model in eval mode and the target is the true label; x_masked is detached.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from egat.methods.base import LossOutput, Method, MethodConfig, method_registry
from egat.models.mode import model_mode


class SGTConfig(MethodConfig):
    mask_fraction: float = Field(0.1, gt=0, lt=1)  # fraction of input features masked per sample
    lambda_kl: float = Field(1.0, ge=0)  # weight of KL(p(x) || p(x_masked))
    saliency_target: Literal["label", "predicted"] = "label"


@method_registry.register("sgt")
class SGT(Method):
    """L = CE(f(x), y) + lambda KL(p(x) || p(x with its least salient features randomised))."""

    Config = SGTConfig

    def masked_input(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_masked, mask): mask (B, C, H, W) is True on the randomised, least salient features."""
        x = x.detach().requires_grad_(True)
        with model_mode(self.model, "eval"), torch.enable_grad():
            logits = self.model(x)
            target = y if self.config.saliency_target == "label" else logits.argmax(1)
            (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
        saliency = grad.abs().flatten(1)
        k = round(self.config.mask_fraction * saliency.shape[1])
        mask = torch.zeros_like(saliency, dtype=torch.bool)
        mask.scatter_(1, saliency.topk(k, dim=1, largest=False).indices, True)
        mask = mask.view_as(x)
        x = x.detach()
        return torch.where(mask, torch.rand_like(x), x), mask

    def loss(self, batch):
        x, y = batch["image"], batch["label"]
        x_masked, _ = self.masked_input(x, y)
        logits, masked_logits = self.model(x), self.model(x_masked)
        cls = F.cross_entropy(logits, y)
        kl = F.kl_div(
            F.log_softmax(masked_logits, 1), F.log_softmax(logits, 1),
            log_target=True, reduction="batchmean",
        )
        loss = cls + self.config.lambda_kl * kl
        return LossOutput(loss=loss, logits=logits, terms={"cls": cls.detach(), "kl": kl.detach()})

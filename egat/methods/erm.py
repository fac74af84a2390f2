"""ERM: empirical risk minimisation, cross-entropy only (Vapnik 1998)."""

from __future__ import annotations

import torch.nn.functional as F

from egat.methods.base import LossOutput, Method, method_registry


@method_registry.register("erm")
class ERM(Method):
    """L = CE(f(x), y)."""

    def loss(self, batch):
        logits = self.model(batch["image"])
        ce = F.cross_entropy(logits, batch["label"])
        return LossOutput(loss=ce, logits=logits, terms={"cls": ce.detach()})

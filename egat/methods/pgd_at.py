"""PGD-AT: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.

L = CE(f(x'), y),  x' = PGD(x, y): the training attack ``attack`` (the params' ``attack``: 10 steps,
eps 8/255, alpha 2/255, random start, model in eval mode while it runs). Training sees adversarial
inputs only.
The returned clean logits (training accuracy only) come from a ``no_grad`` forward pass in eval
mode, so BatchNorm's running statistics are updated by the adversarial batches alone, as in Madry.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from egat.attacks import Attack
from egat.methods.base import LossOutput, Method, MethodConfig, method_registry
from egat.models.mode import model_mode


class PGDATConfig(MethodConfig):
    """No hyperparameters of its own: the attack is the constructor's ``attack``."""


@method_registry.register("pgd_at")
class PGDAT(Method):
    """L = CE(f(PGD(x, y)), y)."""

    Config = PGDATConfig

    def __init__(self, model, *, attack: Attack, **hparams: Any):
        super().__init__(model, **hparams)
        self.attack = attack

    def loss(self, batch):
        x, y = batch["image"], batch["label"]
        adv_ce = F.cross_entropy(self.model(self.attack(x, y)), y)
        with torch.no_grad(), model_mode(self.model, "eval"):
            logits = self.model(x)
        return LossOutput(loss=adv_ce, logits=logits, terms={"adv_ce": adv_ce.detach()})

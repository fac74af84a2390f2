"""IG-NORM: Chen, Wu, Rastogi, Liang & Jha, "Robust Attribution Regularization", NeurIPS 2019.

L = CE(f(x), y) + lambda * mean_i max_{x'_i in B_inf(x_i, eps) & [0,1]} ||IG(x_i, x'_i)||_1
IG(x, x') = (x' - x) * (1/m) sum_{k=1..m} grad_z CE(f(z), y) at z = x + (k/m)(x' - x)

IG is the integrated gradient of the loss from the baseline x to x' (right Riemann sum with m
points, as in the authors' code github.com/jfc43/robust-attribution-regularization); it is
invariant to the input scale, so the authors' weights carry over to pixel-scale inputs.
The inner max (:class:`IGNormAttack`) runs ``steps`` signed-gradient steps of size ``alpha``
within ``eps`` (model in ``attack_model_mode``; the params' ``attack`` group gives all three) on
||IG||_1, always from PGD's random start (at x' = x the IG is 0 and its L1 norm has a zero
gradient), differentiating through IG (double backprop) with the coarser ``attack_m``-point sum
(the authors' "approx" attack: m / approx_factor = 50 / 10 = 5 points). The outer term
differentiates through IG at the found x' (create_graph). Defaults: lambda 0.1 (the authors'
natural-image setting, Flower), and, cut for the study's CPU budget (docs/method.md, Baselines),
m 5 (theirs 50), attack_m 2 (theirs 5), 2 inner steps (theirs 7).
The IG term of the loss is computed with the model in ``ig_mode`` (default eval; the authors'
models have no BatchNorm, so neither choice is theirs): eval mode gives each sample its exact IG
(no coupling through batch statistics), keeps the m * B interpolated images out of BatchNorm's
running statistics and skips BatchNorm's double backward (about a third of the term's cost).
The CE term runs in the model's own (train) mode.
Cost: every IG evaluates the model on m path points in one batched forward pass (m * B images).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from egat.attacks import Attack
from egat.methods.base import LossOutput, Method, MethodConfig, method_registry
from egat.models.mode import ModelMode, model_mode


class IGNConfig(MethodConfig):
    lambda_ig: float = Field(0.1, ge=0)  # weight of the IG-norm term
    m: int = Field(5, ge=1)  # Riemann points of the IG in the training loss
    attack_m: int = Field(2, ge=1)  # Riemann points of the IG inside the inner maximisation
    steps: int = Field(2, ge=1)  # inner PGD steps on ||IG||_1 (eps, alpha: the training attack's)
    ig_mode: Literal["eval", "train"] = "eval"  # the model's mode for the IG term of the loss


def integrated_gradients(
    model: nn.Module, x: torch.Tensor, x_end: torch.Tensor, y: torch.Tensor, m: int,
    create_graph: bool = False,
) -> torch.Tensor:
    """IG of the per-sample CE from baseline ``x`` to ``x_end`` (B, C, H, W), right Riemann sum.

    The m path points go through the model as one batch of m * B images. Differentiable w.r.t.
    ``x_end`` (when it requires grad) and, with ``create_graph``, w.r.t. the model's parameters.
    Completeness: ``IG.sum((1, 2, 3)) ~ CE(x_end) - CE(x)`` as m grows.
    """
    delta = x_end - x
    alphas = torch.arange(1, m + 1, dtype=x.dtype, device=x.device).div_(m)
    path = (x.unsqueeze(0) + alphas.view(m, 1, 1, 1, 1) * delta.unsqueeze(0)).flatten(0, 1)
    if not path.requires_grad:
        path.requires_grad_(True)
    ce = F.cross_entropy(model(path), y.repeat(m), reduction="sum")
    (grads,) = torch.autograd.grad(ce, path, create_graph=create_graph)
    return delta * grads.view(m, *x.shape).mean(0)


def ig_norm(ig: torch.Tensor) -> torch.Tensor:
    """mean_i ||IG_i||_1."""
    return ig.abs().flatten(1).sum(1).mean()


class IGNormAttack(Attack):
    """The inner max: x' in B_inf(x, eps) & [0, 1] with a large ||IG(x, x')||_1, by PGD on it.

    ``x_0`` is PGD's random start; then ``steps`` times
    ``x_{t+1} = Proj(x_t + alpha * sign(grad_{x_t} ||IG(x, x_t)||_1))``, IG with ``m`` points
    (differentiated through: double backprop).

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x' (B, C, H, W).

    Example::

        x_adv = IGNormAttack(model, eps=8 / 255, alpha=2 / 255, steps=3, m=5)(images, labels)
    """

    def __init__(self, model: nn.Module, eps: float, alpha: float, steps: int, m: int,
                 model_mode: ModelMode = "eval"):
        super().__init__(model, eps, model_mode)
        self._require_non_negative("alpha", alpha)
        self._require_steps(steps)
        self.alpha = float(alpha)
        self.steps = int(steps)
        self.m = int(m)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lower, upper = self.bounds(x)
        x_adv = self.uniform_start(x, lower, upper)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            ig = integrated_gradients(self.model, x, x_adv, y, self.m, create_graph=True)
            (grad,) = torch.autograd.grad(ig.abs().sum(), x_adv)
            x_adv = self.ascend_(x_adv.detach(), grad, self.alpha, lower, upper)
        return x_adv


@method_registry.register("ign")
class IGN(Method):
    """L = CE + lambda * max_{x'} ||IG(x, x')||_1 (IG-NORM).

    Args:
        eps, alpha, attack_model_mode: the inner max's radius, step and model mode.
        hparams: :class:`IGNConfig`'s keys.
    """

    Config = IGNConfig

    def __init__(self, model, *, eps: float, alpha: float, attack_model_mode: ModelMode = "eval",
                 **hparams: Any):
        super().__init__(model, **hparams)
        self.inner_max = IGNormAttack(model, eps, alpha, self.config.steps, self.config.attack_m,
                                      attack_model_mode)

    def loss(self, batch):
        x, y = batch["image"], batch["label"]
        x_adv = self.inner_max(x, y)
        logits = self.model(x)
        cls = F.cross_entropy(logits, y)
        with model_mode(self.model, self.config.ig_mode):
            ig = ig_norm(
                integrated_gradients(self.model, x, x_adv, y, self.config.m, create_graph=True)
            )
        loss = cls + self.config.lambda_ig * ig
        return LossOutput(loss=loss, logits=logits, terms={"cls": cls.detach(), "ig": ig.detach()})

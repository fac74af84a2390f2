"""EGAT: Explanation-Guided Adversarial Training (docs/method.md, Objective, paper Eq. 5-10).

L = L_cls + lambda_adv L_adv + lambda_egl L_egl + lambda_mix L_mix
  L_cls = CE(f(x), y)
  L_adv = KL(p(x) || p(x')) + D(E_y(x), E_y(x')) [+ CE(f(x'), y) if adv_ce],  x' = PGD(x, y)
  L_egl = D(E_y(x), M(x)),  M = the guide map at feature resolution
  L_mix = lam CE(f(x~), y_i) + (1-lam) CE(f(x~), y_j)
          + D(lam E_yi(x~) + (1-lam) E_yj(x~), lam E_yi(x_i) + (1-lam) E_yj(x_j))
          + lambda_sparse mean|lam E_yi(x~) + (1-lam) E_yj(x~)|,   x~ = lam x_i + (1-lam) x_j
Ablations: ``egat_wo_at`` (lambda_adv = 0: no attack is computed) and ``egat_wo_egl``
(lambda_egl = 0 and no explanation terms in L_mix).

Example::

    method = EGAT(model, explainer=GradCAM(model), attack=PGD(model, 8 / 255, 2 / 255, 10),
                  lambda_adv=6.0, guide_sigma=0.0)
    out = method.loss(batch)
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from egat.attacks import Attack
from egat.data.guides import guide_at
from egat.explain import Explainer
from egat.methods.base import LossOutput, Method, MethodConfig, distance, method_registry

# Presets of (lambda_adv, lambda_egl, lambda_mix, lambda_sparse, mix_alpha); docs/method.md, Objective
# says why. default: the best trial of the Ray Tune search on benchmark v2 (docs/results/v3_tune.md);
# study_v2: the weights Tables I-IV of docs/results/ were measured with; paper: the paper's.
PRESETS = {
    "default": dict(lambda_adv=5.024, lambda_egl=3.372, lambda_mix=0.3141, lambda_sparse=0.2,
                    mix_alpha=0.2),
    "study_v2": dict(lambda_adv=6.0, lambda_egl=10.0, lambda_mix=1.0, lambda_sparse=0.2,
                     mix_alpha=0.2),
    "paper": dict(lambda_adv=0.5, lambda_egl=1.0, lambda_mix=1.0, lambda_sparse=1.0, mix_alpha=0.2),
}


class EGATConfig(MethodConfig):
    preset: Literal["default", "study_v2", "paper"] = "default"
    lambda_adv: float = Field(None, ge=0)  # type: ignore[assignment]  # None = the preset's value
    lambda_egl: float = Field(None, ge=0)  # type: ignore[assignment]
    lambda_mix: float = Field(None, ge=0)  # type: ignore[assignment]
    lambda_sparse: float = Field(None, ge=0)  # type: ignore[assignment]
    mix_alpha: float = Field(None, gt=0)  # type: ignore[assignment]
    distance: Literal["mse", "l1", "bce"] = "mse"
    adv_ce: bool = False
    mix_explanation: bool = True  # explanation + sparsity terms inside L_mix

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data):
        data = dict(data or {})
        # An unknown preset fails its Literal check; filling from the default keeps that the only
        # error instead of five "should be a valid number" lines for the lambdas left null.
        preset = PRESETS.get(data.get("preset", "default"), PRESETS["default"])
        for key, value in preset.items():
            if data.get(key) is None:
                data[key] = value
        return data


@method_registry.register("egat")
class EGAT(Method):
    """L = CE + lambda_adv L_adv (PGD) + lambda_egl D(E(x), guide) + lambda_mix L_mix (EGAT).

    Args:
        explainer: the differentiable explainer E (Grad-CAM by default in the params).
        attack: the training attack of x'; unused (and None) when lambda_adv is 0.
        guide_sigma, guide_seed: the guide maps' noise (the ``noisy`` guide variant; 0: none),
            see :func:`egat.data.guides.guide_at`.
        hparams: :class:`EGATConfig`'s keys (a preset and the lambdas).
    """

    Config = EGATConfig

    def __init__(self, model, *, explainer: Explainer, attack: Attack | None = None,
                 guide_sigma: float = 0.0, guide_seed: int = 0, **hparams: Any):
        super().__init__(model, **hparams)
        if self.config.lambda_adv > 0 and attack is None:
            raise ValueError(f"{type(self).__name__}: lambda_adv > 0 needs an attack")
        self.explainer = explainer
        self.attack = attack if self.config.lambda_adv > 0 else None
        self.guide_sigma = guide_sigma
        self.guide_seed = guide_seed

    def loss(self, batch):
        cfg = self.config
        x, y = batch["image"], batch["label"]
        n = x.shape[0]
        use_adv = self.attack is not None
        use_mix = cfg.lambda_mix > 0
        mix_maps = use_mix and cfg.mix_explanation

        # One forward pass over [x, x', x~]: shares weights reads and halves Python overhead.
        inputs, targets_i, targets_j = [x], [y], [y]
        if use_adv:
            inputs.append(self.attack(x, y))
            targets_i.append(y)
            targets_j.append(y)
        if use_mix:
            lam = float(torch.distributions.Beta(cfg.mix_alpha, cfg.mix_alpha).sample())
            perm = torch.randperm(n, device=x.device)
            inputs.append(lam * x + (1 - lam) * x[perm])
            targets_i.append(y)
            targets_j.append(y[perm])
        need_maps = use_adv or cfg.lambda_egl > 0 or mix_maps
        xs = torch.cat(inputs)
        if need_maps:
            wanted = [torch.cat(targets_i)] + ([torch.cat(targets_j)] if mix_maps else [])
            logits_all, maps = self.explainer.logits_and_maps(xs, wanted, create_graph=True)
        else:
            logits_all, maps = self.model(xs), []
        chunks = logits_all.split(n)
        logits = chunks[0]
        terms: dict[str, torch.Tensor] = {}

        loss = terms["cls"] = F.cross_entropy(logits, y)
        clean_map = maps[0][:n] if maps else None
        if use_adv:
            adv_logits, adv_map = chunks[1], maps[0][n : 2 * n]
            kl = F.kl_div(
                F.log_softmax(adv_logits, 1), F.log_softmax(logits, 1),
                log_target=True, reduction="batchmean",
            )
            adv = kl + distance(clean_map, adv_map, cfg.distance)
            if cfg.adv_ce:
                adv = adv + F.cross_entropy(adv_logits, y)
            terms["adv"] = adv
            loss = loss + cfg.lambda_adv * adv
        if cfg.lambda_egl > 0:
            guide = guide_at(
                batch["guide"], clean_map.shape[-2:], self.guide_sigma, self.guide_seed,
                batch.get("index"),
            )
            terms["egl"] = distance(clean_map, guide, cfg.distance)
            loss = loss + cfg.lambda_egl * terms["egl"]
        if use_mix:
            mix_logits = chunks[-1]
            mix = lam * F.cross_entropy(mix_logits, y) + (1 - lam) * F.cross_entropy(mix_logits, y[perm])
            if mix_maps:
                blended = lam * maps[0][-n:] + (1 - lam) * maps[1][-n:]
                reference = lam * clean_map + (1 - lam) * clean_map[perm]
                terms["mix_expl"] = distance(blended, reference, cfg.distance)
                terms["sparse"] = blended.abs().mean()
                mix = mix + terms["mix_expl"] + cfg.lambda_sparse * terms["sparse"]
            terms["mix"] = mix
            loss = loss + cfg.lambda_mix * mix
        terms = {k: v.detach() for k, v in terms.items()}
        return LossOutput(loss=loss, logits=logits, terms=terms)


class EGATWithoutATConfig(EGATConfig):
    @model_validator(mode="after")
    def _no_attack(self):
        if self.lambda_adv != 0:
            object.__setattr__(self, "lambda_adv", 0.0)
        return self


class EGATWithoutEGLConfig(EGATConfig):
    mix_explanation: bool = False

    @model_validator(mode="after")
    def _no_guidance(self):
        if self.lambda_egl != 0 or self.mix_explanation:
            object.__setattr__(self, "lambda_egl", 0.0)
            object.__setattr__(self, "mix_explanation", False)
        return self


@method_registry.register("egat_wo_at")
class EGATWithoutAT(EGAT):
    """Ablation `w/o AT`: lambda_adv = 0, no adversarial example is computed."""

    Config = EGATWithoutATConfig


@method_registry.register("egat_wo_egl")
class EGATWithoutEGL(EGAT):
    """Ablation `w/o EGL`: lambda_egl = 0 and L_mix keeps only its mixup cross-entropy."""

    Config = EGATWithoutEGLConfig

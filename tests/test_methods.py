"""Method losses against independent recomputations on a tiny model."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from egat.attacks import PGD
from egat.build import build_method
from egat.explain.gradcam import GradCAM
from egat.methods import method_registry
from egat.methods.egat import EGAT
from tests.helpers import make_batch, params_for, tiny_classifier


def test_egat_terms_match_spec_formulas():
    model = tiny_classifier()
    params = params_for("egat", lambda_adv=2.0, lambda_egl=0.5, lambda_mix=0.7, lambda_sparse=0.3)
    method = build_method(model, params)
    batch = make_batch()
    x, y = batch["image"], batch["label"]
    torch.manual_seed(123)
    out = method.loss(batch)

    # Recompute with the autograd Grad-CAM path and the same random draws (attack, lam, perm).
    torch.manual_seed(123)
    x_adv = method.attack(x, y)
    lam = float(torch.distributions.Beta(0.2, 0.2).sample())
    perm = torch.randperm(len(y))
    x_mix = lam * x + (1 - lam) * x[perm]
    cam = GradCAM(model, closed_form=False)
    E = lambda inp, t: cam.attribute(inp, t, create_graph=True)  # noqa: E731
    logits, adv_logits, mix_logits = model(x), model(x_adv), model(x_mix)
    cls = F.cross_entropy(logits, y)
    p, q = logits.softmax(1), adv_logits.softmax(1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    adv = kl + F.mse_loss(E(x, y), E(x_adv, y))
    guide = F.adaptive_avg_pool2d(batch["guide"], (4, 4))[:, 0]
    lo, hi = guide.amin((1, 2), keepdim=True), guide.amax((1, 2), keepdim=True)
    egl = F.mse_loss(E(x, y), (guide - lo) / (hi - lo + 1e-8))
    blended = lam * E(x_mix, y) + (1 - lam) * E(x_mix, y[perm])
    reference = lam * E(x, y) + (1 - lam) * E(x, y)[perm]
    mix = (lam * F.cross_entropy(mix_logits, y) + (1 - lam) * F.cross_entropy(mix_logits, y[perm])
           + F.mse_loss(blended, reference) + 0.3 * blended.abs().mean())
    total = cls + 2.0 * adv + 0.5 * egl + 0.7 * mix

    for name, value in {"cls": cls, "adv": adv, "egl": egl, "mix": mix}.items():
        assert out.terms[name].item() == pytest.approx(value.item(), abs=1e-5), name
    assert out.loss.item() == pytest.approx(total.item(), abs=1e-5)


def test_egat_takes_plain_arguments_as_build_method_supplies_them():
    model = tiny_classifier()
    built = build_method(model, params_for("egat", lambda_adv=2.0, lambda_mix=0.5))
    plain = EGAT(model, explainer=GradCAM(model), attack=PGD(model, eps=0.03, alpha=0.01, steps=3),
                 lambda_adv=2.0, lambda_mix=0.5)
    assert plain.config == built.config and plain.config.lambda_sparse == 0.2  # the preset's
    batch = make_batch()
    torch.manual_seed(0)
    expected = built.loss(batch)
    torch.manual_seed(0)
    assert torch.equal(plain.loss(batch).loss, expected.loss)
    with pytest.raises(ValueError, match="EGAT: lambda_adv > 0 needs an attack"):
        EGAT(model, explainer=GradCAM(model))
    with pytest.raises(ValidationError, match="lambda_adv"):
        EGAT(model, explainer=GradCAM(model), lambda_adv=-1.0)


def test_egat_without_at_computes_no_attack():
    model = tiny_classifier()
    method = build_method(model, params_for("egat_wo_at", lambda_adv=5.0))
    assert method.attack is None
    out = method.loss(make_batch())
    assert "adv" not in out.terms and {"cls", "egl", "mix"} <= set(out.terms)


def test_egat_without_egl_drops_explanation_terms():
    method = build_method(tiny_classifier(), params_for("egat_wo_egl"))
    out = method.loss(make_batch())
    assert {"cls", "adv", "mix"} <= set(out.terms)
    assert "egl" not in out.terms and "mix_expl" not in out.terms and "sparse" not in out.terms


def test_egat_adv_ce_adds_madry_term():
    batch = make_batch()
    base = build_method(tiny_classifier(), params_for("egat", lambda_egl=0, lambda_mix=0))
    with_ce = build_method(tiny_classifier(), params_for("egat", lambda_egl=0, lambda_mix=0, adv_ce=True))
    torch.manual_seed(0)
    a = base.loss(batch)
    torch.manual_seed(0)
    b = with_ce.loss(batch)
    assert b.terms["adv"].item() > a.terms["adv"].item()


def test_egat_guidance_gradient_reaches_the_backbone():
    model = tiny_classifier()
    method = build_method(model, params_for("egat", lambda_adv=0.0, lambda_mix=0.0))
    out = method.loss(make_batch())
    assert set(out.terms) == {"cls", "egl"}
    (out.loss - out.terms["cls"]).backward()  # the egl part alone
    assert model.backbone[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", method_registry.names())
def test_every_method_gives_finite_loss_and_keeps_train_mode(name):
    model = tiny_classifier().train()
    method = build_method(model, params_for(name))
    out = method.loss(make_batch())
    assert torch.isfinite(out.loss) and out.logits.shape == (6, 3)
    assert all(torch.isfinite(v) for v in out.terms.values())
    out.loss.backward()
    assert all(m.training for m in model.modules())

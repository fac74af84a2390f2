"""Baseline methods (docs/method.md, Baselines) against hand computations or independent routes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, Saliency
from torch import nn

from egat.build import build_method, params_from_dict
from egat.errors import ParamsError
from egat.methods.ign import integrated_gradients, ig_norm
from egat.methods.irm import irm_penalty
from egat.models import Classifier
from tests.helpers import make_batch, params_for, tiny_classifier


def ce_per_sample(model):
    """A module mapping (x, y) to the per-sample CE, for captum's scalar-output attributions."""

    class CE(nn.Module):
        def forward(self, x, y):
            return F.cross_entropy(model(x), y, reduction="none")

    return CE()


def smooth_classifier(seed=0):
    """tiny_classifier with Softplus instead of ReLU: a smooth loss for completeness checks."""
    model = tiny_classifier(seed=seed)
    model.backbone[1], model.backbone[3] = nn.Softplus(), nn.Softplus()
    with torch.no_grad():
        model.fc.weight.mul_(30)  # confident predictions: CE differs clearly between images
    return model


# ---------------------------------------------------------------- PGD-AT


def test_pgd_at_is_ce_on_the_replayed_attack():
    model = tiny_classifier().train()
    method = build_method(model, params_for("pgd_at"))
    batch = make_batch()
    x, y = batch["image"], batch["label"]
    torch.manual_seed(7)
    out = method.loss(batch)
    torch.manual_seed(7)
    x_adv = method.attack(x, y)
    assert (x_adv - x).abs().max() > 0
    assert out.loss.item() == pytest.approx(F.cross_entropy(model(x_adv), y).item(), abs=1e-6)
    assert torch.allclose(out.logits, model(x), atol=1e-6)  # the clean logits
    assert model.training


# ---------------------------------------------------------------- IGR


def test_igr_penalty_matches_central_finite_differences():
    torch.manual_seed(0)
    model = tiny_classifier().double().train()
    method = build_method(model, params_for("igr", lambda_grad=3.0))
    batch = make_batch()
    batch["image"] = batch["image"].double()
    x, y = batch["image"], batch["label"]
    out = method.loss(batch)

    # d CE_i / d x_i by central differences; samples are independent, so one input element is
    # perturbed in every sample at once.
    h, flat = 1e-6, x.flatten(1)
    grads = torch.zeros_like(flat)
    with torch.no_grad():
        for e in range(flat.shape[1]):
            step = torch.zeros_like(flat)
            step[:, e] = h
            up = F.cross_entropy(model((flat + step).view_as(x)), y, reduction="none")
            down = F.cross_entropy(model((flat - step).view_as(x)), y, reduction="none")
            grads[:, e] = (up - down) / (2 * h)
        cls = F.cross_entropy(model(x), y)
    penalty = 0.5 * grads.pow(2).sum(1).mean()
    assert out.terms["grad_norm"].item() == pytest.approx(penalty.item(), rel=1e-6)
    assert out.terms["cls"].item() == pytest.approx(cls.item(), rel=1e-12)
    assert out.loss.item() == pytest.approx((cls + 3.0 * penalty).item(), rel=1e-6)


def test_igr_penalty_is_differentiated_through_double_backprop():
    model = tiny_classifier().double().train()
    method = build_method(model, params_for("igr", lambda_grad=100.0))
    batch = make_batch()
    batch["image"] = batch["image"].double()
    weight = model.fc.weight  # the penalty depends on it through softmax(f(x)) and W

    def loss():
        return method.loss(batch).loss

    (autograd_grad,) = torch.autograd.grad(loss(), weight)
    h = 1e-6
    with torch.no_grad():
        weight[0, 0] += h
    up = loss().item()
    with torch.no_grad():
        weight[0, 0] -= 2 * h
    down = loss().item()
    assert autograd_grad[0, 0].item() == pytest.approx((up - down) / (2 * h), rel=1e-5)


# ---------------------------------------------------------------- IGN


def test_integrated_gradients_completeness_on_a_smooth_model():
    model = smooth_classifier().double()
    batch = make_batch()
    x, y = batch["image"].double(), batch["label"]
    x_end = make_batch(seed=1)["image"].double()  # any end point: completeness is exact in m
    ig = integrated_gradients(model, x, x_end, y, m=2000)
    with torch.no_grad():
        gap = (F.cross_entropy(model(x_end), y, reduction="none")
               - F.cross_entropy(model(x), y, reduction="none"))
    assert gap.abs().max() > 0.2  # a non-trivial check
    error = (ig.sum((1, 2, 3)) - gap).abs().max()
    coarse_error = (integrated_gradients(model, x, x_end, y, m=20).sum((1, 2, 3)) - gap).abs().max()
    assert error < 1e-3
    assert error < 0.02 * coarse_error  # the Riemann error shrinks as 1/m


def test_integrated_gradients_match_captum_riemann_right():
    model = tiny_classifier()
    batch = make_batch()
    x, y = batch["image"], batch["label"]
    x_end = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    ours = integrated_gradients(model, x, x_end, y, m=12)
    theirs = IntegratedGradients(ce_per_sample(model)).attribute(
        x_end, baselines=x, additional_forward_args=(y,), n_steps=12, method="riemann_right"
    )
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_ign_loss_is_ce_plus_ig_norm_at_the_replayed_inner_max():
    model = tiny_classifier().train()
    method = build_method(model, params_for("ign", lambda_ig=0.7, m=8, attack_m=4, steps=4))
    batch = make_batch()
    x, y = batch["image"], batch["label"]
    torch.manual_seed(3)
    out = method.loss(batch)
    torch.manual_seed(3)
    start = (x + torch.empty_like(x).uniform_(-0.03, 0.03)).clamp(0, 1)  # the method's first draw
    torch.manual_seed(3)
    x_adv = method.inner_max(x, y)
    assert (x_adv - x).abs().max() <= 0.03 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    inner = lambda z: ig_norm(integrated_gradients(model, x, z, y, 4)).item()  # noqa: E731
    assert inner(x_adv) > inner(start)  # the inner max ascends ||IG||_1

    ig = IntegratedGradients(ce_per_sample(model)).attribute(
        x_adv, baselines=x, additional_forward_args=(y,), n_steps=8, method="riemann_right"
    )
    cls = F.cross_entropy(model(x), y)
    norm = ig.abs().flatten(1).sum(1).mean()
    assert out.terms["ig"].item() == pytest.approx(norm.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((cls + 0.7 * norm).item(), rel=1e-5)
    out.loss.backward()  # differentiable through IG (create_graph)
    assert model.fc.weight.grad.abs().sum() > 0


def test_ign_inner_max_is_the_loop_it_replaced_bit_for_bit():
    """IGNormAttack (Attack's bounds, uniform_start, ascend_) against the hand-written loop IGN
    had before: the same random draws and the same arithmetic, so the same x' to the bit."""
    model = tiny_classifier().train()
    method = build_method(model, params_for("ign", attack_m=3, steps=3))
    x, y = make_batch()["image"], make_batch()["label"]
    eps, alpha = 0.03, 0.01
    torch.manual_seed(5)
    lower, upper = (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)
    expected = torch.empty_like(x).uniform_(-eps, eps).add_(x).clamp_(lower, upper)
    model.eval()
    for _ in range(3):
        expected.requires_grad_(True)
        ig = integrated_gradients(model, x, expected, y, 3, create_graph=True)
        (grad,) = torch.autograd.grad(ig.abs().sum(), expected)
        expected = expected.detach().add_(grad.sign(), alpha=alpha).clamp_(lower, upper)
    model.train()
    torch.manual_seed(5)
    assert torch.equal(method.inner_max(x, y), expected)



def test_ign_ig_term_runs_in_eval_mode_and_leaves_batchnorm_statistics_alone():
    model = tiny_classifier().train()
    model.backbone[1] = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU())
    bn = model.backbone[1][0]
    params = params_for("ign", m=4, attack_m=2, steps=2)
    method = build_method(model, params)
    before = build_method(copy.deepcopy(model), params)  # the inner max sees the initial stats
    batch = make_batch()
    x, y = batch["image"], batch["label"]
    torch.manual_seed(1)
    out = method.loss(batch)
    assert bn.num_batches_tracked.item() == 1  # only the clean CE pass ran in train mode
    assert model.training and bn.training
    torch.manual_seed(1)
    x_adv = before.inner_max(x, y)
    model.eval()
    expected = ig_norm(integrated_gradients(model, x, x_adv, y, 4))
    assert out.terms["ig"].item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- DMADA


def test_dmada_pairs_domains_like_domainbed():
    model = tiny_classifier()
    method = build_method(model, params_for("dmada"))
    batch = make_batch(n=8, domains=[2, 0, 1, 0, 2, 2, 1, 0])
    x, y, d = batch["image"], batch["label"], batch["domain"]
    torch.manual_seed(11)
    out = method.loss(batch)

    torch.manual_seed(11)
    minibatches = [(x[d == k], y[d == k]) for k in (0, 1, 2)]
    order = torch.randperm(3).tolist()
    expected = 0.0
    for i in range(3):
        (xi, yi), (xj, yj) = minibatches[order[i]], minibatches[order[(i + 1) % 3]]
        n = min(len(xi), len(xj))
        lam = float(torch.distributions.Beta(0.2, 0.2).sample())
        pred = model(lam * xi[:n] + (1 - lam) * xj[:n])
        expected += lam * F.cross_entropy(pred, yi[:n]) + (1 - lam) * F.cross_entropy(pred, yj[:n])
    assert out.loss.item() == pytest.approx(expected.item() / 3, abs=1e-6)


def test_dmada_one_domain_mixes_with_a_permutation_of_the_batch():
    model = tiny_classifier()
    method = build_method(model, params_for("dmada", mix_alpha=0.4))
    batch = make_batch()
    x, y = batch["image"], batch["label"]
    torch.manual_seed(5)
    out = method.loss(batch)
    torch.manual_seed(5)
    perm = torch.randperm(6)
    lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    pred = model(lam * x + (1 - lam) * x[perm])
    expected = lam * F.cross_entropy(pred, y) + (1 - lam) * F.cross_entropy(pred, y[perm])
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.allclose(out.logits, model(x), atol=1e-6)


# ---------------------------------------------------------------- IRM


def domainbed_irm_penalty(logits, y):
    """DomainBed's ``IRM._irm_penalty``, written out."""
    scale = torch.tensor(1.0).requires_grad_()
    loss_1 = F.cross_entropy(logits[::2] * scale, y[::2])
    loss_2 = F.cross_entropy(logits[1::2] * scale, y[1::2])
    grad_1 = torch.autograd.grad(loss_1, [scale], create_graph=True)[0]
    grad_2 = torch.autograd.grad(loss_2, [scale], create_graph=True)[0]
    return torch.sum(grad_1 * grad_2)


def test_irm_penalty_matches_domainbed_and_its_gradient():
    torch.manual_seed(0)
    logits = torch.randn(7, 4, requires_grad=True)
    y = torch.randint(0, 4, (7,))
    ours, theirs = irm_penalty(logits, y), domainbed_irm_penalty(logits, y)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-8)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    assert torch.allclose(g_ours, g_theirs, atol=1e-6)


@pytest.mark.parametrize("rescale", [True, False])
def test_irm_loss_over_domains_and_penalty_annealing(rescale):
    model = tiny_classifier()
    method = build_method(
        model, params_for("irm", irm_lambda=50.0, anneal_iters=2, rescale=rescale)
    )
    batch = make_batch(n=9, domains=[0, 1, 0, 1, 1, 0, 0, 1, 1])
    x, y, d = batch["image"], batch["label"], batch["domain"]
    logits = model(x)
    nll = torch.stack([F.cross_entropy(logits[d == k], y[d == k]) for k in (0, 1)]).mean()
    pen = torch.stack([domainbed_irm_penalty(logits[d == k], y[d == k]) for k in (0, 1)]).mean()
    for step, weight in enumerate([1.0, 1.0, 50.0, 50.0]):
        out = method.loss(batch)
        assert method.step == step + 1
        expected = nll + weight * pen
        if rescale and weight > 1:
            expected = expected / weight
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5), step
        assert out.terms["penalty"].item() == pytest.approx(pen.item(), rel=1e-5, abs=1e-9)


def test_irm_one_domain_uses_two_random_halves():
    model = tiny_classifier()
    method = build_method(model, params_for("irm"))
    batch = make_batch(n=8)
    x, y = batch["image"], batch["label"]
    torch.manual_seed(2)
    out = method.loss(batch)
    torch.manual_seed(2)
    perm = torch.randperm(8)
    logits = model(x)
    envs = [perm[:4], perm[4:]]
    nll = torch.stack([F.cross_entropy(logits[e], y[e]) for e in envs]).mean()
    pen = torch.stack([domainbed_irm_penalty(logits[e], y[e]) for e in envs]).mean()
    assert out.loss.item() == pytest.approx((nll + pen).item(), rel=1e-5)


# ---------------------------------------------------------------- DRE


def known_cam_classifier():
    """One feature channel A = the red channel (no normalisation), fc weights (1, 2, 3) > 0:
    every class's Grad-CAM is A / (max A + 1e-8) and the logits are W * mean(A)."""
    backbone = nn.Conv2d(3, 1, 1, bias=False)
    model = Classifier(backbone, 1, 3, dropout=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    with torch.no_grad():
        backbone.weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))
        model.fc.weight.copy_(torch.tensor([[1.0], [2.0], [3.0]]))
        model.fc.bias.zero_()
    return model


def test_dre_terms_on_a_model_with_a_known_cam():
    model = known_cam_classifier()
    method = build_method(model, params_for("dre"))
    batch = make_batch(n=7)
    x, y = batch["image"], batch["label"]  # classes 0, 1, 2, 0, 1, 2, 0
    torch.manual_seed(4)
    out = method.loss(batch)

    torch.manual_seed(4)
    lam = float(torch.distributions.Beta(0.2, 0.2).sample())
    perm = torch.arange(7)
    for c in range(3):
        idx = (y == c).nonzero()[:, 0]
        perm[idx] = idx[torch.randperm(len(idx))]
    assert (y[perm] == y).all()
    x_mix = lam * x + (1 - lam) * x[perm]

    def cam(z):
        red = z[:, 0]
        return red / (red.amax((1, 2), keepdim=True) + 1e-8)

    def logits(z):
        return z[:, 0].mean((1, 2))[:, None] * torch.tensor([1.0, 2.0, 3.0])

    expl = (cam(x_mix) - (lam * cam(x) + (1 - lam) * cam(x)[perm])).abs().mean()
    sparse = cam(x_mix).mean()
    cls, mix = F.cross_entropy(logits(x), y), F.cross_entropy(logits(x_mix), y)
    for name, value in {"cls": cls, "expl": expl, "sparse": sparse, "mix": mix}.items():
        assert out.terms[name].item() == pytest.approx(value.item(), abs=1e-6), name
    assert out.loss.item() == pytest.approx(
        (cls + 1.0 * expl + 0.5 * sparse + 0.1 * mix).item(), abs=1e-6
    )
    assert expl > 0  # the max-normalised CAM is not linear in the input


# ---------------------------------------------------------------- SGDrop


@pytest.mark.parametrize("rho", [0.1, 0.25])
def test_sgdrop_drops_exactly_the_most_salient_feature_entries(rho):
    model = tiny_classifier(channels=4)
    method = build_method(model, params_for("sgdrop", rho=rho))
    batch = make_batch()
    x, y = batch["image"], batch["label"]
    feats = model.features(x)  # (6, 4, 4, 4): 64 entries per sample
    mask = method.drop_mask(feats, model.head(feats), y)
    k = round(rho * 64)

    # Independent route: for GAP -> linear, dS_y/dA_kij = W[y, k] / (h w).
    saliency = F.relu(model.fc.weight[y][:, :, None, None] / 16 * feats).detach().flatten(1)
    dropped = mask.flatten(1) == 0
    assert (dropped.sum(1) == k).all()
    for i in range(6):
        assert set(dropped[i].nonzero()[:, 0].tolist()) == set(saliency[i].topk(k).indices.tolist())
    assert set(mask.unique().tolist()) <= {0.0, 1.0}

    out = method.loss(batch)
    expected = F.cross_entropy(model.head(feats * mask), y)
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.allclose(out.logits, model(x), atol=1e-6)


# ---------------------------------------------------------------- SGT


def test_sgt_randomises_the_least_salient_input_features():
    model = tiny_classifier().train()
    method = build_method(model, params_for("sgt"))
    batch = make_batch()
    x, y = batch["image"], batch["label"]
    torch.manual_seed(9)
    x_masked, mask = method.masked_input(x, y)
    assert model.training

    k = round(0.1 * 3 * 8 * 8)
    saliency = Saliency(model).attribute(x.clone().requires_grad_(), target=y, abs=True).flatten(1)
    assert (mask.flatten(1).sum(1) == k).all()
    for i in range(6):
        lowest = set(saliency[i].topk(k, largest=False).indices.tolist())
        assert set(mask[i].flatten().nonzero()[:, 0].tolist()) == lowest
    assert torch.equal(x_masked[~mask], x[~mask])
    assert not torch.equal(x_masked[mask], x[mask])
    assert x_masked.min() >= 0 and x_masked.max() <= 1

    torch.manual_seed(9)
    out = method.loss(batch)
    p, q = model(x).softmax(1), model(x_masked).softmax(1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    assert out.terms["kl"].item() == pytest.approx(kl.item(), abs=1e-6)
    assert out.loss.item() == pytest.approx((F.cross_entropy(model(x), y) + kl).item(), abs=1e-6)


# ---------------------------------------------------------------- bad hyperparameters


@pytest.mark.parametrize(
    "method, cfg, key",
    [
        ("pgd_at", {"eps": 0.1}, "eps"),
        ("igr", {"lambda_grad": -1}, "lambda_grad"),
        ("ign", {"lambda_ig": -0.1}, "lambda_ig"),
        ("ign", {"m": 0}, "m"),
        ("ign", {"attack_m": 0}, "attack_m"),
        ("ign", {"steps": 0}, "steps"),
        ("ign", {"ig_mode": "test"}, "ig_mode"),
        ("dmada", {"mix_alpha": 0}, "mix_alpha"),
        ("irm", {"irm_lambda": -1}, "irm_lambda"),
        ("irm", {"anneal_iters": -5}, "anneal_iters"),
        ("dre", {"lambda_expl": -1}, "lambda_expl"),
        ("dre", {"mix_alpha": 0}, "mix_alpha"),
        ("sgdrop", {"rho": 1.5}, "rho"),
        ("sgdrop", {"rho": 0}, "rho"),
        ("sgt", {"mask_fraction": 1.0}, "mask_fraction"),
        ("sgt", {"lambda_kl": -1}, "lambda_kl"),
        ("sgt", {"saliency_target": "random"}, "saliency_target"),
    ],
)
def test_bad_hyperparameters_name_the_method_and_key(method, cfg, key):
    with pytest.raises(ParamsError, match=rf"methods\.{method}\.{key}\b"):
        params_from_dict({"methods": {method: cfg}})

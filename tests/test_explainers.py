"""SmoothGrad, Integrated Gradients and Finer-CAM beside Grad-CAM: the registry's uniform contract,
captum equality of the differentiable paths, and Finer-CAM against a hand computation."""

import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr import NoiseTunnel, Saliency

from egat.build import build_explainer, build_method, params_from_dict
from egat.config import ExplainerParams
from egat.errors import ParamsError
from egat.explain import explainer_registry, normalise_maps
from egat.explain.finercam import FinerCAM
from egat.explain.gradcam import GradCAM
from egat.explain.ig import IntegratedGradients
from egat.explain.smoothgrad import SmoothGrad
from egat.data.guides import guide_at
from egat.methods.base import distance
from tests.helpers import make_batch, params_for, tiny_classifier

CONFIG = ExplainerParams(smoothgrad={"samples": 3}, ig={"steps": 4}, finercam={"similar": 1})
# Grad-CAM and Finer-CAM explain the last block (8x8 -> 4x4); the gradient methods the pixels.
RESOLUTION = {"gradcam": 4, "finercam": 4, "smoothgrad": 8, "ig": 8}


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 1, 0])


def test_every_explainer_is_in_the_registry():
    assert {"gradcam", "smoothgrad", "ig", "finercam"} <= set(explainer_registry.names())


@pytest.mark.parametrize("name", explainer_registry.names())
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_contract_shape_range_mode_detached(batch, name, mode):
    x, y = batch
    model = tiny_classifier()
    model.train(mode == "train")
    maps = build_explainer(name, model, CONFIG).attribute(x, target=y)
    side = RESOLUTION[name]
    assert maps.shape == (5, side, side)
    assert maps.min() >= 0 and maps.max() <= 1 and torch.isfinite(maps).all()
    assert not maps.requires_grad
    assert all(m.training == (mode == "train") for m in model.modules())


@pytest.mark.parametrize("name", explainer_registry.names())
def test_training_maps_are_differentiable_and_equal_evaluation_maps(batch, name):
    x, y = batch
    model = tiny_classifier()
    explainer = build_explainer(name, model, CONFIG)
    torch.manual_seed(3)
    detached = explainer.attribute(x, target=y)
    torch.manual_seed(3)
    logits, (maps, other) = explainer.logits_and_maps(x, [y, (y + 1) % 3], create_graph=True)
    assert torch.allclose(maps, detached, atol=1e-6)
    assert logits.shape == (5, 3) and other.shape == maps.shape
    (maps.pow(2).mean() + other.mean()).backward()
    assert model.backbone[0].weight.grad.abs().sum() > 0


def test_smoothgrad_equals_captum_noise_tunnel(batch):
    x, y = batch
    model = tiny_classifier().eval()
    torch.manual_seed(7)
    ours = SmoothGrad(model, samples=4, stdev=0.2).attribute(x, y, create_graph=True)
    torch.manual_seed(7)
    ref = NoiseTunnel(Saliency(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=4, stdevs=0.2, target=y, abs=True
    )
    assert torch.allclose(ours, normalise_maps(ref.sum(1)), atol=1e-5)


def test_smoothgrad_without_noise_is_plain_saliency(batch):
    x, y = batch
    model = tiny_classifier().eval()
    ours = SmoothGrad(model, samples=2, stdev=0.0).attribute(x, y)
    ref = Saliency(model).attribute(x, target=y, abs=True)
    assert torch.allclose(ours, normalise_maps(ref.sum(1)), atol=1e-5)


def test_ig_equals_captum_riemann_middle(batch):
    x, y = batch
    model = tiny_classifier().eval()
    ours = IntegratedGradients(model, steps=6).attribute(x, y, create_graph=True)
    ref = CaptumIG(model).attribute(
        x, baselines=torch.zeros_like(x), target=y, n_steps=6, method="riemann_middle"
    )
    assert torch.allclose(ours, normalise_maps(ref.sum(1).abs()), atol=1e-5)


def test_ig_is_exact_for_a_linear_score():
    # ReLU-free 1x1 conv backbone: S_c is affine in x, so IG = x * dS_c/dx exactly (completeness).
    model = tiny_classifier(channels=2)
    model.backbone = torch.nn.Conv2d(3, 2, 1)
    model.eval()
    x, y = torch.rand(2, 3, 4, 4), torch.tensor([0, 2])
    probe = torch.rand_like(x).requires_grad_(True)  # any point: the gradient is constant
    (grad,) = torch.autograd.grad(model(probe).gather(1, y[:, None]).sum(), probe)
    expected = normalise_maps((x * grad).sum(1).abs())
    assert torch.allclose(IntegratedGradients(model, steps=1).attribute(x, y), expected, atol=1e-6)


@pytest.mark.parametrize("similar", [1, 2])
def test_finercam_closed_form_equals_autograd(batch, similar):
    x, y = batch
    model = tiny_classifier().eval()
    closed = FinerCAM(model, similar=similar, alpha=0.7).attribute(x, y)
    auto = FinerCAM(model, similar=similar, alpha=0.7, closed_form=False).attribute(x, y)
    assert torch.allclose(closed, auto, atol=1e-5)


def test_finercam_hand_computed_with_one_similar_class(batch):
    x, y = batch
    model = tiny_classifier(num_classes=4).eval()
    y = torch.tensor([0, 1, 2, 3, 0])
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    maps = FinerCAM(model, similar=1, alpha=0.5).attribute(x, y)
    for i in range(5):
        c = int(y[i])
        gaps = [(abs(float(logits[i, j] - logits[i, c])), j) for j in range(4) if j != c]
        d = min(gaps)[1]
        w = model.fc.weight[c] - 0.5 * model.fc.weight[d]
        cam = F.relu(torch.einsum("c,chw->hw", w, feats[i]))
        assert torch.allclose(maps[i], cam / (cam.max() + 1e-8), atol=1e-5)


def test_finercam_without_comparison_is_gradcam(batch):
    x, y = batch
    model = tiny_classifier().eval()
    assert torch.allclose(FinerCAM(model, alpha=0.0).attribute(x, y), GradCAM(model).attribute(x, y))


def test_build_explainer_takes_options_from_params():
    explainer = build_explainer("smoothgrad", tiny_classifier(), CONFIG)
    assert (explainer.samples, explainer.stdev) == (3, 0.15)
    assert build_explainer("finercam", tiny_classifier(), CONFIG).similar == 1


@pytest.mark.parametrize("key", ["explainer.name", "eval.explainer"])
def test_unknown_explainer_is_named(key):
    group, name = key.split(".")
    with pytest.raises(ParamsError, match=rf"{key}='lime' is unknown; valid: finercam, gradcam, ig"):
        params_from_dict({group: {name: "lime"}})


@pytest.mark.parametrize("name", ["smoothgrad", "ig", "finercam"])
def test_egat_guides_at_the_explainers_resolution(name):
    # EGL compares E_y(x) with the guide resampled to the map's own grid (input grid for gradients).
    torch.manual_seed(0)
    params = params_for("egat", lambda_adv=0.0, lambda_mix=0.0)
    params.explainer.name = name
    params.explainer.smoothgrad.stdev = 0.0  # deterministic maps for the comparison
    model = tiny_classifier()
    batch = make_batch()
    out = build_method(model, params).loss(batch)
    maps = build_explainer(name, model, params.explainer).attribute(batch["image"], batch["label"])
    guide = guide_at(batch["guide"], maps.shape[-2:])
    assert maps.shape[-1] == RESOLUTION[name]
    assert torch.allclose(out.terms["egl"], distance(maps, guide, "mse"), atol=1e-6)

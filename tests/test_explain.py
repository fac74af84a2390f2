import pytest
import torch
from captum.attr import LayerGradCam

from egat.explain import normalise_maps
from egat.explain.gradcam import GradCAM
from tests.helpers import tiny_classifier


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 1, 0])


def test_closed_form_equals_autograd(batch):
    x, y = batch
    model = tiny_classifier().eval()
    closed = GradCAM(model).attribute(x, y)
    auto = GradCAM(model, closed_form=False).attribute(x, y)
    assert closed.shape == (5, 4, 4)
    assert torch.allclose(closed, auto, atol=1e-5)


def test_matches_captum_layer_gradcam(batch):
    x, y = batch
    model = tiny_classifier().eval()
    ours = GradCAM(model).attribute(x, y)
    captum = LayerGradCam(model, model.backbone).attribute(x, target=y, relu_attributions=True)
    assert torch.allclose(ours, normalise_maps(captum[:, 0]), atol=1e-5)


def test_hand_computed_cam():
    # One channel, identity-like features: CAM = ReLU(W[c,0]/(h w) * A) normalised = A / max(A).
    model = tiny_classifier(channels=1).eval()
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[2.0], [-1.0], [0.5]]))
    x = torch.rand(2, 3, 8, 8)
    feats = model.features(x)[:, 0]
    maps = GradCAM(model).attribute(x, torch.tensor([0, 1]))
    assert torch.allclose(maps[0], feats[0] / (feats[0].max() + 1e-8), atol=1e-6)
    assert torch.count_nonzero(maps[1]) == 0  # negative weight -> ReLU kills the map


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("closed_form", [True, False])
def test_mode_is_never_changed(batch, mode, closed_form):
    x, y = batch
    model = tiny_classifier()
    model.train(mode == "train")
    GradCAM(model, closed_form=closed_form).attribute(x, y)
    assert all(m.training == (mode == "train") for m in model.modules())


@pytest.mark.parametrize("closed_form", [True, False])
def test_training_maps_are_differentiable(batch, closed_form):
    x, y = batch
    model = tiny_classifier()
    logits, (maps,) = GradCAM(model, closed_form=closed_form).logits_and_maps(x, [y])
    maps.pow(2).mean().backward()
    assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0
    assert model.backbone[0].weight.grad.abs().sum() > 0


def test_evaluation_maps_are_detached(batch):
    x, y = batch
    maps = GradCAM(tiny_classifier()).attribute(x, y)
    assert not maps.requires_grad
    assert maps.min() >= 0 and maps.max() <= 1

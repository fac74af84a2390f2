"""Registered architectures: small_resnet (embedded default) and torchvision backbones.

torchvision is imported by the builders that use it: importing it costs a stage process 1.4 s
(it loads torch._dynamo), which the small_resnet default does not need.
"""

from __future__ import annotations

from torch import nn

from egat.models.classifier import Classifier, _register
from egat.models.small_resnet import small_resnet_backbone


@_register("small_resnet", backbone_keys=lambda key: None if key.startswith("fc.") else key)
def small_resnet(num_classes: int, dropout: float, imagenet: bool, width: int = 32) -> Classifier:
    if imagenet:
        from egat.errors import EgatError

        raise EgatError("model.pretrained: small_resnet has no ImageNet weights; use 'none'")
    backbone = small_resnet_backbone(width=width)
    return Classifier(backbone, num_features=128, num_classes=num_classes, dropout=dropout)


def _resnet_keys(key: str) -> str | None:
    return None if key.startswith("fc.") else key


@_register("resnet50", backbone_keys=_resnet_keys)
def resnet50(num_classes: int, dropout: float, imagenet: bool) -> Classifier:
    from torchvision import models as tvm

    net = tvm.resnet50(weights=tvm.ResNet50_Weights.IMAGENET1K_V2 if imagenet else None)
    # Everything up to layer4: drop torchvision's avgpool and fc (our head replaces them).
    backbone = nn.Sequential(*list(net.children())[:-2])
    return Classifier(backbone, num_features=2048, num_classes=num_classes, dropout=dropout)


def _features_keys(key: str) -> str | None:
    # torchvision mobilenet/efficientnet: backbone = `features` module, head = `classifier`.
    return key[len("features."):] if key.startswith("features.") else None


@_register("mobilenet_v2", backbone_keys=_features_keys)
def mobilenet_v2(num_classes: int, dropout: float, imagenet: bool) -> Classifier:
    from torchvision import models as tvm

    net = tvm.mobilenet_v2(weights=tvm.MobileNet_V2_Weights.IMAGENET1K_V1 if imagenet else None)
    return Classifier(net.features, num_features=1280, num_classes=num_classes, dropout=dropout)


@_register("efficientnet_b0", backbone_keys=_features_keys)
def efficientnet_b0(num_classes: int, dropout: float, imagenet: bool) -> Classifier:
    from torchvision import models as tvm

    net = tvm.efficientnet_b0(weights=tvm.EfficientNet_B0_Weights.IMAGENET1K_V1 if imagenet else None)
    return Classifier(net.features, num_features=1280, num_classes=num_classes, dropout=dropout)

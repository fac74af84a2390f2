"""Classifier wrapper, the model registry and pretrained-weight loading."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from egat import io
from egat.errors import EgatError
from egat.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

model_registry: Registry[Callable[..., "Classifier"]] = Registry("model")


class Classifier(nn.Module):
    """normalise -> backbone (conv feature map) -> global average pool -> dropout -> linear.

    Input: pixel-scale images (B, 3, H, W) in [0, 1]. Normalisation lives here so that attacks,
    guide maps and perturbations all work in pixel scale.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_features: int,
        num_classes: int,
        dropout: float,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(num_features, num_classes)
        self.num_classes = num_classes
        self.memory_format = torch.contiguous_format
        self.input_size: int | None = None  # see resize_inputs

    def resize_inputs(self, size: int | None) -> "Classifier":
        """Bilinearly resize every input to ``size`` px inside the model (None: as given).

        ImageNet backbones have stride 32: on 32 px images their map is 1x1 and every CAM is
        constant, so they see the images upsampled. Attacks, guides and maps keep the data's size.
        """
        self.input_size = size
        return self

    def to_memory_format(self, memory_format: torch.memory_format) -> "Classifier":
        """Weights and activations in ``memory_format``. ``torch.channels_last`` (NHWC): oneDNN
        (CPU) and cuDNN convolutions run markedly faster this way (PGD-10 on the embedded default:
        0.93 s -> 0.52 s a batch on 2 CPU cores); ``torch.contiguous_format``: the portable default."""
        self.memory_format = memory_format
        return self.to(memory_format=memory_format)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map A of the last conv block, (B, C, h, w): Grad-CAM's target layer."""
        if self.input_size is not None and x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        return self.backbone(((x - self.mean) / self.std).contiguous(memory_format=self.memory_format))

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(feats.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(
    name: str,
    num_classes: int,
    pretrained: str = "none",
    dropout: float = 0.1,
    channels_last: bool = False,
    input_size: int | None = None,
    **kwargs,
) -> Classifier:
    """Create a registered model. ``pretrained``: none | imagenet | path to a local state_dict;
    ``input_size``: the size inputs are resized to inside the model (None: as given)."""
    factory = model_registry.get(name)
    imagenet = pretrained == "imagenet"
    model = factory(num_classes=num_classes, dropout=dropout, imagenet=imagenet, **kwargs)
    if pretrained not in ("none", "imagenet"):
        load_backbone_state_dict(model, name, Path(pretrained))
    model.resize_inputs(input_size)
    return model.to_memory_format(torch.channels_last) if channels_last else model


def load_backbone_state_dict(model: Classifier, name: str, path: Path) -> None:
    """Load a torchvision-format state_dict (e.g. an ImageNet checkpoint) into the backbone.

    The classifier head of the file is dropped (its class count differs); every backbone key must
    match, so a file for another architecture fails loudly instead of half-loading.
    """
    if not path.is_file():
        raise EgatError(
            f"model.pretrained: {str(path)!r} is not a file; use 'none', 'imagenet' or the path "
            "to a local state_dict (.pth)"
        )
    state = io.torch_load(path, "a state_dict (model.pretrained)")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    mapping = model_registry.get(name).backbone_keys  # type: ignore[attr-defined]
    backbone_state = {}
    for key, value in state.items():
        new_key = mapping(key)
        if new_key is not None:
            backbone_state[new_key] = value
    missing, unexpected = model.backbone.load_state_dict(backbone_state, strict=False)
    if missing or unexpected:
        raise EgatError(
            f"model.pretrained: {str(path)!r} does not fit model {name!r}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]})"
        )


def _register(name: str, backbone_keys: Callable[[str], str | None]):
    """Register a factory and how torchvision state_dict keys map onto its backbone."""

    def deco(fn):
        fn.backbone_keys = backbone_keys
        return model_registry.register(name)(fn)

    return deco

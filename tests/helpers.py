"""Tiny seeded models shared by the unit tests."""

from __future__ import annotations

import torch
from torch import nn

from egat.models import Classifier


def tiny_classifier(num_classes: int = 3, channels: int = 4, seed: int = 0, dropout=0.0):
    """conv3x3 -> ReLU -> conv3x3 -> ReLU backbone: (B,3,H,W) -> (B,channels,H/2,W/2)."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, channels, 3, stride=2, padding=1),
        nn.ReLU(),
    )
    return Classifier(backbone, channels, num_classes, dropout=dropout)

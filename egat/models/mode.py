"""The model-mode policy that attacks, methods and metrics share: run a block in eval or train mode."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

from torch import nn

ModelMode = Literal["eval", "train"]


@contextmanager
def model_mode(model: nn.Module, mode: ModelMode) -> Iterator[nn.Module]:
    """Put ``model`` in ``mode`` ("eval" | "train") for the block, then restore every submodule's.

    Restoring module-wise (rather than ``model.train(previous)``) keeps mixed states intact, e.g. a
    frozen BatchNorm left in eval inside a model in train mode. The restore runs on exceptions too.

    Example::

        with model_mode(model, "eval"):
            logits = model(x)
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"model_mode must be 'eval' or 'train', got {mode!r}")
    previous = [(module, module.training) for module in model.modules()]
    model.train(mode == "train")
    try:
        yield model
    finally:
        for module, training in previous:
            module.training = training

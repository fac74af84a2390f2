"""The GPU path of the Trainer: mixed precision (``train.precision``) and ``train.compile``.

bf16 autocast needs no loss scaling; fp16 autocast scales the loss with a GradScaler so that small
gradients do not underflow (on CUDA; CPU autocast runs fp16 unscaled). fp32 is a no-op path.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from egat.errors import EgatError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """``with precision.autocast(): loss = ...``; ``precision.backward(loss)``;
    ``precision.step(optimizer)`` (unscales, skips steps with inf/nan gradients under fp16)."""

    def __init__(self, name: str, device: torch.device):
        if name not in ("fp32", *DTYPES):
            raise EgatError(f"train.precision={name!r} is unknown; valid: fp32, bf16, fp16")
        self.name, self.device = name, device
        self.scaler = torch.amp.GradScaler("cuda") if name == "fp16" and device.type == "cuda" else None

    def autocast(self):
        if self.name == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.name])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def state_dict(self) -> dict:
        """The GradScaler's scale and growth tracker (fp16 on CUDA), for resumed runs."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()


def compile_backbone(model: torch.nn.Module, backend: str = "inductor") -> None:
    """Compile the backbone in place (``nn.Module.compile``: state_dict keys stay unchanged).

    The backbone, not the model: methods call ``model.features`` and ``model.head`` separately.
    Compiled graphs do not support double backward (igr, ign, sgt differentiate input gradients).
    ``backend``: torch.compile's; the tests use "aot_eager" (inductor's first CPU build takes ~2 min).
    """
    if not hasattr(torch, "compile"):
        raise EgatError("train.compile=true needs torch >= 2.0")
    model.backbone.compile(backend=backend)

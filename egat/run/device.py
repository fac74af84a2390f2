"""The device a run computes on: ``train.use_gpu`` (auto | true | false) against the GPUs there
are, one rule for a process (:func:`resolve_device`) and for a Ray cluster (its GPU count)."""

from __future__ import annotations

import torch

from egat.config import Params
from egat.errors import EgatError


def choose_gpu(want: str, gpus: float, none_there: str) -> bool:
    """``train.use_gpu=want`` with ``gpus`` available: auto = GPUs when there are any; true with
    none is an error, ending in ``none_there`` (where the GPUs were looked for)."""
    if want == "true" and gpus < 1:
        raise EgatError(f"train.use_gpu=true but {none_there}; use 'auto' or 'false'")
    return want == "true" or (want == "auto" and gpus >= 1)


def resolve_device(params: Params) -> torch.device:
    """This process's device: CUDA where ``train.use_gpu`` asks for it and one is visible."""
    visible = 1 if torch.cuda.is_available() else 0
    chosen = choose_gpu(params.train.use_gpu, visible, "no CUDA device is visible")
    return torch.device("cuda" if chosen else "cpu")

"""A seeded RNG scope: the attacks' random starts in validation, the guard and evaluation draw
the same numbers in every run, and the training RNG stream is left as it was."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def seeded_scope(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block on forked CPU (and, on a CUDA ``device``, every CUDA) generators seeded with
    ``seed``; afterwards the caller's generators continue as if the block had not run."""
    on_cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if on_cuda else []):
        torch.manual_seed(seed)
        yield

"""Training batches as a pure function of (seed, step).

A resumed run continues with exactly the batches an uninterrupted run would have drawn, and
distributed ranks take disjoint slices of the same global batch, with no sampler state to save.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[int]]):
    """Yields the index lists of steps ``start_step .. total_steps - 1`` (drop-last epochs).

    Each epoch is a fresh permutation seeded by (seed, epoch). With ``world_size > 1`` rank r
    takes entries r, r + W, ... of each global batch. With ``replays`` m > 1 (free adversarial
    training) steps mk .. mk + m - 1 all get minibatch k.
    """

    def __init__(
        self, num_samples: int, batch_size: int, seed: int, total_steps: int,
        start_step: int = 0, rank: int = 0, world_size: int = 1, replays: int = 1,
    ):
        if num_samples < batch_size:
            raise ValueError(f"{num_samples} samples are fewer than one batch of {batch_size}")
        self.replays = replays
        self.n, self.batch_size, self.seed = num_samples, batch_size, seed
        self.total_steps, self.start_step = total_steps, start_step
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = num_samples // batch_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, perm = -1, None
        for step in range(self.start_step, self.total_steps):
            e, b = divmod(step // self.replays, self.steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self._permutation(e)
            batch = perm[b * self.batch_size : (b + 1) * self.batch_size]
            yield batch[self.rank :: self.world_size].tolist()

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

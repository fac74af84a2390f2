"""The one loop every metric runs in: stream a loader's batches, score each image, keep sums.

A scorer is a function of one batch that returns per-image scores, ``{name: (B,) tensor}``
(a name may be missing from a batch, or score only some of its images); :func:`accumulate` sums
them batch by batch, so only running sums outlive a batch and memory is flat in the test-set size
(docs/method.md, Metrics). The per-image scorers themselves live beside their metric:
accuracy.py, faithfulness.py, stability.py, alignment.py, cue.py.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping

import torch

BatchScorer = Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]]


def iterate_batches(
    loader: Iterable[Mapping[str, object]], device: torch.device | str, max_examples: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's dict batches with their tensors on ``device``, at most ``max_examples`` images
    in all (0 = every batch; the last batch is cut to fit). Non-tensor entries are dropped.
    """
    seen = 0
    for batch in loader:
        take = len(batch["image"])
        if max_examples:
            take = min(take, max_examples - seen)
        yield {
            key: value[:take].to(device, non_blocking=True)
            for key, value in batch.items()
            if isinstance(value, torch.Tensor)
        }
        seen += take
        if max_examples and seen >= max_examples:
            return


class ScoreSums:
    """Running sum and count of every score name, in the order the names first appear.

    Each batch's scores are summed in their own dtype (bool and integer sums are exact); a scorer
    returns float64 where a float32 sum over a batch would round.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, values: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())
        self.counts[name] = self.counts.get(name, 0) + int(values.numel())

    def mean(self, name: str) -> float:
        return self.sums[name] / self.counts[name]

    def means(self) -> dict[str, float]:
        """The mean of every name that scored at least one image."""
        return {name: self.mean(name) for name in self.sums if self.counts[name]}


def accumulate(
    loader: Iterable[Mapping[str, object]],
    device: torch.device | str,
    score: BatchScorer,
    max_examples: int = 0,
) -> ScoreSums:
    """``score`` of every batch of ``loader`` (see :func:`iterate_batches`), summed per name.

    The caller sets the model's mode (``model_mode(model, "eval")``): scorers close over their
    model, the loop knows none.
    """
    sums = ScoreSums()
    for batch in iterate_batches(loader, device, max_examples):
        for name, values in score(batch).items():
            sums.add(name, values)
    return sums

"""Seeded, class-stratified subsets: every "first N images" the evaluation or validation takes.

Split lists are sorted by class (egat/data/splits.py), so the first N images of a split cover only
the first classes; a subset drawn here has every class, in equal shares.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Subset


def stratified_indices(labels, n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` items of ``labels``, equal per class (``n // K`` each; the remainder goes to
    seeded-randomly chosen classes), drawn without replacement by a generator seeded with ``seed``;
    sorted. ``n = 0`` or ``n >= len(labels)`` means all. A class with fewer items than its share
    gives all it has and the others fill the gap, so the size is always ``min(n, len(labels))``.
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    share = dict.fromkeys(classes, n // len(classes))
    for c in rng.permutation(classes)[: n % len(classes)]:
        share[c] += 1
    # Classes short of their share hand the rest to the others, one each in turn.
    taken = {c: min(share[c], len(pools[c])) for c in classes}
    missing = n - sum(taken.values())
    while missing:
        for c in rng.permutation([c for c in classes if taken[c] < len(pools[c])])[:missing]:
            taken[c] += 1
            missing -= 1
    return np.sort(np.concatenate([pools[c][: taken[c]] for c in classes]))


def stratified_subset(dataset: Dataset, n: int, seed: int) -> Dataset:
    """``dataset`` (with a ``labels`` tensor) cut to a stratified subset of at most ``n`` items
    (0, or ``n`` at least its size: the whole dataset)."""
    if n <= 0 or n >= len(dataset):
        return dataset
    return Subset(dataset, stratified_indices(dataset.labels, n, seed).tolist())

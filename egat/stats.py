"""Statistics of the reports (docs/protocol.md): means over seeds with 95 % confidence intervals
that count both seeds and the finite test set, and ranks that tie overlapping intervals.

Shared by egat/report.py (Tables I-IV, the figures) and egat/robust_report.py (the AA column).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

Z95 = 1.959964  # the standard normal's 97.5 % quantile


def binomial_variance(percent, n):
    """The squared standard error of a percentage of ``n`` images: p (100 - p) / n (floats or
    pandas Series alike)."""
    return percent * (100.0 - percent) / n


@dataclass(frozen=True)
class Stats:
    """Mean, sample std over seeds (NaN for one seed) and 95 % CI half-width of every cell, and
    the range each cell's metric can take (``floor``/``ceiling``; None or NaN: unbounded): the
    interval ``low``/``high`` is clipped to it, so a percentage's never leaves [0, 100]."""

    mean: pd.DataFrame
    std: pd.DataFrame
    half: pd.DataFrame
    floor: pd.DataFrame | None = None
    ceiling: pd.DataFrame | None = None

    @property
    def low(self) -> pd.DataFrame:
        return (self.mean - self.half).clip(lower=self.floor)

    @property
    def high(self) -> pd.DataFrame:
        return (self.mean + self.half).clip(upper=self.ceiling)

    def map(self, fn) -> "Stats":
        return Stats(*(None if part is None else fn(part) for part in astuple_shallow(self)))


def astuple_shallow(stats: Stats) -> tuple:
    """The fields in order, not copied (dataclasses.astuple deep-copies every frame)."""
    return tuple(getattr(stats, f.name) for f in fields(stats))


def over_seeds(per_seed: pd.DataFrame, by: list[str],
               bounds: Mapping[str, tuple[float, float]] | None = None) -> Stats:
    """Stats over the seed level of ``per_seed`` (one row per seed), grouped by ``by``.

    half = sqrt((t_{k-1} s / sqrt(k))^2 + (z var_test^0.5)^2): the seeds' t interval and the
    shared test set's normal interval in quadrature (docs/protocol.md); with one seed, the test
    set's alone. ``<column>_var`` columns hold the test-set variance of ``<column>``; metrics
    without one (rank scores) get the seeds' term only. ``bounds`` maps a column to the values
    its metric can take (a percentage's (0, 100)); its interval is clipped to them.
    """
    from scipy.stats import t as student_t

    values = [c for c in per_seed.columns if not c.endswith("_var")]
    grouped = per_seed.groupby(level=by)
    mean, std, k = grouped[values].mean(), grouped[values].std(ddof=1), grouped.size()
    quantile = pd.Series(student_t.ppf(0.975, np.maximum(k - 1, 1)), index=k.index)
    seed_term = std.mul(quantile / np.sqrt(k), axis=0).fillna(0.0)
    test_term = pd.DataFrame(0.0, index=mean.index, columns=values)
    for c in values:
        if f"{c}_var" in per_seed.columns:
            test_term[c] = (Z95 * np.sqrt(grouped[f"{c}_var"].mean())).fillna(0.0)
    half = np.sqrt(seed_term**2 + test_term**2)
    floor = pd.DataFrame(np.nan, index=mean.index, columns=mean.columns)
    ceiling = floor.copy()
    for column, (lowest, highest) in (bounds or {}).items():
        if column in floor.columns:
            floor[column], ceiling[column] = lowest, highest
    return Stats(mean, std, half, floor, ceiling)


def interval_ranks(stats: Stats) -> pd.DataFrame:
    """Rank 1 = best in each column; a method's rank is 1 + the number of methods whose whole
    95 % interval lies above its own, so methods with overlapping intervals tie."""
    low, high = stats.low, stats.high
    ranks = pd.DataFrame(index=stats.mean.index, columns=stats.mean.columns, dtype=float)
    for col in stats.mean.columns:
        present = stats.mean[col].notna()
        for method in stats.mean.index[present]:
            ranks.loc[method, col] = 1 + int((low.loc[present, col] > high.loc[method, col]).sum())
    return ranks

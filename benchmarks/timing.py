"""Side-by-side timing: callables run in round-robin order (one call of each per round), so that
drift in machine speed (other processes on shared cores) hits all of them alike; medians."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
# CPU time of this process: on a shared machine, other processes stretch wall time but hardly the
# CPU time a computation takes (use one torch thread, so no thread spins idle); wall on a quiet one.
clock = CLOCKS["cpu"]


def use_clock(name: str) -> None:
    global clock
    clock = CLOCKS[name]


def round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> "Timings":
    """Seconds (of the chosen clock, see :func:`use_clock`) of each call of each callable, one call
    of each per round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            if r >= warmup:
                times[name].append(clock() - start)
    return Timings(times)


@dataclass(frozen=True)
class Spread:
    """A ratio's median over rounds and its range (the min and max of the per-round ratios)."""

    median: float
    low: float
    high: float

    def at_most(self, target: float) -> bool | None:
        """True when the whole range is <= target, False when all of it is above, None (undecided:
        more repeats needed) when the range straddles it."""
        return True if self.high <= target else False if self.low > target else None

    def at_least(self, target: float) -> bool | None:
        return True if self.low >= target else False if self.high < target else None

    def __str__(self) -> str:
        return f"{self.median:.2f} [{self.low:.2f}, {self.high:.2f}]"


def all_of(*verdicts: bool | None) -> bool | None:
    """Several conditions of one target: False if any fails, None if any is undecided."""
    return False if False in verdicts else None if None in verdicts else True


def spread(values: list[float]) -> Spread:
    return Spread(statistics.median(values), min(values), max(values))


@dataclass(frozen=True)
class Timings:
    """Per-call seconds of each callable of one round-robin run."""

    samples: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio(self, name: str, versus: str) -> Spread:
        """``name``'s time over ``versus``'s, round by round: the two calls of a round ran back to
        back, so machine drift cancels in each pairwise ratio, and their range is the noise."""
        return spread([a / b for a, b in zip(self.samples[name], self.samples[versus])])


@dataclass
class Row:
    """One line of the benchmark table.

    ``value`` in ``unit`` (ms, img/s); ``ratio`` = this row's cost relative to ``versus`` (for a
    speed-up row: versus's time / ours), the median of the per-round ratios, and ``ratio_low`` /
    ``ratio_high`` their range; ``diff`` the max abs difference of outputs (maps, images);
    ``target`` the goal in words and ``met`` whether the whole range meets it (None: no target, or
    the range straddles it: undecided).
    """

    section: str
    name: str
    value: float | None = None
    unit: str = "ms"
    versus: str = ""
    ratio: float | None = None
    diff: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)
    ratio_low: float | None = None
    ratio_high: float | None = None

    def with_spread(self, ratio: Spread) -> "Row":
        self.ratio, self.ratio_low, self.ratio_high = ratio.median, ratio.low, ratio.high
        return self

    @property
    def status(self) -> str:
        if not self.target:
            return ""
        return {True: "met", False: "NOT met", None: "undecided: the range straddles the target"}[
            self.met]


def missing_extra(section: str, name: str, module: str, exc: ImportError) -> Row:
    """The row of a comparison whose benchmark-only package is not installed."""
    return Row(section, name, unit="", note=f"not run: {module} is not installed ({exc}); "
               "pip install -e '.[bench]'")

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


def round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds (of the chosen clock, see :func:`use_clock`) per call of each callable."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            if r >= warmup:
                times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@dataclass
class Row:
    """One line of the benchmark table.

    ``value`` in ``unit`` (ms, img/s); ``ratio`` = this row's cost relative to ``versus`` (for a
    speed-up row: versus's time / ours); ``diff`` the max abs difference of outputs (maps, images);
    ``target`` the goal in words and ``met`` whether it holds (None: no target, or not measured).
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


def missing_extra(section: str, name: str, module: str, exc: ImportError) -> Row:
    """The row of a comparison whose benchmark-only package is not installed."""
    return Row(section, name, unit="", note=f"not run: {module} is not installed ({exc}); "
               "pip install -e '.[bench]'")

"""Faults the tests inject into Ray Train workers, through ``fit_ray(on_report=...)``.

Ray pickles the hook into every worker's config. A fault pickles this module by value (Ray's
cloudpickle), so workers need not import ``tests``, which is not installed with the package.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Literal, Mapping


class WorkerFault:
    """At ``step``, the worker of rank ``rank`` (or, with ``node_labels``, the worker on a node
    with those labels), once (the ``marker`` file records what it did, and on which Ray node),
    does ``action``: ``kill`` SIGKILLs itself; ``hang`` blocks until the test takes its node away;
    ``oom`` raises torch's out-of-memory error, as a GPU does for a too large batch."""

    def __init__(self, step: int, marker: str | Path, rank: int = 0,
                 node_labels: Mapping[str, str] | None = None,
                 action: Literal["kill", "hang", "oom"] = "kill"):
        from ray import cloudpickle  # here: importing this module does not import Ray

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        self.step, self.marker, self.rank = step, str(marker), rank
        self.node_labels, self.action = dict(node_labels or {}), action

    def __call__(self, step: int, metrics: dict, checkpointed: bool) -> None:
        if step != self.step:
            return
        import ray
        import ray.train
        import torch

        rank = ray.train.get_context().get_world_rank()
        if self.node_labels:
            labels = ray.get_runtime_context().get_node_labels()
            if any(labels.get(k) not in (v, [v]) for k, v in self.node_labels.items()):
                return
        elif rank != self.rank:
            return
        marker = Path(self.marker)
        if marker.exists():
            return

        node = ray.get_runtime_context().get_node_id()
        marker.write_text(
            f"{self.action} pid {os.getpid()} rank {rank} at step {step} node {node}\n")
        if self.action == "oom":
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 64.00 GiB (injected)")
        while self.action == "hang":
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

"""Logging to an MLflow run that another process opened: rank 0 of a Ray Train run logs to the
driver's run through a :class:`RunTracker`, which pickles without its client."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from egat.tracking.base import Tracker
from egat.tracking.mlflow_tracker import retry_locked, tracking_uri

RESTORED = "ray/restored_step"  # MLflow metric: the step each start of the worker group resumed at
WORLD = "ray/world_size"  # MLflow metric: its number of workers (elastic runs shrink and grow)


class RunTracker(Tracker):
    """Logs to an existing MLflow run by id (picklable: rank 0 of a Ray run logs through it)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._client = None

    def __getstate__(self):
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "_client": None}

    @property
    def client(self):
        if self._client is None:
            import mlflow

            self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        retry_locked(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_attempt(self, placement: Sequence[Mapping[str, Any]], restored_step: int) -> None:
        """One start of the worker group: ``ray/restored_step`` (0 = a fresh start; a restart
        after a lost worker or node shows as a second point) and ``ray/world_size`` at that step,
        the tags ``ray.attempts`` and ``ray.placement`` (rank@node of the latest attempt) and
        ``ray/attempt_<n>.json`` with its world size and every rank's node, so a restart, a
        resize and where each attempt ran stay in the run."""
        history = retry_locked(lambda: self.client.get_metric_history(self.run_id, RESTORED))
        attempt = len(history) + 1
        self.log_metrics({RESTORED: restored_step, WORLD: len(placement)}, restored_step)
        where = " ".join(f"rank{p['rank']}@{p['node_id'][:12]}" for p in placement)
        for key, value in (("ray.attempts", str(attempt)), ("ray.placement", where)):
            retry_locked(lambda: self.client.set_tag(self.run_id, key, value))
        record = {"attempt": attempt, "restored_step": restored_step,
                  "world_size": len(placement), "ranks": list(placement)}
        retry_locked(lambda: self.client.log_text(
            self.run_id, json.dumps(record, indent=1), f"ray/attempt_{attempt}.json"))


def run_tracker_of(tracker: Tracker | None) -> RunTracker | None:
    """A RunTracker logging to ``tracker``'s MLflow run, or None when it has none."""
    run_id = getattr(tracker, "run_id", None)
    if not run_id:
        return None
    return RunTracker(tracking_uri(), run_id)

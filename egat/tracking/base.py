"""The tracker interface the Trainer and the stages log through."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping


class Tracker:
    """Receives metrics and artifacts; the base class drops them (tests, untracked runs)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass


NullTracker = Tracker

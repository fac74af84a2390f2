"""The one Trainer used by the CLI, the DVC stages, Ray workers and Tune trials."""

from egat.train.trainer import Trainer, TrainResult

__all__ = ["Trainer", "TrainResult"]

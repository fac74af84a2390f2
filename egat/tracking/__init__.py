"""Experiment tracking: the Trainer talks to a Tracker; MLflow implements it."""

from egat.tracking.base import NullTracker, Tracker

__all__ = ["NullTracker", "Tracker"]

"""The MLflow side of `egat tune`: a Ray Tune callback, on the search's driver, that keeps one
MLflow run per trial nested under the search's parent run.

Tune pickles its callbacks into the experiment folder and a resumed search (``Tuner.restore``)
gets them back from there (https://docs.ray.io/en/latest/tune/api/doc/ray.tune.Tuner.restore.html),
so the callback holds plain values only; it finds the parent run (the RUNNING one of this
process) and each trial's run (by key) in the store, which a resume carries over. The pickle
names the class by this module's path, which therefore stays put (a search killed before a
change of the code resumes after it).
"""

from __future__ import annotations

import math
import time

from ray.tune import Callback

from egat.tracking.mlflow_tracker import owner_tags, retry_locked
from egat.train.ray_train import REPORT_NAMES

REPORTED = (*REPORT_NAMES.values(), "objective")  # what a trial's MLflow run logs of its reports


def parent_key(search: str) -> str:
    return f"tune/{search}"


def trial_key(search: str, trial_id: str) -> str:
    return f"tune/{search}/{trial_id}"


class MlflowTrialCallback(Callback):
    """One MLflow run per trial (tag ``mlflow.parentRunId``), the trial's sampled values as params
    and its reports as metrics; a resumed trial continues its run. It also frees the placement
    groups of stopped trials (see ``reap_orphan_placement_groups``)."""

    def __init__(self, search: str, steps: int):
        self.search, self.steps = search, steps
        self._reset()

    def _reset(self) -> None:
        self._client = self._experiment_id = self._parent_id = None
        self.runs: dict[str, str] = {}
        self.last_step: dict[str, int] = {}
        self.nodes: dict[str, str] = {}
        self.reaped_at = 0.0

    def __getstate__(self):
        return {"search": self.search, "steps": self.steps}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    @property
    def client(self):
        """The store of this process (MLFLOW_TRACKING_URI or the project's), as the parent's."""
        if self._client is None:
            import mlflow

            from egat.tracking.mlflow_tracker import ensure_experiment, tracking_uri

            self._experiment_id = ensure_experiment()
            self._client = mlflow.MlflowClient(tracking_uri=tracking_uri())
        return self._client

    @property
    def experiment_id(self) -> str:
        self.client  # noqa: B018 (connects)
        return self._experiment_id

    @property
    def parent_id(self) -> str:
        """This process's RUNNING parent run of the search (a resume starts a new one)."""
        if self._parent_id is None:
            owner = owner_tags()
            runs = retry_locked(lambda: self.client.search_runs(
                [self.experiment_id],
                f"tags.egat_key = '{parent_key(self.search)}' and attributes.status = 'RUNNING' "
                f"and tags.egat_host = '{owner['egat_host']}' and tags.egat_pid = '{owner['egat_pid']}'",
            ))
            if not runs:
                raise RuntimeError(f"no RUNNING MLflow parent run of search {self.search}")
            self._parent_id = runs[0].info.run_id
        return self._parent_id

    def on_step_begin(self, iteration, trials, **info):
        # A stopped trial's Train controller dies with it and leaks its workers' placement
        # group when the cluster has no State API: free those every few seconds.
        if time.monotonic() - self.reaped_at > 5.0:
            from egat.train.cluster import reap_orphan_placement_groups

            reap_orphan_placement_groups()
            self.reaped_at = time.monotonic()

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.runs:
            return
        from mlflow.entities import Param, RunTag

        client, key = self.client, trial_key(self.search, trial.trial_id)
        tags = {"mlflow.parentRunId": self.parent_id, "stage": "tune-trial", "egat_key": key,
                "trial_id": trial.trial_id, **owner_tags()}
        found = retry_locked(lambda: client.search_runs([self.experiment_id],
                                                        f"tags.egat_key = '{key}'"))
        if found:  # a trial of a resumed search: its run goes on
            run_id = found[0].info.run_id
            retry_locked(lambda: client.update_run(run_id, status="RUNNING"))
            retry_locked(lambda: client.log_batch(
                run_id, tags=[RunTag(k, v) for k, v in tags.items()]))
        else:
            run_id = retry_locked(lambda: client.create_run(
                self.experiment_id, run_name=f"{self.search}/{trial.trial_id}", tags=tags
            )).info.run_id
            retry_locked(lambda: client.log_batch(run_id, params=[
                Param(k, repr(float(v))) for k, v in trial.config.items()]))
        self.runs[trial.trial_id] = run_id

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        from mlflow.entities import Metric

        step = int(result.get("step", 0))
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(result[k]), now, step) for k in REPORTED
            if isinstance(result.get(k), (int, float)) and math.isfinite(result[k])
        ]
        if metrics:
            retry_locked(lambda: self.client.log_batch(run_id, metrics=metrics))
        self.last_step[trial.trial_id] = step
        node = result.get("node_id")
        if node and self.nodes.get(trial.trial_id) != node:  # where the trial trains
            retry_locked(lambda: self.client.set_tag(run_id, "ray.node", node))
            self.nodes[trial.trial_id] = node

    def _close(self, trial, status):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        if status == "FINISHED" and self.last_step.get(trial.trial_id, 0) < self.steps:
            retry_locked(lambda: self.client.set_tag(run_id, "early_stopped", "true"))
        retry_locked(lambda: self.client.set_terminated(run_id, status=status))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED")

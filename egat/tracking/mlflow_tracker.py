"""MLflow tracking: one named, tagged run per train/evaluate job, logged from rank 0 only.

Default store: ``sqlite:///mlflow.db`` at the project root with artifacts under ``mlartifacts/``
(the file store is deprecated); MLFLOW_TRACKING_URI overrides it (e.g. an MLflow tracking server).
The project root is DVC's: experiments run in a temporary copy (``dvc exp run --temp``, queued
ones) log to the store of the workspace they came from, tagged with their experiment's name.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping

from egat.errors import EgatError
from egat.tracking.base import Tracker
from egat.urls import redact

EXPERIMENT = "egat"
# MLflow 3's experiment kind (values as in its UI: genai_development | custom_model_development):
# without it an experiment may open as a GenAI project (traces overview). MLflow 3.17's UI takes
# the kind from its GenAI / Model training switch instead (README, the MLflow UI link).
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND: "custom_model_development"}


def project_root() -> Path:
    """The folder of the default store. DVC sets DVC_ROOT for every stage it runs, and for a temp or
    queued experiment to the workspace's root, not to the temporary copy it runs (and deletes)
    (https://dvc.org/doc/user-guide/env); outside DVC, the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd())


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before training when an HTTP tracking server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    health = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    try:
        with urllib.request.urlopen(health, timeout=timeout) as resp:
            if resp.status == 200:
                return
            reason = f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise EgatError(
        f"MLflow tracking server {redact(uri)} is unreachable ({reason}); start it "
        "(`mlflow server --host 127.0.0.1 --port 5000`) or unset MLFLOW_TRACKING_URI to log "
        "to the local sqlite store"
    )


def retry_locked(write, attempts: int = 5):
    """Run an MLflow write (and return its result), retrying sqlite's "database is locked" under
    concurrent writers."""
    for attempt in range(attempts):
        try:
            return write()
        except Exception as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dvc_experiment_tags() -> dict[str, str]:
    """The DVC experiment a run belongs to (DVC sets these for `dvc exp run`), to find its MLflow
    runs from `dvc exp show` and back."""
    names = {"dvc_exp": "DVC_EXP_NAME", "dvc_exp_baseline": "DVC_EXP_BASELINE_REV"}
    return {tag: os.environ[var] for tag, var in names.items() if os.environ.get(var)}


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def ensure_experiment(name: str = EXPERIMENT) -> str:
    """Create the experiment if needed (on the driver, before any worker starts) and return its id."""
    import mlflow

    uri = tracking_uri()
    if redact(uri) != uri:
        # MLflow prints "View run ... at: <tracking URI>/#/..." when a run ends, credentials included.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    with _sqlite_setup_lock(uri):
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name(name)  # the first call creates a new store's tables
        if exp is not None:
            if EXPERIMENT_KIND not in exp.tags:  # a store from before the tag (a user's choice stays)
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND,
                                          EXPERIMENT_TAGS[EXPERIMENT_KIND])
            return exp.experiment_id
        location = None
        if uri.startswith("sqlite:"):
            location = (project_root() / "mlartifacts").as_uri()
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)


def _sqlite_setup_lock(uri: str):
    """An inter-process lock around creating an sqlite store and its experiment: MLflow's schema
    migration fails ("table already exists", "database is locked") when processes race to it."""
    from contextlib import nullcontext

    from filelock import FileLock

    if not uri.startswith("sqlite:///"):
        return nullcontext()
    return FileLock(f"{uri.removeprefix('sqlite:///')}.lock", timeout=120)


def owner_tags() -> dict[str, str]:
    """The process that runs a job (host, pid and the pid's start time, as pids are reused)."""
    import psutil

    proc = psutil.Process()
    return {"egat_host": socket.gethostname(), "egat_pid": str(proc.pid),
            "egat_pid_started": repr(proc.create_time())}


def is_orphan(run) -> bool:
    """Whether a RUNNING run's process is gone (killed). A run of another host cannot be checked
    from here, and one key names one job: those count as orphans, as do runs without the tags."""
    import psutil

    tags = run.data.tags
    if tags.get("egat_host") != socket.gethostname() or not tags.get("egat_pid", "").isdigit():
        return True
    try:
        proc = psutil.Process(int(tags["egat_pid"]))
        return (repr(proc.create_time()) != tags.get("egat_pid_started")
                or proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def mark_orphans_killed(client, experiment_id: str, key: str) -> list[str]:
    """Mark KILLED the RUNNING runs of ``key`` (a LIKE pattern when it has a ``%``) whose process
    is gone; their run ids."""
    op = "LIKE" if "%" in key else "="
    running = retry_locked(lambda: client.search_runs(
        [experiment_id], f"tags.egat_key {op} '{key}' and attributes.status = 'RUNNING'"
    ))
    orphans = [run.info.run_id for run in running if is_orphan(run)]
    for run_id in orphans:
        retry_locked(lambda: client.set_terminated(run_id, status="KILLED"))
    return orphans


class MlflowTracker(Tracker):
    """A context manager around one MLflow run.

    ``key`` identifies the job (e.g. ``train/egat/grass/seed0``): a run with the same key left
    RUNNING by a killed process is marked KILLED when the job starts again; one whose process
    still runs (the same cell in a parallel DVC experiment) is left alone.
    """

    def __init__(self, key: str, tags: Mapping[str, str], params: Mapping[str, Any] | None = None,
                 experiment: str = EXPERIMENT):
        self.key, self.tags, self.params, self.experiment = key, dict(tags), params, experiment
        self.run_id: str | None = None

    def __enter__(self) -> "MlflowTracker":
        import mlflow

        exp_id = ensure_experiment(self.experiment)
        client = mlflow.MlflowClient()
        mark_orphans_killed(client, exp_id, self.key)
        tags = {"egat_key": self.key, "git_commit": git_commit(), **owner_tags(),
                **dvc_experiment_tags(), **self.tags}
        run = retry_locked(lambda: mlflow.start_run(experiment_id=exp_id, run_name=self.key, tags=tags))
        self.run_id = run.info.run_id
        if self.params:
            params = {k: str(v)[:6000] for k, v in flatten(self.params).items()}
            retry_locked(lambda: mlflow.log_params(params))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import mlflow

        status = "FINISHED"
        if exc_type is KeyboardInterrupt:
            status = "KILLED"
        elif exc_type is not None:
            status = "FAILED"
        retry_locked(lambda: mlflow.end_run(status=status))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import mlflow

        retry_locked(lambda: mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        retry_locked(lambda: mlflow.log_artifact(str(path), artifact_path=artifact_path))

    def log_inputs(self, inputs) -> None:
        """Log datasets (:func:`egat.tracking.datasets.split_inputs`) as this run's inputs."""
        import mlflow

        retry_locked(lambda: mlflow.log_inputs(
            [i.dataset for i in inputs], [i.context for i in inputs], [i.tags for i in inputs]))

    def log_model(self, model, input_example, name: str = "model") -> None:
        """Log the model (MLflow's default pt2 format traces ``forward`` on ``input_example``).

        The requirements are MLflow's defaults for a torch model (torch, cloudpickle) rather
        than inferred: inference loads the model in a subprocess, 13-19 s a training stage on
        2 cores against 0.5 s (measured side by side), and an exported program needs only torch.
        """
        import mlflow.pytorch

        mlflow.pytorch.log_model(model, name=name, input_example=input_example,
                                 pip_requirements=mlflow.pytorch.get_default_pip_requirements())

"""Tiny seeded models shared by the unit tests."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

from egat import stages
from egat.build import params_from_dict
from egat.config import Params
from egat.models import Classifier

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_TRAIN_V2_ENABLED": "1"}


def tiny_classifier(num_classes: int = 3, channels: int = 4, seed: int = 0, dropout=0.0):
    """conv3x3 -> ReLU -> conv3x3 -> ReLU backbone: (B,3,H,W) -> (B,channels,H/2,W/2)."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, channels, 3, stride=2, padding=1),
        nn.ReLU(),
    )
    return Classifier(backbone, channels, num_classes, dropout=dropout)


def make_batch(n=6, size=8, seed=0, domains=None):
    """A seeded batch dict as the Trainer feeds methods (3 classes, guide = channel mean)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    domain = torch.zeros(n, dtype=torch.long) if domains is None else torch.tensor(domains)
    return {
        "image": x,
        "label": torch.arange(n) % 3,
        "domain": domain,
        "index": torch.arange(n),
        "guide": x.mean(1, keepdim=True),
    }


def params_for(method, **cfg):
    """Params training ``method`` with hyperparameters ``cfg`` and a cheap 3-step PGD."""
    return params_from_dict(
        {"train": {"method": method}, "methods": {method: cfg},
         "attack": {"eps": 0.03, "alpha": 0.01, "steps": 3}}
    )


@contextmanager
def ray_test_env(root: Path) -> Iterator[Path]:
    """Ray/MLflow variables, no RAY_ADDRESS, an sqlite store and cwd in ``root``; torch's thread
    count is restored afterwards (Ray's setup changes it)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in RAY_ENV.items():
            mp.setenv(key, value)
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.chdir(root)
        yield root
    torch.set_num_threads(threads)


def tiny_folder_data(root: Path, size: int = 16, per_class: int = 10) -> dict:
    """A prepared folder dataset (2 domains x 3 classes of seeded noise PNGs, splits and guides)
    under ``root``, built by the real prepare and guides stages; returns the params that use it."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for domain in ("d1", "d2"):
        for cls in ("a", "b", "c"):
            folder = root / "tree" / domain / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, (size, size, 3), np.uint8))
    overrides = {"data": {"name": "folder", "folder_root": str(root / "tree"),
                          "dir": str(root / "data"), "image_size": size}}
    prepared(overrides)
    return overrides


def prepared(raw: dict, data_dir: Path | None = None) -> Params:
    """Params from ``raw`` (with ``data.dir = data_dir`` when given) after the prepare and guides
    stages have built that dataset."""
    if data_dir is not None:
        raw = {**raw, "data": {**raw.get("data", {}), "dir": str(data_dir)}}
    params = params_from_dict(raw)
    stages.prepare(params)
    stages.guides(params)
    return params


def _train_rank(rank: int, world: int, port: int, raw: dict, run_dir: str, stop_at: int) -> None:
    import torch.distributed as dist

    from egat.train.trainer import Trainer

    class Stop(Exception):
        pass

    def stop(step: int, metrics: dict, checkpointed: bool) -> None:
        if step == stop_at:
            raise Stop  # every rank at the same step: a run that died there

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        Trainer(params_from_dict(raw), run_dir, device=torch.device("cpu"), rank=rank,
                world_size=world, on_report=stop).fit()
    except Stop:
        pass
    finally:
        dist.destroy_process_group()


def train_ranks(params: Params, run_dir: Path, world: int = 2, stop_at: int = 0) -> None:
    """The Trainer on ``world`` gloo processes on this machine, without Ray (what each Ray
    worker runs, sharing ``run_dir``); with ``stop_at`` every rank stops at that step, as a run
    that died there. Running it again resumes from ``run_dir/last.pt``."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_train_rank, args=(world, port, params.model_dump(mode="json"), str(run_dir), stop_at),
             nprocs=world, join=True)


def tracked_fit(params: Params, run_dir: Path, backend: str = "ray", **kw):
    """fit() inside an MLflow run, as the DVC train stage does; returns (result, run id)."""
    from egat.tracking.mlflow_tracker import MlflowTracker
    from egat.train.launch import fit

    tracker = MlflowTracker(f"test/{run_dir.name}", {"stage": "test"})
    with tracker:
        result = fit(params, run_dir, tracker, backend=backend, **kw)
    return result, tracker.run_id


def last_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]


def mlflow_metrics(run_id: str) -> dict[str, float]:
    import mlflow

    return mlflow.MlflowClient().get_run(run_id).data.metrics


def wait_for_server(uri: str, seconds: float = 60.0) -> None:
    """Poll ``<uri>/health`` (an mlflow server's) until it answers; fail the test after ``seconds``."""
    import time
    import urllib.request

    for _ in range(int(seconds * 2)):
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1)
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not start within {seconds:g} s")

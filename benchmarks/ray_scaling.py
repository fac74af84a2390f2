"""Ray Train on this machine: training throughput with 1 and 2 workers, and Ray's start-up
overhead per run, side by side with the in-process (local) backend.

Each configuration trains the same run (the embedded benchmark at ``--per-class`` images per class
and domain, ``--method``, global batch ``--batch-size``) for ``--steps`` steps, validating and
checkpointing only at the end. Throughput is samples/s of the training loop as the Trainer times
it (rank 0); the overhead is the run's wall time outside that loop (worker start-up, process
group, checkpoint upload, shutdown). Ray's own start (``ray.init`` of the private cluster) is
reported once. The local run is repeated last: if the two local figures differ much, other
processes competed for the CPUs and the Ray figures are off too (Ray runs its workers at
niceness 15), so run it again on a quiet machine.

    .venv/bin/python benchmarks/ray_scaling.py                      # egat, 30 steps, batch 32
    .venv/bin/python benchmarks/ray_scaling.py --method erm --steps 60 --json /tmp/ray.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

for key, value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_TRAIN_V2_ENABLED": "1"}.items():
    os.environ.setdefault(key, value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="egat")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32, help="the global batch")
    ap.add_argument("--per-class", type=int, default=40, help="embedded images per class/domain")
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="Ray worker counts")
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args()

    from tabulate import tabulate

    from egat import stages
    from egat.build import params_from_dict
    from egat.train import cluster
    from egat.train.launch import fit

    os.environ.pop("RAY_ADDRESS", None)  # the private local cluster: figures for this machine
    root = Path(tempfile.mkdtemp(prefix="egat-ray-bench-"))
    params = params_from_dict({
        "data": {"dir": str(root / "data"), "embedded": {"per_class": args.per_class}},
        "train": {"method": args.method, "steps": args.steps, "batch_size": args.batch_size,
                  "eval_every": args.steps, "checkpoint_every": args.steps, "val_batches": 1,
                  "progress": False, "out_dir": str(root / "runs")},
    })
    stages.prepare(params)
    stages.guides(params)

    rows = []

    def record(name: str, workers: int, result, wall: float) -> None:
        train_s = result.metrics["train_time_s"]
        rows.append({
            "backend": name, "workers": workers,
            "samples_per_s": round(args.batch_size / result.metrics["time_per_step_s"], 1),
            "s_per_step": result.metrics["time_per_step_s"],
            "train_s": train_s, "wall_s": round(wall, 1),
            "overhead_s": round(wall - train_s, 1),
        })
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    started = time.perf_counter()
    result = fit(params, root / "local", backend="local")
    record("local (in process)", 1, result, time.perf_counter() - started)

    started = time.perf_counter()
    cluster.connect()
    ray_init_s = time.perf_counter() - started
    for workers in args.workers:
        raw = params.model_dump(mode="json")
        raw["train"]["workers"] = workers
        started = time.perf_counter()
        result = fit(params_from_dict(raw), root / f"ray{workers}", backend="ray")
        record("ray", workers, result, time.perf_counter() - started)

    # The local baseline again: a large change from the first one means other processes
    # competed for the CPUs meanwhile (Ray's workers run at niceness 15 and suffer most).
    started = time.perf_counter()
    result = fit(params, root / "local-again", backend="local")
    record("local (again)", 1, result, time.perf_counter() - started)

    import torch

    print(f"\n{args.method}, {args.steps} steps, global batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads "
          f"in process; Ray gives each 1-CPU worker 1 thread); ray.init {ray_init_s:.1f} s\n")
    print(tabulate(rows, headers="keys", tablefmt="github"))
    if args.json:
        Path(args.json).write_text(json.dumps({"ray_init_s": round(ray_init_s, 1), "rows": rows,
                                               "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()

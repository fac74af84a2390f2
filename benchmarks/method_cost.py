"""Training-step cost of every registered method relative to ERM, measured side by side.

One full step = method.loss + zero_grad + backward + Adam step, on ``small_resnet`` (10 classes),
random 32 px images, batch 64, params.yaml's defaults (training PGD: 10 steps). Methods run in
round-robin order (one step of each per round) so that drift in machine speed hits all alike;
each method has its own model copy from the same initialisation. Prints the median wall time and
the median CPU time of this process per step (the CPU time is less sensitive to other processes
competing for the cores) and both ratios to ERM.

    .venv/bin/python benchmarks/method_cost.py                  # every method, 10 rounds, 2 threads
    .venv/bin/python benchmarks/method_cost.py --methods erm pgd_at ign --rounds 5 --domains 2
    .venv/bin/python benchmarks/method_cost.py --methods ign --set methods.ign.m=5
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from egat.config import load_params
from egat.methods import build_method, method_registry
from egat.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    ap.add_argument("--rounds", type=int, default=10, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--domains", type=int, default=1, help="domains in the batch (dmada, irm)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="params override, e.g. methods.ign.m=5 (repeatable)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params = load_params(args.params, args.overrides)
    names = args.methods or method_registry.names()
    if "erm" not in names:
        names = ["erm", *names]
    base = build_model("small_resnet", 10).train()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g)
    batch = {
        "image": x,
        "label": torch.randint(0, 10, (args.batch,), generator=g),
        "domain": torch.arange(args.batch) % args.domains,
        "index": torch.arange(args.batch),
        "guide": x.mean(1, keepdim=True),
    }
    runs = {}
    for name in names:
        model = copy.deepcopy(base)
        runs[name] = (model, build_method(model, params, name), torch.optim.Adam(model.parameters()))

    def step(name: str) -> tuple[float, float]:
        model, method, optimizer = runs[name]
        wall, cpu = time.perf_counter(), time.process_time()
        out = method.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        return time.perf_counter() - wall, time.process_time() - cpu

    for _ in range(args.warmup):
        for name in names:
            step(name)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            times[name].append(step(name))

    def median(name: str, k: int) -> float:
        return statistics.median(t[k] for t in times[name])

    erm_wall, erm_cpu = median("erm", 0), median("erm", 1)
    rows = []
    print(f"{args.batch} x {args.size}px, {args.threads} threads, {args.domains} domain(s), "
          f"medians of {args.rounds} steps, torch {torch.__version__}")
    print(f"{'method':<12} {'wall ms':>9} {'x ERM':>7} {'cpu ms':>9} {'x ERM':>7}")
    for name in names:
        wall, cpu = median(name, 0), median(name, 1)
        rows.append({
            "method": name, "wall_ms": wall * 1e3, "wall_ratio": wall / erm_wall,
            "cpu_ms": cpu * 1e3, "cpu_ratio": cpu / erm_cpu,
            "wall_times_ms": [t[0] * 1e3 for t in times[name]],
            "cpu_times_ms": [t[1] * 1e3 for t in times[name]],
        })
        print(f"{name:<12} {wall * 1e3:9.1f} {wall / erm_wall:7.2f} {cpu * 1e3:9.1f} "
              f"{cpu / erm_cpu:7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()

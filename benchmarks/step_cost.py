"""Training-step cost of every registered method relative to ERM, measured side by side,
and our Grad-CAM against captum's LayerGradCam on the same batch.

One full step = method.loss + zero_grad + backward + Adam step, on ``small_resnet`` (10 classes),
random 32 px images, batch 64, params.yaml's defaults (training PGD: 10 steps). Methods run in
round-robin order (one step of each per round) so that drift in machine speed hits all alike;
each method has its own model copy from the same initialisation. Prints the median wall time and
the median CPU time of this process per step (the CPU time is less sensitive to other processes
competing for the cores) and both ratios to ERM.

Target (issue 2): EGAT / PGD-AT <= 1.2 at the same PGD.

    .venv/bin/python benchmarks/step_cost.py --methods erm pgd_at egat   # the issue's three
    .venv/bin/python benchmarks/step_cost.py                  # every method, 10 rounds, 2 threads
    .venv/bin/python benchmarks/step_cost.py --methods ign --set methods.ign.m=5
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from egat.config import load_params
from egat.explain import normalise_maps
from egat.explain.gradcam import GradCAM
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
    base = build_model("small_resnet", 10, channels_last=params.model.channels_last).train()
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
    ratios = {}
    if {"egat", "pgd_at"} <= set(names):
        ratios["egat/pgd_at"] = median("egat", 0) / median("pgd_at", 0)
        ratios["egat/erm"] = median("egat", 0) / erm_wall
        held = "met" if ratios["egat/pgd_at"] <= 1.2 else "NOT met"
        print(f"EGAT / PGD-AT = {ratios['egat/pgd_at']:.2f} (target <= 1.2: {held}); "
              f"EGAT / ERM = {ratios['egat/erm']:.2f}")
    explain = gradcam_vs_captum(base.eval(), x, batch["label"], args.rounds)
    print(f"Grad-CAM, batch {args.batch}: ours {explain['ours_ms']:.2f} ms, captum LayerGradCam "
          f"{explain['captum_ms']:.2f} ms ({explain['speedup']:.1f}x), max |diff| "
          f"{explain['max_abs_diff']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows, "ratios": ratios, "gradcam": explain},
                      f, indent=2)


def gradcam_vs_captum(model, x, y, rounds: int) -> dict[str, float]:
    """Our batched closed-form Grad-CAM vs captum's LayerGradCam on the same layer and batch."""
    from captum.attr import LayerGradCam

    ours, theirs = GradCAM(model), LayerGradCam(model, model.backbone)

    def run_captum():
        return normalise_maps(theirs.attribute(x, target=y, relu_attributions=True)[:, 0])

    times: dict[str, list[float]] = {"ours": [], "captum": []}
    for _ in range(rounds + 1):  # the first round warms up
        for name, fn in (("ours", lambda: ours.attribute(x, y)), ("captum", run_captum)):
            start = time.perf_counter()
            maps = fn()
            times[name].append(time.perf_counter() - start)
            if name == "ours":
                ours_maps = maps
            else:
                captum_maps = maps.detach()
    ours_s, captum_s = statistics.median(times["ours"][1:]), statistics.median(times["captum"][1:])
    return {"ours_ms": ours_s * 1e3, "captum_ms": captum_s * 1e3, "speedup": captum_s / ours_s,
            "max_abs_diff": float((ours_maps - captum_maps).abs().max())}


if __name__ == "__main__":
    main()

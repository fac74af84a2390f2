"""Comp/Suff throughput: images per second through :func:`erasure_scores` for each k bin on its
own and for all bins together (each image costs 2 erased forward passes per k)."""

from __future__ import annotations

import torch

from benchmarks.timing import Row, round_robin
from egat.explain.gradcam import GradCAM
from egat.metrics.faithfulness import erasure_scores


def throughput_rows(model, x: torch.Tensor, ks: list[float], baseline: str, repeats: int,
                    warmup: int) -> list[Row]:
    with torch.no_grad():
        target = model(x).argmax(1)
    maps = GradCAM(model).attribute(x, target)
    bins = {f"k={k:g}%": [k] for k in ks}
    bins[f"all k {ks}"] = list(ks)
    timings = round_robin({name: (lambda b=b: erasure_scores(model, x, maps, target, b, baseline))
                           for name, b in bins.items()}, repeats, warmup)
    med = {name: timings.median(name) for name in bins}
    return [Row("comp/suff", name, len(x) / med[name], "img/s", note=f"{baseline} baseline, "
                f"batch {len(x)}, {med[name] * 1e3:.1f} ms") for name in bins]

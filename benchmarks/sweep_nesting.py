"""The attack sweep nested over eps (``eval.sweep.nested: true``) against each eps on its own.

For every trained run under ``--runs`` (``<method>/<domain>/seed<k>/best.pt``, variants included)
the sweep runs both ways on the same images and seeds, in round-robin order (wall clock, one
round = one call of each): the seconds of each, their ratio with its range over the rounds, and
how many of the sweep's cells lie lower and higher nested, by how much at most. With the same
random starts a nested cell could only lie lower (an example found within a smaller eps is one
within every larger eps); the random starts differ, though, because the nested attacks draw them
for fewer images, so a cell can also lie higher by that sampling noise.

    python -m benchmarks.sweep_nesting --runs runs --repeats 1 --out docs/results/sweep_nesting.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from benchmarks.timing import round_robin, use_clock
from egat import io
from egat.data import read_splits
from egat.evaluation import attack_sweep, attack_sweep_loader
from egat.run.checkpoint import model_from_checkpoint, training_domains
from egat.run.layout import BEST


def compare(checkpoint: Path, repeats: int) -> dict:
    """One run's sweep both ways: seconds, ratio (nested / eps by eps) and the cells' gap."""
    model, params, ckpt = model_from_checkpoint(checkpoint)
    domains = training_domains(params, ckpt["domains"])
    loader = attack_sweep_loader(params, read_splits(params.data.splits_file), domains)
    sweeps = {}

    def way(nested: bool):
        cell = params.model_copy(deep=True)
        cell.eval.sweep.nested = nested

        def run():
            sweeps[nested] = attack_sweep(model, cell, loader, torch.device("cpu"))
        return run

    timings = round_robin({"by_eps": way(False), "nested": way(True)}, repeats, warmup=0)
    ratio = timings.ratio("nested", "by_eps")
    gaps = [sweeps[True][a][e] - sweeps[False][a][e] for a in sweeps[True] for e in sweeps[True][a]]
    return {"run": str(checkpoint.parent), "by_eps_s": timings.median("by_eps"),
            "nested_s": timings.median("nested"), "ratio": str(ratio), "cells": len(gaps),
            "lower": sum(g < 0 for g in gaps), "higher": sum(g > 0 for g in gaps),
            "most_below": max(0.0, -min(gaps)), "most_above": max(0.0, max(gaps))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--repeats", type=int, default=1, help="rounds per run (>= 1)")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats}: must be >= 1")
    checkpoints = sorted(args.runs.rglob(BEST))
    if not checkpoints:
        parser.error(f"--runs {str(args.runs)!r}: no {BEST} below it; train the study first")
    use_clock("wall")
    table = pd.DataFrame([compare(c, args.repeats) for c in checkpoints])
    total = table[["by_eps_s", "nested_s"]].sum()
    text = (table.to_markdown(index=False, floatfmt=".2f")
            + f"\n\nAll runs: eps by eps {total['by_eps_s']:.1f} s, nested {total['nested_s']:.1f} s "
            f"({total['nested_s'] / total['by_eps_s']:.2f}x); of {int(table['cells'].sum())} cells "
            f"{int(table['lower'].sum())} lower nested (by at most {table['most_below'].max():.1f} "
            f"points) and {int(table['higher'].sum())} higher (by at most "
            f"{table['most_above'].max():.1f}).\n")
    print(text)
    if args.out:
        io.write_text(args.out, text)


if __name__ == "__main__":
    main()

"""Comp/Suff audit: is a method's comprehensiveness low because of the metric, the baseline or the
model? For trained runs, Comp/Suff under the black, blur and mean-colour erasure baselines, beside
accuracy with the object erased and with the cue erased (the cue-free renders), on the in-domain
test split.

    python -m benchmarks.comp_audit --runs runs --methods erm egat --seeds 0 1 2 --out docs/comp_audit.md

The erasure code is checked against hand-computed values and an independent per-pixel loop in
tests/test_metrics.py; this script only applies it to real models.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from egat import io
from egat.run.layout import BEST, VARIANTS, cell_dir

BASELINES = ("black", "blur", "mean")


def audit_run(checkpoint: Path, domain: str) -> dict[str, float]:
    from egat.build import params_from_dict
    from egat.config import apply_overrides
    from egat.data import read_splits
    from egat.data.splits import cue_free_root
    from egat.evaluation import _loader, costly_ids, evaluate_domain
    from egat.run.checkpoint import model_from_checkpoint

    model, params, _ = model_from_checkpoint(checkpoint)
    splits = read_splits(params.data.splits_file)
    row: dict[str, float] = {}
    for baseline in BASELINES:
        cell = params_from_dict(apply_overrides(params.model_dump(mode="json"),
                                                [f"eval.faithfulness.baseline={baseline}"]))
        loader = _loader(cell, splits, [domain], cell.eval.max_examples)
        free = (_loader(cell, splits, [domain], cell.eval.max_examples, "cue_free")
                if cue_free_root(cell.data.root, splits) is not None else None)
        m = evaluate_domain(model, cell, loader, "cpu", free, costly_ids(loader, cell))
        row.update({f"comp_{baseline}": m["comp"], f"suff_{baseline}": m["suff"],
                    f"object_erased_cacc_{baseline}": m["object_erased_cacc"]})
        row.update(cacc=m["cacc"], cue_free_cacc=m.get("cue_free_cacc", float("nan")))
    row["confidence"] = mean_confidence(model, loader)
    return row


def mean_confidence(model, loader) -> float:
    """Mean probability (%) of the predicted class: the most an absolute Comp can remove."""
    import torch

    model.eval()
    with torch.no_grad():
        top = [torch.softmax(model(batch["image"]), 1).amax(1) for batch in loader]
    return 100.0 * torch.cat(top).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--methods", nargs="+", default=["erm", "pgd_at", "egat"])
    ap.add_argument("--variants", nargs="*", default=["oracle"])
    ap.add_argument("--domain", default="grass")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default="reports/comp_audit.md")
    args = ap.parse_args()
    rows = []
    names = [(m, Path(args.runs)) for m in args.methods] + [
        (v, Path(args.runs) / VARIANTS) for v in args.variants]
    for name, root in names:
        for seed in args.seeds:
            ckpt = cell_dir(root, name, args.domain, seed) / BEST
            if ckpt.is_file():
                rows.append({"method": name, "seed": seed, **audit_run(ckpt, args.domain)})
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows).groupby("method", sort=False).agg(["mean", "std"]).drop(columns="seed")
    table.columns = [f"{m} ({s})" for m, s in table.columns]
    text = ("# Comp/Suff audit (in-domain test split of " + args.domain + ")\n\n"
            "Mean and std over seeds " + ", ".join(map(str, args.seeds)) + ". comp_/suff_<baseline>: "
            "what erased pixels become; object_erased_cacc: cAcc with the object's pixels erased; "
            "cue_free_cacc: cAcc with the cue erased (the cue-free renders); confidence: mean "
            "probability (%) of the predicted class, the most an absolute Comp can remove.\n\n"
            + table.round(2).to_markdown() + "\n")
    io.write_text(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main()

"""Model-selection audit: which checkpoint each `train.select` rule would pick, per training run.

Reads every finished training run of an MLflow store (the validation history the Trainer logs at
each `train.eval_every` step: `val/acc` and, on data with cue-free renders, `val/cue_free_acc`)
and prints, per run, the step `val` (best validation accuracy), `cue_free_val` (best cue-free
validation accuracy) and `last` choose, and whether they agree. Ties go to the earlier step, as
in the Trainer. No test domain is read.

    python -m benchmarks.selection_audit --tracking-uri sqlite:///mlflow.db --out docs/results/selection.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from egat import io

RULES = {"val": "val/acc", "cue_free_val": "val/cue_free_acc"}


def best_step(history: list[tuple[int, float]]) -> int | None:
    """The step of the highest value; the earlier step on a tie (a later one must be better)."""
    if not history:
        return None
    return max(sorted(history), key=lambda sv: (sv[1], -sv[0]))[0]


def picks(client, run) -> dict:
    row = {"run": run.data.tags.get("egat_key", run.info.run_id)}
    steps: set[int] = set()
    for rule, metric in RULES.items():
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric)]
        steps |= {s for s, _ in history}
        row[rule] = best_step(history)
    row["last"] = max(steps) if steps else None
    row["agree"] = len({row[r] for r in (*RULES, "last") if row[r] is not None}) == 1
    return row


def audit(tracking_uri: str) -> pd.DataFrame:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    rows = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], "tags.stage = 'train'"):
            if run.info.status == "FINISHED":
                rows.append(picks(client, run))
    return pd.DataFrame(rows).sort_values("run").reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    table = audit(args.tracking_uri)
    text = (table.to_markdown(index=False) + f"\n\n{int(table['agree'].sum())} of {len(table)} "
            "runs: all rules pick the same step.\n")
    print(text)
    if args.out:
        io.write_text(args.out, text)


if __name__ == "__main__":
    main()

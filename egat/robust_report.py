"""The robustness report: every run's robust.json -> reports/robustness.md/.csv (the gradient-
masking checklist per method, mean ± std over seeds) and Table I's AA column with its flags.

Reads ``<evals>/<method>/<domain>/seed<seed>/robust.json`` (egat.robustness.robust_run's).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from egat import io
from egat.metrics.catalog import PERCENT
from egat.stats import Stats, astuple_shallow, binomial_variance, over_seeds
from egat.run.layout import ROBUST_FILE, cell_files

KEYS = ["method", "train_domain"]
CHECKS = {  # egat.robustness.robust_metrics's checks
    "a": "accuracy falls with eps to <= max_final_acc",
    "b": "stronger PGD (more steps, restarts) no better for the model",
    "c": "black-box Square accuracy >= white-box APGD-CE accuracy",
    "d": "transfer attack weaker than white-box",
    "e": "loss rises along the gradient sign",
}


def load_robust(evals_dir: str | Path) -> pd.DataFrame:
    """One row per run: accuracies (%), the checks' numbers and ``pass_<check>`` flags."""
    rows = []
    for cell in cell_files(evals_dir, ROBUST_FILE):
        r = json.loads(cell.path.read_text())
        c = r["checks"]
        row = {"method": r["method"], "train_domain": r["train_domain"], "seed": r["seed"],
               "n": r["n"], "clean": r["clean"], "aa": r["aa"], "pgd": c["b"]["pgd"],
               "strong_pgd": c["b"]["strong_pgd"], "apgd_max_eps": c["a"]["accuracy"][-1],
               "square": c["c"]["square"], "apgd": c["c"]["apgd"],
               "rising": 100.0 * c["e"]["rising_fraction"]}
        if "d" in c:
            row["transfer"] = c["d"]["transfer"]
        row.update({f"pass_{k}": bool(v["passed"]) for k, v in c.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _order(df: pd.DataFrame, methods_order: list[str] | None) -> list[str]:
    present = list(dict.fromkeys(df["method"]))
    first = [m for m in dict.fromkeys(methods_order or []) if m in present]
    return first + sorted(set(present) - set(first))


def _verdict(flags: pd.Series) -> str:
    """"pass" where every seed passes, else "FAIL" and on how many seeds."""
    flags = flags.dropna().astype(bool)
    if flags.empty:
        return "-"
    return "pass" if flags.all() else f"FAIL ({int((~flags).sum())}/{len(flags)} seeds)"


def _cell(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.1f}" + (f" ± {std:.1f}" if pd.notna(std) else "")


NUMBERS = {  # column -> (label, check)
    "clean": ("clean", None), "pgd": ("PGD-10", None), "aa": ("AA", None),
    "apgd_max_eps": ("(a) APGD-CE at max eps", "a"),
    "strong_pgd": ("(b) strong PGD", "b"),
    "square": ("(c) Square", "c"), "apgd": ("(c) APGD-CE", "c"),
    "transfer": ("(d) transfer PGD-10", "d"),
    "rising": ("(e) loss rises (% images)", "e"),
}


def robust_tables(df: pd.DataFrame, methods_order: list[str] | None = None
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(markdown cells, CSV numbers): rows (method, train domain); numbers mean ± std over seeds
    and each check's verdict over seeds."""
    grouped = df.groupby(KEYS, sort=False)
    mean, std = grouped.mean(numeric_only=True), grouped.std(ddof=1, numeric_only=True)
    index = [(m, t) for m in _order(df, methods_order)
             for t in dict.fromkeys(df["train_domain"]) if (m, t) in mean.index]
    cells = pd.DataFrame(index=pd.MultiIndex.from_tuples(index, names=KEYS))
    numbers = cells.copy()
    numbers["seeds"] = grouped.size().reindex(index).values
    cells["seeds"] = numbers["seeds"]
    cells["n"] = mean["n"].reindex(index).astype(int).values
    numbers["n"] = cells["n"]
    for column, (label, _) in NUMBERS.items():
        if column not in mean.columns:
            continue
        m, s = mean[column].reindex(index), std[column].reindex(index)
        cells[label] = [_cell(a, b) for a, b in zip(m, s)]
        numbers[label] = m.round(4).values
        numbers[label + " std"] = s.round(4).values
    for check, text in CHECKS.items():
        flag = f"pass_{check}"
        if flag in df.columns:
            verdict = grouped[flag].apply(_verdict).reindex(index)
            cells[f"({check})"] = verdict.values
            numbers[f"({check}) {text}"] = verdict.values
    return cells, numbers


def failed_checks(df: pd.DataFrame) -> dict[str, str]:
    """Per method the checks it fails on some seed ("a, c"); methods passing all are left out."""
    flags = {}
    for method, runs in df.groupby("method"):
        failed = [k for k in CHECKS if f"pass_{k}" in runs and not runs[f"pass_{k}"].dropna().all()]
        if failed:
            flags[method] = ", ".join(failed)
    return flags


def build_robust_report(evals_dir: str | Path, out_dir: str | Path,
                        methods_order: list[str] | None = None) -> list[Path]:
    """reports/robustness.md and .csv; none when no run has a robust.json."""
    df = load_robust(evals_dir)
    if df.empty:
        return []
    cells, numbers = robust_tables(df, methods_order)
    legend = "; ".join(f"({k}) {v}" for k, v in CHECKS.items())
    text = (
        "# Robust evaluation: AutoAttack and the gradient-masking checklist\n\n"
        f"Accuracy (%) on a stratified, seeded subset of the in-domain test split (n images per "
        f"run), mean ± std over seeds; a check's verdict is `pass` when it passes on every seed. "
        f"AA: the AutoAttack ensemble (per image the worst case over its attacks); PGD-10: "
        f"`eval.attack`. Checks: {legend}. Transfer source: `robust.transfer_from` "
        f"(for that method itself `robust.transfer_fallback`).\n\n"
        + cells.reset_index().to_markdown(index=False, disable_numparse=True) + "\n"
    )
    out = Path(out_dir)
    io.write_text(out / "robustness.md", text)
    io.write_text(out / "robustness.csv", numbers.reset_index().to_csv(index=False))
    return [out / "robustness.md", out / "robustness.csv"]


def add_aa_column(evals_dir: str | Path, table1: Stats) -> tuple[Stats, str]:
    """Table I (columns (train domain, metric)) with an "aa" column after each training domain's
    metrics (mean, std and 95 % CI over seeds and the robust subset's images), rows of methods
    failing a check marked "⚠ (checks)", and the caption's sentence about both; the table as it
    was where no run has a robust.json."""
    df = load_robust(evals_dir)
    if df.empty:
        return table1, ""
    df = df.assign(aa_var=binomial_variance(df["aa"], df["n"]))
    aa = over_seeds(df.set_index(["method", "train_domain", "seed"])[["aa", "aa_var"]],
                    ["method", "train_domain"], {"aa": PERCENT}).map(
        lambda s: s["aa"].unstack("train_domain"))
    columns = [c for t in dict.fromkeys(table1.mean.columns.get_level_values(0))
               for c in [*[c for c in table1.mean.columns if c[0] == t], (t, "aa")]]

    def joined(table: pd.DataFrame, extra: pd.DataFrame) -> pd.DataFrame:
        extra = extra.copy()
        extra.columns = pd.MultiIndex.from_product([extra.columns, ["aa"]])
        out = pd.concat([table, extra.reindex(table.index)], axis=1).reindex(columns=columns)
        flags = failed_checks(df)
        return out.rename(index={m: f"{m} ⚠ ({flags[m]})" for m in out.index if m in flags})

    table1 = Stats(*map(joined, astuple_shallow(table1), astuple_shallow(aa)))
    return table1, (
        "AA: accuracy under AutoAttack (`robust.attack`) on a stratified subset of the test split "
        "(reports/robustness.md); ⚠ (checks): the gradient-masking checks the method fails there.")

"""The report stage: every run's eval.json -> the paper's tables, figures, DVC metrics and plot data.

Runs are read from ``<runs>/<method>/<domain>/seed<seed>/eval.json`` (the evaluate stage writes
``evals/...``; the structure is egat.evaluation.evaluate_model's).
Numbers are means over seeds, with the sample std over seeds where there are several. Aggregates
over training domains (explanations table, bar chart, metrics.json) first average each seed's
training domains, so their std still measures seed-to-seed spread.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from egat import io
from egat.errors import EgatError
from egat.robust_report import add_aa_column, build_robust_report

DIGITS = 2  # shown in the markdown tables; Table II ranks values at this precision (paper ties)
CSV_DIGITS = 4
RUN_KEYS = ["method", "train_domain", "seed"]
METRICS = ["cacc", "aacc", "comp", "suff", "spearman", "top_intersection", "pointing_game",
           "mass_in_mask"]
TABLE1_METRICS = {"cacc": "cAcc", "aacc": "aAcc", "comp": "Comp", "suff": "Suff", "aa": "AA"}
EXPLANATION_METRICS = {"spearman": "Spearman", "top_intersection": "top-k overlap",
                       "pointing_game": "pointing game", "mass_in_mask": "mass in mask"}
BAR_METRICS = {"id_cacc": "in-domain cAcc", "id_aacc": "in-domain aAcc",
               "ood_cacc": "OOD cAcc", "ood_aacc": "OOD aAcc"}
ATTACK_NAMES = {"fgsm": "FGSM", "mifgsm": "MI-FGSM", "pgd": "PGD", "apgd": "APGD-CE"}
GROUPS = {"id": True, "ood": False}  # metric prefix -> in_domain flag


@dataclass(frozen=True)
class RunFile:
    path: Path
    method: str
    seed: int


@dataclass(frozen=True)
class Results:
    """Long tables of every run: one row per (run, test domain) and per (run, attack, eps)."""

    domains: pd.DataFrame
    sweep: pd.DataFrame
    methods: list[str]
    domain_order: list[str]
    train_order: list[str]


@dataclass(frozen=True)
class OodTable:
    """Table II: rows = methods, columns = (train, test) pairs."""

    mean: pd.DataFrame
    std: pd.DataFrame
    rank: pd.DataFrame
    mean_rank: pd.Series
    rank_variance: pd.Series


# --- reading runs -------------------------------------------------------------------------------

def find_eval_files(runs_dir: str | Path) -> list[RunFile]:
    """Every ``<method>/<domain>/seed<seed>/eval.json`` under ``runs_dir``, in path order."""
    files = []
    for path in sorted(Path(runs_dir).glob("*/*/seed*/eval.json")):
        match = re.fullmatch(r"seed(\d+)", path.parent.name)
        if match:
            files.append(RunFile(path, method=path.parents[2].name, seed=int(match[1])))
    return files


def eval_rows(run: RunFile) -> tuple[list[dict], list[dict]]:
    """One eval.json as rows of per-domain metrics and of sweep accuracies."""
    ev = json.loads(run.path.read_text())
    key = {"method": run.method, "train_domain": "+".join(ev["train_domains"]), "seed": run.seed}
    domains = [
        {**key, "test_domain": name, "in_domain": bool(m["in_domain"]),
         **{k: float(m[k]) for k in METRICS if m.get(k) is not None}}
        for name, m in ev["domains"].items()
    ]
    sweep = [
        {**key, "attack": attack, "eps": float(eps), "accuracy": float(acc)}
        for attack, by_eps in ev.get("sweep", {}).items()
        for eps, acc in by_eps.items()
    ]
    return domains, sweep


def ordered_methods(present: list[str], preferred: list[str] | None) -> list[str]:
    """``preferred`` first (those that have runs), then any other method alphabetically."""
    first = [m for m in dict.fromkeys(preferred or []) if m in present]
    return first + sorted(set(present) - set(first))


def ordered_train_domains(labels: list[str], domain_order: list[str]) -> list[str]:
    """Training domains in the dataset's domain order ("a+b" labels after their first domain)."""
    def position(label: str) -> list[int]:
        return [domain_order.index(d) if d in domain_order else len(domain_order)
                for d in label.split("+")]
    return sorted(set(labels), key=lambda label: (position(label), label))


def load_runs(runs: list[RunFile], methods_order: list[str] | None = None) -> Results:
    if not runs:
        raise EgatError("no eval.json found (expected <runs>/<method>/<domain>/seed<seed>/eval.json)")
    domain_rows, sweep_rows = [], []
    for run in runs:
        d, s = eval_rows(run)
        domain_rows += d
        sweep_rows += s
    domains = pd.DataFrame(domain_rows)
    sweep = pd.DataFrame(sweep_rows, columns=[*RUN_KEYS, "attack", "eps", "accuracy"])
    domain_order = list(dict.fromkeys(domains["test_domain"]))  # eval.json keeps dataset order
    return Results(
        domains=domains,
        sweep=sweep,
        methods=ordered_methods(list(domains["method"].unique()), methods_order),
        domain_order=domain_order,
        train_order=ordered_train_domains(list(domains["train_domain"]), domain_order),
    )


# --- aggregation --------------------------------------------------------------------------------

def metric_columns(df: pd.DataFrame, wanted) -> list[str]:
    """The metrics of ``wanted`` that at least one run reports (masks exist on some datasets)."""
    return [m for m in wanted if m in df.columns and df[m].notna().any()]


def per_run_means(domains: pd.DataFrame, in_domain: bool) -> pd.DataFrame:
    """Each run's metrics averaged over its in-domain (or OOD) test domains; index RUN_KEYS."""
    chosen = domains[domains["in_domain"] == in_domain]
    return chosen.groupby(RUN_KEYS)[metric_columns(domains, METRICS)].mean()


def per_seed_means(domains: pd.DataFrame) -> pd.DataFrame:
    """id_*/ood_* metrics of each (method, seed), averaged over its training domains."""
    parts = []
    for prefix, in_domain in GROUPS.items():
        runs = per_run_means(domains, in_domain)
        parts.append(runs.groupby(["method", "seed"]).mean().add_prefix(f"{prefix}_"))
    return pd.concat(parts, axis=1)


def over_seeds(per_seed: pd.DataFrame, by: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(mean, std) over the seed level; std is NaN where a group has one seed."""
    grouped = per_seed.groupby(level=by)
    return grouped.mean(), grouped.std(ddof=1)


def in_domain_table(results: Results) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table I as (mean, std): rows = methods, columns = (training domain, metric)."""
    metrics = metric_columns(results.domains, TABLE1_METRICS)
    runs = per_run_means(results.domains, in_domain=True)[metrics]
    mean, std = over_seeds(runs, ["method", "train_domain"])
    columns = pd.MultiIndex.from_product([results.train_order, metrics])
    return tuple(
        stat.unstack("train_domain").swaplevel(axis=1).reindex(index=results.methods, columns=columns)
        for stat in (mean, std)
    )


def descending_min_ranks(values: pd.DataFrame) -> pd.DataFrame:
    """Rank 1 = highest in each column; values equal as shown (DIGITS decimals) share the min rank."""
    shown = values.map(lambda v: float(f"{v:.{DIGITS}f}"))
    return shown.rank(ascending=False, method="min")


def ood_table(results: Results) -> OodTable:
    """Table II: OOD cAcc per (train, test) pair, each method's rank per pair, mean/var of ranks."""
    ood = results.domains[~results.domains["in_domain"]]
    runs = ood.set_index([*RUN_KEYS, "test_domain"])["cacc"]
    mean, std = over_seeds(runs.to_frame(), ["method", "train_domain", "test_domain"])
    present = set(zip(ood["train_domain"], ood["test_domain"]))
    pairs = [(t, d) for t in results.train_order for d in results.domain_order if (t, d) in present]
    columns = pd.MultiIndex.from_tuples(pairs, names=["train_domain", "test_domain"])
    mean, std = (
        s["cacc"].unstack(["train_domain", "test_domain"]).reindex(index=results.methods, columns=columns)
        for s in (mean, std)
    )
    rank = descending_min_ranks(mean)
    # Population variance, as the paper's 0.81 / 2.81.
    return OodTable(mean, std, rank, rank.mean(axis=1), rank.var(axis=1, ddof=0))


def explanation_table(results: Results) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stability under attack and golden-mask alignment per method: (mean, std) over seeds."""
    per_seed = per_seed_means(results.domains)
    columns = [f"{prefix}_{m}" for m in metric_columns(results.domains, EXPLANATION_METRICS)
               for prefix in GROUPS if f"{prefix}_{m}" in per_seed.columns]
    mean, std = over_seeds(per_seed[columns], ["method"])
    return mean.reindex(results.methods), std.reindex(results.methods)


def summary_metrics(results: Results, ood: OodTable) -> dict[str, dict[str, float]]:
    """{method: {id_cacc, id_aacc, ood_cacc, ..., ood_mean_rank, ood_rank_variance}}, NaN-free."""
    mean, _ = over_seeds(per_seed_means(results.domains), ["method"])
    mean = mean.reindex(results.methods)
    mean["ood_mean_rank"] = ood.mean_rank
    mean["ood_rank_variance"] = ood.rank_variance
    # NaN is not JSON; a metric a method lacks is left out rather than written as null.
    return {
        method: {k: round(float(v), CSV_DIGITS) for k, v in row.items() if pd.notna(v)}
        for method, row in mean.iterrows()
    }


def sweep_stats(results: Results) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Accuracy under each sweep attack: (mean, std) over seeds, index (method, train, attack, eps)."""
    runs = results.sweep.set_index([*RUN_KEYS, "attack", "eps"])["accuracy"].to_frame()
    mean, std = over_seeds(runs, ["method", "train_domain", "attack", "eps"])
    return mean["accuracy"], std["accuracy"]


def sweep_plot_data(results: Results) -> pd.DataFrame:
    """Long data for DVC's plot of the sweep: method, attack, eps, accuracy, train_domain."""
    mean, _ = sweep_stats(results)
    data = mean.reset_index()
    data["attack"] = data["attack"].map(lambda a: ATTACK_NAMES.get(a, a))
    return data[["method", "attack", "eps", "accuracy", "train_domain"]].round(CSV_DIGITS)


# --- formatting ---------------------------------------------------------------------------------

def format_cell(mean: float, std: float = float("nan"), rank: float = float("nan")) -> str:
    """"54.40", "54.40 ± 1.20" where seeds vary, "54.40 [1]" with a rank; "-" where missing."""
    if pd.isna(mean):
        return "-"
    text = f"{mean:.{DIGITS}f}"
    if pd.notna(std):
        text += f" ± {std:.{DIGITS}f}"
    if pd.notna(rank):
        text += f" [{int(rank)}]"
    return text


def metric_label(metric: str) -> str:
    prefix, _, name = metric.partition("_")
    group = {"id": "ID", "ood": "OOD"}[prefix]
    return f"{group} {EXPLANATION_METRICS.get(name) or TABLE1_METRICS.get(name, name)}"


def table1_label(column: tuple[str, str]) -> str:
    return f"{column[0]} {TABLE1_METRICS[column[1]]}"


def pair_label(pair: tuple[str, str]) -> str:
    return f"{pair[0]} -> {pair[1]}"


def cell_table(label, mean: pd.DataFrame, std: pd.DataFrame, rank: pd.DataFrame | None = None):
    """Markdown cells: one formatted column per column of ``mean``, named ``label(column)``."""
    rank = rank if rank is not None else pd.DataFrame(index=mean.index, columns=mean.columns)
    return pd.DataFrame(
        {label(c): [format_cell(*v) for v in zip(mean[c], std[c], rank[c])] for c in mean.columns},
        index=mean.index,
    )


def number_table(label, stats: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """CSV columns ``label(column) + suffix`` for each column and each {suffix: table} stat."""
    first = next(iter(stats.values()))
    return pd.DataFrame(
        {label(c) + suffix: stat[c] for c in first.columns for suffix, stat in stats.items()},
        index=first.index,
    )


def in_domain_outputs(mean: pd.DataFrame, std: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(markdown cells, CSV numbers) of Table I."""
    return (cell_table(table1_label, mean, std),
            number_table(table1_label, {"": mean, " std": std}))


def ood_outputs(table: OodTable) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(markdown cells, CSV numbers) of Table II."""
    cells = cell_table(pair_label, table.mean, table.std, table.rank)
    cells["mean rank"] = table.mean_rank.map(format_cell)
    cells["rank variance"] = table.rank_variance.map(format_cell)
    numbers = number_table(pair_label, {"": table.mean, " std": table.std, " rank": table.rank})
    numbers["mean rank"] = table.mean_rank
    numbers["rank variance"] = table.rank_variance
    return cells, numbers


def explanation_outputs(mean: pd.DataFrame, std: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(markdown cells, CSV numbers) of the explanations table."""
    return (cell_table(metric_label, mean, std),
            number_table(metric_label, {"": mean, " std": std}))


def markdown_table(title: str, caption: str, cells: pd.DataFrame) -> str:
    body = cells.rename_axis("method").reset_index().to_markdown(index=False, disable_numparse=True)
    return f"# {title}\n\n{caption}\n\n{body}\n"


def csv_text(numbers: pd.DataFrame) -> str:
    return numbers.rename_axis("method").round(CSV_DIGITS).to_csv()


def seeds_caption(results: Results) -> str:
    seeds = results.domains.groupby(RUN_KEYS[:2])["seed"].nunique()
    if seeds.max() == 1:
        return "One seed per run."
    count = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}"
    return f"Mean ± sample std over seeds ({count} per method and training domain)."


# --- figures ------------------------------------------------------------------------------------

def new_figure(width: float, height: float):
    """A Figure on the Agg canvas: no pyplot, so no GUI backend and no global figure state."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_png(fig, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def method_colors(methods: list[str]) -> dict[str, str]:
    """The same color for a method in every panel and figure."""
    return {m: f"C{i % 10}" for i, m in enumerate(methods)}


def plot_attack_sweep(results: Results, path: Path) -> None:
    """Accuracy vs eps, one panel per (training domain, attack), one line per method (paper Fig. 2)."""
    mean, std = sweep_stats(results)
    attacks = list(dict.fromkeys(results.sweep["attack"]))
    trains = [t for t in results.train_order if t in set(results.sweep["train_domain"])]
    colors = method_colors(results.methods)
    rows, cols = max(len(trains), 1), max(len(attacks), 1)
    fig = new_figure(4.2 * cols, 3.4 * rows + 0.8)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    legend = {}
    for row, train in enumerate(trains):
        for col, attack in enumerate(attacks):
            ax = axes[row][col]
            for method in results.methods:
                key = (method, train, attack)
                if key not in mean.index:
                    continue
                m, s = mean.loc[key], std.loc[key]
                (legend[method],) = ax.plot(m.index, m.values, marker="o", color=colors[method])
                ax.fill_between(m.index, m - s, m + s, color=colors[method], alpha=0.15)
            ax.set_title(f"{ATTACK_NAMES.get(attack, attack)}, trained on {train}")
            ax.set_xticks(sorted(results.sweep["eps"].unique()))
            ax.set_xlabel("ε (L∞ budget, pixels in [0, 1])")
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("accuracy under attack (%)")
    if legend:
        ordered = [m for m in results.methods if m in legend]
        fig.legend([legend[m] for m in ordered], ordered, loc="outside lower center",
                   ncols=len(ordered), title="method (band: ± std over seeds)")
    fig.suptitle("Accuracy vs attack budget ε, on the test split of the training domains")
    save_png(fig, path)


def plot_accuracy_bars(results: Results, path: Path) -> None:
    """In-domain vs OOD cAcc/aAcc per method, mean ± std over seeds."""
    mean, std = over_seeds(per_seed_means(results.domains), ["method"])
    metrics = [m for m in BAR_METRICS if m in mean.columns]
    fig = new_figure(max(6.0, 1.6 * len(results.methods) + 2.5), 4.6)
    ax = fig.subplots()
    width = 0.8 / max(len(metrics), 1)
    positions = range(len(results.methods))
    for i, metric in enumerate(metrics):
        values = mean[metric].reindex(results.methods)
        errors = std[metric].reindex(results.methods).fillna(0.0)
        offsets = [p + (i - (len(metrics) - 1) / 2) * width for p in positions]
        adversarial = metric.endswith("aacc")
        # One color per test group (in-domain / OOD); aAcc bars hatched and lighter.
        ax.bar(offsets, values, width, yerr=errors, capsize=3, label=BAR_METRICS[metric],
               color="C0" if metric.startswith("id_") else "C2", alpha=0.55 if adversarial else 1.0,
               hatch="//" if adversarial else None, edgecolor="white")
    ax.set_xticks(list(positions), results.methods)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Clean (cAcc) and adversarial (aAcc) accuracy, in-domain vs OOD")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=len(metrics) or 1)
    save_png(fig, path)


# --- the stage ----------------------------------------------------------------------------------

def build_report(
    runs_dir: str | Path, out_dir: str | Path, methods_order: list[str] | None = None
) -> list[Path]:
    """Read every eval.json under ``runs_dir`` and write the report to ``out_dir``; returns paths."""
    results = load_runs(find_eval_files(runs_dir), methods_order)
    out = Path(out_dir)
    caption = seeds_caption(results)
    written: list[Path] = []

    def write(name: str, text: str) -> None:
        io.write_text(out / name, text)
        written.append(out / name)

    mean, std, aa_caption = add_aa_column(runs_dir, *in_domain_table(results))
    cells, numbers = in_domain_outputs(mean, std)
    write("table1_in_domain.md", markdown_table(
        "Table I: in-domain results",
        f"Trained and tested on the same domain (test split). {caption} "
        "cAcc/aAcc: clean/adversarial accuracy (%); Comp higher is better, Suff lower is better. "
        + aa_caption, cells))
    write("table1_in_domain.csv", csv_text(numbers))

    ood = ood_table(results)
    cells, numbers = ood_outputs(ood)
    write("table2_ood.md", markdown_table(
        "Table II: out-of-distribution cAcc",
        f"Columns: train -> test domain; [rank] among methods per column (1 = best, ties share "
        f"the best rank, compared at {DIGITS} decimals); mean and population variance of each "
        f"method's ranks. {caption}",
        cells))
    write("table2_ood.csv", csv_text(numbers))

    cells, numbers = explanation_outputs(*explanation_table(results))
    write("explanations.md", markdown_table(
        "Explanation stability and golden-mask alignment",
        "Spearman and top-k overlap compare the explanation of a clean image with that of its "
        "adversarial version (higher = more stable); pointing game and mass in mask measure "
        f"alignment with the object masks where the dataset has them. {caption}",
        cells))
    write("explanations.csv", csv_text(numbers))

    written += build_robust_report(runs_dir, out, methods_order)
    write("metrics.json", json.dumps(summary_metrics(results, ood), indent=2, sort_keys=True) + "\n")
    write("plots/attack_sweep.csv", sweep_plot_data(results).to_csv(index=False))

    for name, plot in (("attack_sweep.png", plot_attack_sweep),
                       ("accuracy_bars.png", plot_accuracy_bars)):
        plot(results, out / name)
        written.append(out / name)
    return written

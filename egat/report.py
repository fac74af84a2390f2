"""The report stage: every run's eval.json -> the paper's tables, figures, DVC metrics and plot data.

Runs are read from ``<runs>/<method>/<domain>/seed<seed>/eval.json`` (the evaluate stage writes
``evals/...``; the structure is egat.evaluation.evaluate_model's), and the reference rows (the
oracle ceiling) from ``<runs>/variants/<name>/...``.
Numbers are means over seeds, with the sample std over seeds where there are several, and a 95 %
confidence interval that counts both sources of error (docs/protocol.md): seeds (Student t over
the seed means) and test images (the binomial, or per-image, standard error on the test set, which
every seed shares), added in quadrature. Ranks treat methods whose intervals overlap as tied.
Aggregates over training domains (explanations table, bar chart, metrics.json) first average each
seed's training domains, so their std still measures seed-to-seed spread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from egat import io
from egat.errors import EgatError
from egat.metrics.catalog import (
    BOUNDS, METRIC_NAMES, METRICS, PERCENT, PERCENT_METRICS, TITLES, image_count,
)
from egat.robust_report import add_aa_column, build_robust_report
from egat.stats import Stats, binomial_variance, interval_ranks, over_seeds
from egat.run.layout import EVAL_FILE, VARIANTS, cell_files

DIGITS = 2  # shown in the markdown tables
CSV_DIGITS = 4
RUN_KEYS = ["method", "train_domain", "seed"]
# Each table's columns, in order; every metric's title is egat/metrics/catalog.py's, and "aa"
# (robust.json's AutoAttack accuracy, egat/robust_report.py) is Table I's last column.
TABLE1_METRICS = ("cacc", "aacc", "comp", "suff", "aa")
EXPLANATION_METRICS = ("spearman", "top_intersection", "pointing_game", "mass_in_mask")
# The paired table's columns: the accuracies, then the shortcut's evidence (the cue-free renders,
# how often the prediction follows the cue, whether the map points at the object); a metric the
# runs lack (no cue or masks on this dataset) is left out.
PAIRED_METRICS = ("ood_cacc", "id_cacc", "id_aacc", "ood_cue_free_cacc", "id_cue_follow",
                  "id_pointing_game")
LOWER_IS_BETTER = frozenset({"cue_follow"})  # of the paired metrics: "> 0" is behind, not ahead
CUE_METRICS = ("cacc_cue_match", "cacc_cue_mismatch", "cue_follow", "cue_free_cacc",
               "object_erased_cacc")
COLUMN_TITLES = {**TITLES, "aa": "AA"}
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


# --- reading runs -------------------------------------------------------------------------------

def find_eval_files(runs_dir: str | Path) -> list[RunFile]:
    """Every ``<method>/<domain>/seed<seed>/eval.json`` under ``runs_dir``, in path order."""
    return [RunFile(f.path, method=f.name, seed=f.seed) for f in cell_files(runs_dir, EVAL_FILE)]


def eval_rows(run: RunFile) -> tuple[list[dict], list[dict]]:
    """One eval.json as rows of per-domain metrics and of sweep accuracies."""
    ev = json.loads(run.path.read_text())
    key = {"method": run.method, "train_domain": "+".join(ev["train_domains"]), "seed": run.seed}
    domains = [
        {**key, "test_domain": name, "in_domain": bool(m["in_domain"]),
         **{k: float(m[k]) for k in METRIC_NAMES if m.get(k) is not None},
         **test_variances(m)}
        for name, m in ev["domains"].items()
    ]
    n_sweep = ev.get("sweep_n")
    sweep = [
        {**key, "attack": attack, "eps": float(eps), "accuracy": float(acc),
         "accuracy_var": binomial_variance(float(acc), n_sweep) if n_sweep else np.nan}
        for attack, by_eps in ev.get("sweep", {}).items()
        for eps, acc in by_eps.items()
    ]
    return domains, sweep


def test_variances(m: dict) -> dict[str, float]:
    """``<metric>_var``: the squared standard error (in the metric's units) of one run's metric
    from the finite test set (its ``error`` in egat/metrics/catalog.py): p (100 - p) / N for
    percentages of images, sd^2 / N for Comp/Suff, N the images it is a mean over."""
    if not m.get("n"):
        return {}
    out = {}
    for metric in METRICS:
        k, count = metric.name, image_count(metric, m)
        if metric.error is None or m.get(k) is None or not count:
            continue
        if metric.error == "binomial":
            out[f"{k}_var"] = binomial_variance(float(m[k]), count)
        elif m.get(f"{k}_sd") is not None:
            out[f"{k}_var"] = float(m[f"{k}_sd"]) ** 2 / count
    return out


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
        raise EgatError(
            f"no {EVAL_FILE} found (expected <runs>/<method>/<domain>/seed<seed>/{EVAL_FILE})")
    domain_rows, sweep_rows = [], []
    for run in runs:
        d, s = eval_rows(run)
        domain_rows += d
        sweep_rows += s
    domains = pd.DataFrame(domain_rows)
    sweep = pd.DataFrame(sweep_rows, columns=[*RUN_KEYS, "attack", "eps", "accuracy", "accuracy_var"])
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


def var_columns(df: pd.DataFrame, metrics: list[str]) -> list[str]:
    return [f"{m}_var" for m in metrics if f"{m}_var" in df.columns]


def bounds_of(columns) -> dict[str, tuple[float, float]]:
    """The range of each metric column (``id_``/``ood_`` prefixed or not) that the catalog knows."""
    bare = {c: c.removeprefix("id_").removeprefix("ood_") for c in columns}
    return {c: BOUNDS[name] for c, name in bare.items() if name in BOUNDS}


def per_run_means(domains: pd.DataFrame, in_domain: bool) -> pd.DataFrame:
    """Each run's metrics averaged over its in-domain (or OOD) test domains; index RUN_KEYS.
    ``<metric>_var`` columns (test-set error, see :func:`test_variances`) combine as the variance
    of that mean over independent test domains."""
    chosen = domains[domains["in_domain"] == in_domain]
    metrics = metric_columns(domains, METRIC_NAMES)
    grouped = chosen.groupby(RUN_KEYS)
    means = grouped[metrics].mean()
    variances = var_columns(chosen, metrics)
    if variances:
        means = means.join(grouped[variances].mean().div(grouped.size(), axis=0))
    return means


def per_seed_means(domains: pd.DataFrame) -> pd.DataFrame:
    """id_*/ood_* metrics of each (method, seed), averaged over its training domains."""
    parts = []
    for prefix, in_domain in GROUPS.items():
        runs = per_run_means(domains, in_domain)
        grouped = runs.groupby(["method", "seed"])
        means = grouped.mean()
        # Training domains have their own test sets: the variance of their mean shrinks with them.
        var = [c for c in means.columns if c.endswith("_var")]
        means[var] = means[var].div(grouped.size(), axis=0)
        parts.append(means.add_prefix(f"{prefix}_"))
    return pd.concat(parts, axis=1)


def in_domain_table(results: Results) -> Stats:
    """Table I: rows = methods, columns = (training domain, metric)."""
    metrics = metric_columns(results.domains, TABLE1_METRICS)
    runs = per_run_means(results.domains, in_domain=True)
    runs = runs[metrics + var_columns(runs, metrics)]
    columns = pd.MultiIndex.from_product([results.train_order, metrics])
    return over_seeds(runs, ["method", "train_domain"], bounds_of(metrics)).map(
        lambda stat: stat.unstack("train_domain").swaplevel(axis=1).reindex(
            index=results.methods, columns=columns))


@dataclass(frozen=True)
class OodTable:
    """Table II: rows = methods, columns = (train, test) pairs, and the OOD mean per training domain."""

    stats: Stats
    rank: pd.DataFrame
    mean_rank: pd.Series
    rank_variance: pd.Series
    ood_mean: Stats  # columns = training domains: cAcc averaged over that domain's test domains

    @property
    def mean(self) -> pd.DataFrame:
        return self.stats.mean

    @property
    def std(self) -> pd.DataFrame:
        return self.stats.std


def ood_table(results: Results) -> OodTable:
    """Table II: OOD cAcc per (train, test) pair, each method's rank per pair (overlapping
    intervals tie), mean/var of ranks, and the OOD mean per training domain."""
    ood = results.domains[~results.domains["in_domain"]]
    runs = ood.set_index([*RUN_KEYS, "test_domain"])[["cacc", "cacc_var"]]
    stats = over_seeds(runs, ["method", "train_domain", "test_domain"], bounds_of(["cacc"]))
    present = set(zip(ood["train_domain"], ood["test_domain"]))
    pairs = [(t, d) for t in results.train_order for d in results.domain_order if (t, d) in present]
    columns = pd.MultiIndex.from_tuples(pairs, names=["train_domain", "test_domain"])
    stats = stats.map(lambda stat: stat["cacc"].unstack(["train_domain", "test_domain"]).reindex(
        index=results.methods, columns=columns))
    rank = interval_ranks(stats)
    per_run = per_run_means(results.domains, in_domain=False)[["cacc", "cacc_var"]]
    trains = [t for t in results.train_order if t in set(ood["train_domain"])]
    mean_stats = over_seeds(per_run, ["method", "train_domain"], bounds_of(["cacc"])).map(
        lambda stat: stat["cacc"].unstack("train_domain").reindex(index=results.methods, columns=trains))
    # Population variance, as the paper's 0.81 / 2.81.
    return OodTable(stats, rank, rank.mean(axis=1), rank.var(axis=1, ddof=0), mean_stats)


def paired_differences(per_seed: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Every other method's rows minus ``baseline``'s row with the same remaining index levels
    (training domain, seed): paired differences, index kept; rows the baseline lacks dropped."""
    others = per_seed.drop(index=baseline, level="method")
    base = per_seed.xs(baseline, level="method").reindex(others.index.droplevel("method"))
    diff = pd.DataFrame(others.to_numpy() - base.to_numpy(), index=others.index,
                        columns=others.columns)
    return diff.dropna(how="all")


@dataclass(frozen=True)
class PairedTable:
    """Each method minus the baseline, paired by (training domain, seed): Stats over the seeds'
    differences (t interval over seeds only) and, per cell, on how many seeds it is > 0."""

    baseline: str
    stats: Stats
    positive: pd.DataFrame
    seeds: pd.DataFrame


def paired_table(results: Results, baseline: str, metrics=PAIRED_METRICS) -> PairedTable:
    """Rows = the methods other than ``baseline``; columns = (training domain, id_/ood_ metric)
    (the OOD one is each run's mean over its test domains). The test images are the same for
    both sides of a difference, so only the seeds' spread enters the interval (docs/protocol.md)."""
    runs = pd.concat([per_run_means(results.domains, flag).add_prefix(f"{prefix}_")
                      for prefix, flag in GROUPS.items()], axis=1)
    wanted = metric_columns(runs, metrics)
    methods = [m for m in results.methods if m != baseline]
    columns = pd.MultiIndex.from_product([results.train_order, wanted])

    def shaped(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.unstack("train_domain").swaplevel(axis=1).reindex(index=methods, columns=columns)

    # Without the baseline every cell is empty (NaN), as a metric a method lacks.
    diff = (paired_differences(runs[wanted], baseline) if baseline in results.methods
            else runs[wanted].iloc[:0])
    by = ["method", "train_domain"]
    return PairedTable(baseline, over_seeds(diff, by).map(shaped),
                       shaped((diff > 0).groupby(level=by).sum()),
                       shaped(diff.groupby(level=by).count()))


def floor_method(results: Results, references: list[str]) -> str | None:
    """The floor row: the first method that is not a reference (the study's first, ERM)."""
    return next((m for m in results.methods if m not in references), None)


def explanation_table(results: Results) -> Stats:
    """Stability under attack and golden-mask alignment per method over seeds."""
    return group_table(results, EXPLANATION_METRICS)


def cue_table(results: Results) -> Stats:
    """How far each method follows the spurious cue: accuracy where the cue matches / misleads,
    the cue-follow rate, accuracy on the cue-free renders and with the object erased; ID and OOD."""
    return group_table(results, CUE_METRICS)


def group_table(results: Results, wanted: tuple[str, ...]) -> Stats:
    """id_*/ood_* columns of the ``wanted`` metrics per method, over seeds."""
    per_seed = per_seed_means(results.domains)
    columns = [f"{prefix}_{m}" for m in metric_columns(results.domains, wanted)
               for prefix in GROUPS if f"{prefix}_{m}" in per_seed.columns]
    stats = over_seeds(per_seed[columns + var_columns(per_seed, columns)], ["method"],
                       bounds_of(columns))
    return stats.map(lambda stat: stat[columns].reindex(results.methods))


def summary_metrics(results: Results, ood: OodTable,
                    floor: str | None = None) -> dict[str, dict[str, float]]:
    """{method: {id_cacc, id_aacc, ood_cacc, ..., ood_mean_rank, ood_rank_variance}}, NaN-free;
    every metric also as ``<metric>_ci`` (the 95 % interval's half-width); with a ``floor``, each
    other method's ``ood_cacc_minus_<floor>`` (paired by seed) and its ``_ci``."""
    per_seed = per_seed_means(results.domains)
    stats = over_seeds(per_seed, ["method"], bounds_of(per_seed.columns))
    mean = stats.mean.reindex(results.methods)
    half = stats.half.reindex(results.methods).add_suffix("_ci")
    mean = mean.join(half)
    mean["ood_mean_rank"] = ood.mean_rank
    mean["ood_rank_variance"] = ood.rank_variance
    if floor in results.methods and len(results.methods) > 1:
        gain = over_seeds(paired_differences(per_seed[["ood_cacc"]], floor), ["method"])
        key = f"ood_cacc_minus_{floor}"
        mean[key] = gain.mean["ood_cacc"]
        mean[f"{key}_ci"] = gain.half["ood_cacc"]
    # NaN is not JSON; a metric a method lacks is left out rather than written as null.
    return {
        method: {k: round(float(v), CSV_DIGITS) for k, v in sorted(row.items()) if pd.notna(v)}
        for method, row in mean.iterrows()
    }


def sweep_stats(results: Results) -> Stats:
    """Accuracy under each sweep attack over seeds, index (method, train, attack, eps)."""
    runs = results.sweep.set_index([*RUN_KEYS, "attack", "eps"])[["accuracy", "accuracy_var"]]
    return over_seeds(runs, ["method", "train_domain", "attack", "eps"],
                      {"accuracy": PERCENT}).map(
        lambda s: s["accuracy"])


def sweep_plot_data(results: Results) -> pd.DataFrame:
    """Long data for DVC's plot of the sweep: method, attack, eps, accuracy, train_domain."""
    data = sweep_stats(results).mean.reset_index()
    data["attack"] = data["attack"].map(lambda a: ATTACK_NAMES.get(a, a))
    return data[["method", "attack", "eps", "accuracy", "train_domain"]].round(CSV_DIGITS)


# --- formatting ---------------------------------------------------------------------------------

def format_cell(mean: float, std: float = float("nan"), low: float = float("nan"),
                high: float = float("nan"), rank: float = float("nan")) -> str:  # fmt: skip
    """"54.40", "54.40 ± 1.20" where seeds vary, "(50.1, 58.7)" its 95 % interval (shown where
    it has a width), "[1]" its rank; "-" where missing."""
    if pd.isna(mean):
        return "-"
    text = f"{mean:.{DIGITS}f}"
    if pd.notna(std):
        text += f" ± {std:.{DIGITS}f}"
    if pd.notna(low) and pd.notna(high) and high > low:
        text += f" ({low:.{DIGITS}f}, {high:.{DIGITS}f})"
    if pd.notna(rank):
        text += f" [{int(rank)}]"
    return text


def metric_label(metric: str) -> str:
    prefix, _, name = metric.partition("_")
    group = {"id": "ID", "ood": "OOD"}[prefix]
    return f"{group} {COLUMN_TITLES.get(name, name)}"


def table1_label(column: tuple[str, str]) -> str:
    return f"{column[0]} {COLUMN_TITLES[column[1]]}"


def pair_label(pair: tuple[str, str]) -> str:
    return f"{pair[0]} -> {pair[1]}"


def cell_table(label, stats: Stats, rank: pd.DataFrame | None = None):
    """Markdown cells: one formatted column per column of ``stats``, named ``label(column)``."""
    mean, std, low, high = stats.mean, stats.std, stats.low, stats.high
    rank = rank if rank is not None else pd.DataFrame(index=mean.index, columns=mean.columns)
    return pd.DataFrame(
        {label(c): [format_cell(*v) for v in zip(mean[c], std[c], low[c], high[c], rank[c])]
         for c in mean.columns},
        index=mean.index,
    )


def number_table(label, stats: Stats, rank: pd.DataFrame | None = None) -> pd.DataFrame:
    """CSV columns per column of ``stats``: ``label(column)``, `` std``, `` ci_low``,
    `` ci_high`` (and `` rank``)."""
    parts = {"": stats.mean, " std": stats.std, " ci_low": stats.low, " ci_high": stats.high}
    if rank is not None:
        parts[" rank"] = rank
    return pd.DataFrame(
        {label(c) + suffix: stat[c] for c in stats.mean.columns for suffix, stat in parts.items()},
        index=stats.mean.index,
    )


def in_domain_outputs(stats: Stats) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(markdown cells, CSV numbers) of Table I."""
    return cell_table(table1_label, stats), number_table(table1_label, stats)


def ood_outputs(table: OodTable) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(markdown cells, CSV numbers) of Table II, with each training domain's OOD mean."""
    cells = cell_table(pair_label, table.stats, table.rank)
    numbers = number_table(pair_label, table.stats, table.rank)
    label = lambda train: f"{train} OOD mean"  # noqa: E731
    cells = cells.join(cell_table(label, table.ood_mean))
    numbers = numbers.join(number_table(label, table.ood_mean))
    cells["mean rank"] = table.mean_rank.map(format_cell)
    cells["rank variance"] = table.rank_variance.map(format_cell)
    numbers["mean rank"] = table.mean_rank
    numbers["rank variance"] = table.rank_variance
    return cells, numbers


def paired_label(column: tuple[str, str]) -> str:
    return f"{column[0]} {metric_label(column[1])}"


def paired_outputs(table: PairedTable) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(markdown cells, CSV numbers) of a paired table: each cell also says on how many seeds the
    difference is > 0 ("3/3 > 0")."""
    cells = cell_table(paired_label, table.stats)
    numbers = number_table(paired_label, table.stats)
    for column in table.stats.mean.columns:
        label, positive, seeds = paired_label(column), table.positive[column], table.seeds[column]
        counts = [f", {int(p)}/{int(n)} > 0" if pd.notna(n) and n > 0 else ""
                  for p, n in zip(positive, seeds)]
        cells[label] = cells[label] + counts
        numbers[f"{label} seeds_positive"] = positive
        numbers[f"{label} seeds"] = seeds
    return cells, numbers


def paired_caption(table: PairedTable) -> str:
    names = sorted({m.partition("_")[2] for m in table.stats.mean.columns.get_level_values(1)})
    lower = [COLUMN_TITLES[m] for m in names if m in LOWER_IS_BETTER]
    fractions = [COLUMN_TITLES[m] for m in names if m not in PERCENT_METRICS]
    return (f"Each row minus {table.baseline}, paired: the same training domain, seed and test "
            "images. Mean ± sample std of the per-seed differences (points); (low, high): their "
            "95 % Student t interval over the seeds only (both sides are scored on the same test "
            "images, so most of the test set's error is common to both and cancels; one seed: no "
            "interval; docs/protocol.md); k/n > 0: "
            f"on k of the n seeds the row is ahead of {table.baseline}"
            + (f", except for the {' and '.join(lower)}, where > 0 is behind (lower is better)"
               if lower else "")
            + ". OOD: each run's mean over its out-of-domain test domains."
            + (f" {', '.join(fractions).capitalize()}: a fraction, not points." if fractions else ""))


def group_outputs(stats: Stats) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(markdown cells, CSV numbers) of a per-method table of id_*/ood_* metrics."""
    return cell_table(metric_label, stats), number_table(metric_label, stats)


def markdown_table(title: str, caption: str, cells: pd.DataFrame) -> str:
    body = cells.rename_axis("method").reset_index().to_markdown(index=False, disable_numparse=True)
    return f"# {title}\n\n{caption}\n\n{body}\n"


def csv_text(numbers: pd.DataFrame) -> str:
    return numbers.rename_axis("method").round(CSV_DIGITS).to_csv()


def seeds_caption(results: Results) -> str:
    seeds = results.domains.groupby(RUN_KEYS[:2])["seed"].nunique()
    ci = ("(low, high): 95 % confidence interval over seeds and test images (docs/protocol.md).")
    if seeds.max() == 1:
        return f"One seed per run; {ci}"
    count = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}"
    return f"Mean ± sample std over seeds ({count} per method and training domain); {ci}"


def reference_caption(results: Results, references: list[str], ood: OodTable) -> str:
    """The ceiling row(s) and the room between the first study method (the floor, ERM) and them."""
    refs = [r for r in references if r in results.methods]
    if not refs:
        return ""
    floor = floor_method(results, refs)
    text = f"Ceiling row: {', '.join(refs)} (trained on the cue-free renders, same budget)."
    if floor is not None and not ood.ood_mean.mean.empty:
        gaps = (ood.ood_mean.mean.loc[refs[0]] - ood.ood_mean.mean.loc[floor]).round(DIGITS)
        text += (f" OOD mean gap {refs[0]} - {floor} (the floor): "
                 + ", ".join(f"{t}: {g:+.{DIGITS}f} points" for t, g in gaps.items()) + ".")
    return text


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
    stats = sweep_stats(results)
    mean, low, high = stats.mean, stats.low, stats.high
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
                m = mean.loc[key]
                (legend[method],) = ax.plot(m.index, m.values, marker="o", color=colors[method])
                ax.fill_between(m.index, low.loc[key], high.loc[key], color=colors[method],
                                alpha=0.15)
            ax.set_title(f"{ATTACK_NAMES.get(attack, attack)}, trained on {train}")
            ax.set_xticks(sorted(results.sweep["eps"].unique()))
            ax.set_xlabel("ε (L∞ budget, pixels in [0, 1])")
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("accuracy under attack (%)")
    if legend:
        ordered = [m for m in results.methods if m in legend]
        fig.legend([legend[m] for m in ordered], ordered, loc="outside lower center",
                   ncols=len(ordered), title="method (band: 95 % CI over seeds and images)")
    fig.suptitle("Accuracy vs attack budget ε, on the test split of the training domains")
    save_png(fig, path)


def plot_accuracy_bars(results: Results, path: Path) -> None:
    """In-domain vs OOD cAcc/aAcc per method, mean with its 95 % CI as error bars."""
    per_seed = per_seed_means(results.domains)
    stats = over_seeds(per_seed, ["method"], bounds_of(per_seed.columns))
    mean = stats.mean
    metrics = [m for m in BAR_METRICS if m in mean.columns]
    fig = new_figure(max(6.0, 1.6 * len(results.methods) + 2.5), 4.6)
    ax = fig.subplots()
    width = 0.8 / max(len(metrics), 1)
    positions = range(len(results.methods))
    for i, metric in enumerate(metrics):
        values = mean[metric].reindex(results.methods)
        # The interval's two sides: asymmetric where a percentage's is clipped at 0 or 100.
        errors = [(values - stats.low[metric].reindex(results.methods)).fillna(0.0),
                  (stats.high[metric].reindex(results.methods) - values).fillna(0.0)]
        offsets = [p + (i - (len(metrics) - 1) / 2) * width for p in positions]
        adversarial = metric.endswith("aacc")
        # One color per test group (in-domain / OOD); aAcc bars hatched and lighter.
        ax.bar(offsets, values, width, yerr=errors, capsize=3, label=BAR_METRICS[metric],
               color="C0" if metric.startswith("id_") else "C2", alpha=0.55 if adversarial else 1.0,
               hatch="//" if adversarial else None, edgecolor="white")
    ax.set_xticks(list(positions), results.methods)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Clean (cAcc) and adversarial (aAcc) accuracy, in-domain vs OOD (95 % CI)")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=len(metrics) or 1)
    save_png(fig, path)


# --- the stage ----------------------------------------------------------------------------------

def find_run_files(runs_dir: str | Path, references: list[str] = ()) -> list[RunFile]:
    """The study methods' eval files and those of the named reference variants."""
    refs = [f for f in find_eval_files(Path(runs_dir) / VARIANTS) if f.method in set(references)]
    return find_eval_files(runs_dir) + refs


def build_report(
    runs_dir: str | Path, out_dir: str | Path, methods_order: list[str] | None = None,
    references: list[str] = (),
) -> list[Path]:
    """Read every eval.json under ``runs_dir`` (and of the ``references`` variants) and write the
    report to ``out_dir``; returns paths."""
    references = list(references)
    results = load_runs(find_run_files(runs_dir, references), list(methods_order or []) + references)
    out = Path(out_dir)
    caption = seeds_caption(results)
    written: list[Path] = []

    def write(name: str, text: str) -> None:
        io.write_text(out / name, text)
        written.append(out / name)

    ood = ood_table(results)
    reference = reference_caption(results, references, ood)
    floor = floor_method(results, references)
    table1, aa_caption = add_aa_column(runs_dir, in_domain_table(results))
    cells, numbers = in_domain_outputs(table1)
    write("table1_in_domain.md", markdown_table(
        "Table I: in-domain results",
        f"Trained and tested on the same domain (test split). {caption} "
        "cAcc/aAcc: clean/adversarial accuracy (%); Comp higher is better, Suff lower is better. "
        f"{reference} " + aa_caption, cells))
    write("table1_in_domain.csv", csv_text(numbers))

    cells, numbers = ood_outputs(ood)
    write("table2_ood.md", markdown_table(
        "Table II: out-of-distribution cAcc",
        "Columns: train -> test domain; [rank] among methods per column (1 = best; a method "
        "ranks below another only when their 95 % intervals do not overlap, otherwise they tie); "
        f"each training domain's OOD mean; mean and population variance of each method's ranks. "
        f"{caption} {reference}", cells))
    write("table2_ood.csv", csv_text(numbers))

    paired = paired_table(results, floor)
    cells, numbers = paired_outputs(paired)
    write("paired.md", markdown_table(
        f"Paired by seed: each method minus {floor} (the floor)", paired_caption(paired), cells))
    write("paired.csv", csv_text(numbers))

    cue = cue_table(results)
    cells, numbers = group_outputs(cue)
    write("cue.md", markdown_table(
        "The spurious cue: does a method follow it?",
        "cAcc where the cue shows the class's own colour / another class's; cue-follow rate: of "
        "the images whose cue points to another class, the share predicted as that class (0 = "
        "ignores the cue); cue-free cAcc: the same test images rendered without the cue; object "
        "erased: cAcc with the object's pixels replaced by the erasure baseline (a model that "
        f"still answers correctly reads something other than the object). {caption}"
        + ("" if not cue.mean.columns.empty else
           " This dataset records no cue per image (only the embedded benchmark does)."),
        cells))
    write("cue.csv", csv_text(numbers))

    cells, numbers = group_outputs(explanation_table(results))
    write("explanations.md", markdown_table(
        "Explanation stability and golden-mask alignment",
        "Spearman and top-k overlap compare the explanation of a clean image with that of its "
        "adversarial version (higher = more stable); pointing game and mass in mask measure "
        f"alignment with the object masks where the dataset has them. {caption}",
        cells))
    write("explanations.csv", csv_text(numbers))

    written += build_robust_report(runs_dir, out, methods_order)
    write("metrics.json", json.dumps(summary_metrics(results, ood, floor), indent=2, sort_keys=True) + "\n")
    write("plots/attack_sweep.csv", sweep_plot_data(results).to_csv(index=False))

    for name, plot in (("attack_sweep.png", plot_attack_sweep),
                       ("accuracy_bars.png", plot_accuracy_bars)):
        plot(results, out / name)
        written.append(out / name)
    return written

"""The paper's studies (sections V-G..V-J) from the pipeline's runs: sensitivity (Table III),
ablation (Table IV), runtime vs robustness with its Pareto front (Fig. 3), case study (Fig. 4).

Rows are named runs: a study method (``runs/<method>/...``, ``evals/<method>/...``) or a variant
of ``studies.variants`` (a method + params overrides; ``runs/variants/<name>/...``,
``evals/variants/<name>/...``, trained by the DVC variant stages). Tables reuse the report's
Table I/II code on the chosen rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from egat.build import params_from_dict
from egat.config import Params, all_variants, apply_overrides
from egat.errors import EgatError
from egat.run.layout import BEST, EVALS, TIMING, VARIANTS, cell_dir
from egat.seeding import seeded_scope
from egat.report import (
    Results, csv_text, find_eval_files, floor_method, in_domain_outputs, in_domain_table,
    load_runs, markdown_table, method_colors, new_figure, ood_outputs, ood_table, paired_caption,
    paired_outputs, paired_table, per_seed_means, save_png, seeds_caption,
)
from egat.stats import over_seeds

# Every Table III/IV variant is EGAT with one thing changed, so each is compared with this run.
VARIANT_BASELINE = "egat"


# --- variants -----------------------------------------------------------------------------------

def variant_params(params: Params, name: str) -> tuple[Params, str]:
    """(params of variant ``name`` with its overrides and run folder, its method)."""
    variants = all_variants(params)
    try:
        variant = variants[name]
    except KeyError:
        raise EgatError(f"unknown variant {name!r}; valid: {', '.join(sorted(variants))}") from None
    raw = apply_overrides(params.model_dump(mode="json"),
                          [f"{k}={json.dumps(v)}" for k, v in variant.overrides.items()])
    raw["train"]["out_dir"] = str(Path(params.train.out_dir) / VARIANTS)
    return params_from_dict(raw, f"studies.variants.{name}"), variant.method


def run_params_of(params: Params, name: str) -> tuple[Params, str, Path]:
    """(params, method, runs root) of a named run: a variant or a study method."""
    if name in all_variants(params):
        cell, method = variant_params(params, name)
        return cell, method, Path(cell.train.out_dir)
    return params, name, Path(params.train.out_dir)


# --- reading ------------------------------------------------------------------------------------

def load_study_results(evals_dir: str | Path, order: Sequence[str] = ()) -> Results:
    """Every eval.json of the study methods and of the variants, labelled by run name."""
    runs = find_eval_files(evals_dir) + find_eval_files(Path(evals_dir) / VARIANTS)
    return load_runs(runs, list(order))


def subset(results: Results, names: Sequence[str]) -> tuple[Results, list[str]]:
    """(results of the named runs that exist, the names that have no evaluation yet)."""
    present = [n for n in dict.fromkeys(names) if n in results.methods]
    missing = [n for n in names if n not in present]
    if not present:
        return results, missing
    domains = results.domains[results.domains["method"].isin(present)]
    sweep = results.sweep[results.sweep["method"].isin(present)]
    trains = [t for t in results.train_order if t in set(domains["train_domain"])]
    return replace(results, domains=domains, sweep=sweep, methods=present, train_order=trains), missing


def missing_note(missing: Sequence[str]) -> str:
    if not missing:
        return ""
    return (f" Not run yet: {', '.join(missing)} (add the variants to studies.train, see README).")


# --- tables -------------------------------------------------------------------------------------

def sensitivity_table(results: Results) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table III: OOD cAcc per (train -> test) pair and each training domain's OOD mean, per
    run; (cells, numbers). numbers["OOD mean"] averages the training domains' OOD means."""
    table = ood_table(results)
    cells, numbers = ood_outputs(table)
    numbers["OOD mean"] = table.ood_mean.mean.mean(axis=1)
    return cells, numbers


def plot_sensitivity(numbers: pd.DataFrame, path: str | Path) -> Path:
    """Table III as bars: OOD cAcc per row (run) for each train -> test pair, OOD mean as a line."""
    pairs = [c for c in numbers.columns if " -> " in c
             and not c.endswith((" rank", " std", " ci_low", " ci_high"))]
    rows = list(numbers.index)
    fig = new_figure(max(6.0, 1.1 * len(rows) + 2.5), 4.4)
    ax = fig.subplots()
    width = 0.8 / max(len(pairs), 1)
    for i, pair in enumerate(pairs):
        offsets = [r + (i - (len(pairs) - 1) / 2) * width for r in range(len(rows))]
        high = numbers.get(f"{pair} ci_high")  # the 95 % interval as error bars
        yerr = (high - numbers[pair]).reindex(rows).fillna(0) if high is not None else None
        ax.bar(offsets, numbers[pair].reindex(rows), width, yerr=yerr, label=pair, color=f"C{i}")
    if "OOD mean" in numbers and rows:
        ax.plot(range(len(rows)), numbers["OOD mean"].reindex(rows), "k_", markersize=28,
                markeredgewidth=2, label="OOD mean")
    ax.set_xticks(range(len(rows)), rows)
    ax.set(ylabel="OOD cAcc (%)", title="Sensitivity of EGAT (Table III): OOD cAcc per test domain")
    ax.grid(axis="y", alpha=0.3)
    if not rows:
        ax.text(0.5, 0.5, "no sensitivity runs yet (studies.train)", ha="center", transform=ax.transAxes)
    else:
        fig.legend(loc="outside lower center", ncols=min(len(pairs) + 1, 4), fontsize=8)
    save_png(fig, Path(path))
    return Path(path)


def ablation_table(results: Results) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table IV: in-domain cAcc, aAcc, Comp, Suff per training domain; (cells, numbers)."""
    return in_domain_outputs(in_domain_table(results))


# --- runtime and Pareto front -------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    label: str
    time: float  # lower is better (s per epoch)
    accuracy: float  # higher is better (%)


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The points no other point beats on both axes (at most as slow and at least as accurate,
    better on one), sorted by time."""
    front = [
        p for p in points
        if not any(q.time <= p.time and q.accuracy >= p.accuracy
                   and (q.time < p.time or q.accuracy > p.accuracy) for q in points)
    ]
    return sorted(front, key=lambda p: (p.time, -p.accuracy))


def plot_pareto(points: Sequence[Point], path: str | Path, title: str = "",
                xlabel: str = "training time per epoch (s)", ylabel: str = "aAcc (%)") -> Path:
    """Scatter of labelled (time, accuracy) points with the Pareto front drawn and ringed."""
    save_png(pareto_figure(points, title, xlabel, ylabel), Path(path))
    return Path(path)


def pareto_figure(points: Sequence[Point], title: str = "",
                  xlabel: str = "training time per epoch (s)", ylabel: str = "aAcc (%)"):
    """The figure of :func:`plot_pareto`; its point labels are placed so that none overlap."""
    from adjustText import adjust_text

    if not points:
        raise EgatError("no runtime points to plot")
    front = pareto_front(points)
    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    colors = method_colors([p.label for p in points])
    for p in points:
        ax.scatter(p.time, p.accuracy, color=colors[p.label], s=40, zorder=3)
    ax.plot([p.time for p in front], [p.accuracy for p in front], "--", color="0.3", zorder=2,
            label="Pareto front")
    ax.scatter([p.time for p in front], [p.accuracy for p in front], s=140, facecolors="none",
               edgecolors="0.2", linewidths=1.2, zorder=4)
    if max(p.time for p in points) / max(min(p.time for p in points), 1e-12) > 20:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")  # plain numbers at 1, 2, 5 x 10^k: the default labels overlap
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.margins(0.12)  # room for the labels of the outermost points
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    # Labels are placed in display space, so the layout is fixed first (constrained layout would
    # move and shrink the axes again at save time), then adjustText pushes them apart.
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    texts = [ax.text(p.time, p.accuracy, p.label, fontsize=8, zorder=5) for p in points]
    adjust_text(texts, x=[p.time for p in points], y=[p.accuracy for p in points], ax=ax,
                expand=(1.2, 1.5), force_text=(0.3, 0.6),
                arrowprops=dict(arrowstyle="-", color="0.5", lw=0.5))
    return fig


def steps_per_epoch(params: Params, domain: str) -> int:
    from egat.data import read_splits

    splits = read_splits(params.data.splits_file)
    return math.ceil(len(splits["splits"][domain]["train"]) / params.train.batch_size)


def runtime_points(
    params: Params, results: Results, names: Sequence[str]
) -> tuple[list[Point], pd.DataFrame]:
    """One point per named run with an evaluation and a timing file: per-epoch training time
    (steps per epoch x the run's time_per_step_s) vs in-domain aAcc, both averaged over the
    run's training domains and seeds."""
    per_seed = per_seed_means(results.domains)
    rows = []
    for name in names:
        if name not in results.methods:
            continue
        cell, _, root = run_params_of(params, name)
        for domain in params.study.train_domains:
            for seed in params.study.seeds:
                timing = cell_dir(root, name, domain, seed) / TIMING
                if not timing.is_file() or (name, seed) not in per_seed.index:
                    continue
                step = json.loads(timing.read_text())["time_per_step_s"]
                rows.append({"run": name, "domain": domain, "seed": seed,
                             "time_per_step_s": step,
                             "epoch_time_s": step * steps_per_epoch(cell, domain),
                             "aacc": per_seed.loc[(name, seed), "id_aacc"]})
    table = pd.DataFrame(rows, columns=["run", "domain", "seed", "time_per_step_s", "epoch_time_s", "aacc"])
    means = table.groupby("run", sort=False)[["time_per_step_s", "epoch_time_s", "aacc"]].mean()
    points = [Point(name, row.epoch_time_s, row.aacc) for name, row in means.iterrows()]
    return points, means


# --- case study ---------------------------------------------------------------------------------

def case_study_images(params: Params, domain: str, count: int):
    """``count`` test images of ``domain``, a stratified subset seeded by ``data.split_seed``,
    one class after another: (images, labels, class names)."""
    import torch

    from egat.data import DomainDataset, read_splits
    from egat.data.subsets import stratified_indices

    splits = read_splits(params.data.splits_file)
    if domain not in splits["domains"]:
        raise EgatError(f"studies.case_study.domain={domain!r} is unknown; valid: "
                        f"{', '.join(splits['domains'])}")
    ds = DomainDataset(params.data.root, splits, [domain], "test", params.data.image_size,
                       "grayscale", guides_root=params.data.guides_root)
    chosen = stratified_indices(ds.labels, count, params.data.split_seed)
    by_class: dict[int, list[int]] = {}
    for i in chosen.tolist():
        by_class.setdefault(int(ds.labels[i]), []).append(i)
    order = [by_class[c][k] for k in range(max(map(len, by_class.values())))
             for c in sorted(by_class) if k < len(by_class[c])]
    items = [ds[i] for i in order]
    return (torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items]),
            list(splits["classes"]))


def plot_case_study(params: Params, names: Sequence[str], path: str | Path) -> list[str]:
    """Fig. 4: per image a row [image | per run: clean explanation, explanation under the
    evaluation attack] with the run's prediction on each; returns the runs drawn."""
    import torch

    from egat.build import build_attack, build_explainer
    from egat.heatmaps import overlay
    from egat.run.checkpoint import model_from_checkpoint

    domain = params.studies.case_study.domain or params.study.train_domains[0]
    seed = params.study.seeds[0]
    x, y, classes = case_study_images(params, domain, params.studies.case_study.images)
    rgb = [np.uint8(255 * img.permute(1, 2, 0).numpy()) for img in x]
    panels = []
    for name in names:
        _, _, root = run_params_of(params, name)
        ckpt = cell_dir(root, name, params.study.train_domains[0], seed) / BEST
        if not ckpt.is_file():
            continue
        model, _, _ = model_from_checkpoint(ckpt)
        model.eval()
        explainer = build_explainer(params.eval.explainer, model, params.explainer)
        with seeded_scope(params.train.seed):  # the attack's random start, as in evaluation
            x_adv = build_attack(model, params.eval.attack)(x, y)
        with torch.no_grad():
            preds = [model(x).argmax(1), model(x_adv).argmax(1)]
        maps = [explainer.attribute(x, y), explainer.attribute(x_adv, y)]
        panels.append((name, maps, preds))
    if not panels:
        raise EgatError(f"no checkpoint of {', '.join(names)} found for the case study")
    cols = 1 + 2 * len(panels)
    fig = new_figure(1.6 * cols, 1.75 * len(rgb) + 0.4)
    axes = fig.subplots(len(rgb), cols, squeeze=False)
    attack = params.eval.attack.name.upper()
    for r, image in enumerate(rgb):
        axes[r, 0].imshow(image)
        axes[r, 0].set_title(f"{classes[int(y[r])]}", fontsize=8)
        for k, (name, maps, preds) in enumerate(panels):
            for j, kind in enumerate(("clean", attack)):
                ax = axes[r, 1 + 2 * k + j]
                ax.imshow(overlay(image, maps[j][r]))
                pred = classes[int(preds[j][r])]
                ax.set_title(f"{name} {kind}\n-> {pred}", fontsize=7,
                             color="black" if int(preds[j][r]) == int(y[r]) else "red")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    save_png(fig, Path(path))
    return [name for name, _, _ in panels]


# --- the stage ----------------------------------------------------------------------------------

def build_studies(params: Params, evals_dir: str | Path = EVALS, out_dir: str | Path = "reports") -> dict:
    """Write Tables III/IV (md + csv), Fig. 3 and Fig. 4 (PNG) and their data to ``out_dir``;
    returns {"files": [...], "metrics": {...}} for MLflow."""
    st = params.studies
    out = Path(out_dir)
    order = list(params.study.methods) + sorted(all_variants(params))
    results = load_study_results(evals_dir, order)
    caption = seeds_caption(results)
    files: list[Path] = []
    metrics: dict[str, float] = {}

    def write(name: str, text: str) -> None:
        from egat import io

        io.write_text(out / name, text)
        files.append(out / name)

    def table(stem: str, rows: Sequence[str], build, title: str, text: str):
        """Table ``stem`` (.md and .csv) of the runs ``rows``; returns (those runs, numbers)."""
        chosen, missing = subset(results, rows)
        cells, numbers = build(chosen)
        write(f"{stem}.md", markdown_table(title, f"{text} {caption}{missing_note(missing)}", cells))
        write(f"{stem}.csv", csv_text(numbers))
        return chosen, numbers

    _, numbers = table(
        "table3_sensitivity", st.sensitivity, sensitivity_table,
        "Table III: sensitivity of EGAT to the explanation method and the guides",
        "OOD cAcc (%) per train -> test domain, [rank] among the rows. Rows: EGAT with Grad-CAM "
        "and grayscale guides (egat), with other explainers, with guide noise N(0, sigma^2) "
        "(noisy_<sigma>), with golden masks as guides (golden).")
    files.append(plot_sensitivity(numbers, out / "table3_sensitivity.png"))
    metrics.update({f"sensitivity/{n}/ood_cacc": float(v) for n, v in numbers["OOD mean"].items()})

    abl, _ = table(
        "table4_ablation", st.ablation, ablation_table, "Table IV: ablation",
        "In-domain test metrics per training domain: cAcc/aAcc (%), Comp (higher is better), "
        "Suff (lower is better). w/o EGL: no explanation guidance (lambda_egl = 0, no explanation "
        "terms in L_mix); w/o AT: no adversarial term (lambda_adv = 0).")
    mean = over_seeds(per_seed_means(abl.domains), ["method"]).mean
    for name, row in mean.iterrows():
        metrics.update({f"ablation/{name}/{k}": float(row[f"id_{k}"])
                        for k in ("cacc", "aacc", "comp", "suff") if pd.notna(row.get(f"id_{k}"))})

    def paired(stem: str, baseline: str, title: str) -> None:
        """``stem`` (.md and .csv): every Table III/IV row minus ``baseline``, paired by seed."""
        chosen, missing = subset(results, [baseline, *st.sensitivity, *st.ablation])
        table = paired_table(chosen, baseline)
        cells, numbers = paired_outputs(table)
        write(f"{stem}.md", markdown_table(title, paired_caption(table) + missing_note(missing),
                                          cells))
        write(f"{stem}.csv", csv_text(numbers))
        if "ood_cacc" in table.stats.mean.columns.get_level_values(1):
            # Averaged over the training domains, as Table III's sensitivity/<row>/ood_cacc.
            gain = table.stats.mean.xs("ood_cacc", axis=1, level=1).mean(axis=1)
            metrics.update({f"paired/{n}/ood_cacc_minus_{baseline}": float(v)
                            for n, v in gain.items() if pd.notna(v)})

    paired("studies_paired", VARIANT_BASELINE,
           f"Tables III and IV paired by seed: each row minus {VARIANT_BASELINE}")
    # The variants against the floor too: does a variant beat ERM, not only differ from EGAT.
    floor = floor_method(results, list(params.study.references)) or params.study.methods[0]
    paired("studies_paired_floor", floor,
           f"Tables III and IV paired by seed: each row minus {floor} (the floor)")

    points, timing = runtime_points(params, results, list(params.study.methods) + list(st.runtime))
    write("fig3_runtime.csv", timing.round(4).rename_axis("run").to_csv())
    files.append(plot_pareto(points, out / "fig3_runtime.png",
                             "Training time per epoch vs in-domain aAcc (ringed: Pareto front)"))
    metrics.update({f"runtime/{p.label}/epoch_time_s": p.time for p in points})

    files.append(out / "fig4_case_study.png")
    plot_case_study(params, st.case_study.runs, out / "fig4_case_study.png")
    return {"files": files, "metrics": metrics}


def studies_run(
    params: Params, evals_dir: str | Path = EVALS, out_dir: str | Path = "reports"
) -> list[Path]:
    """The `studies` stage: build everything and log it to MLflow (one run, key `studies`)."""
    from egat.tracking.mlflow_tracker import MlflowTracker

    tags = {"stage": "studies", "dataset": params.data.name, "model": params.model.name}
    with MlflowTracker("studies", tags, {"studies": params.studies.model_dump(mode="json")}) as tracker:
        built = build_studies(params, evals_dir, out_dir)
        tracker.log_metrics(built["metrics"], step=0)
        for path in built["files"]:
            tracker.log_artifact(path, "studies")
    return built["files"]

"""The report stage on fabricated eval.json files with hand-picked numbers (3 methods x 2 training
domains x 2 seeds), the paper's own Table II, and the offline `dvc plots show` page."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest

from egat.errors import EgatError
from egat.report import (
    build_report,
    explanation_table,
    find_eval_files,
    in_domain_table,
    load_runs,
    ood_table,
    paired_differences,
    paired_outputs,
    paired_table,
    sweep_plot_data,
)
from egat.stats import Stats, interval_ranks, over_seeds

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "egat" / "report_assets"
OFFLINE_TEMPLATE = ASSETS / "vega_offline.html"
CHECK_RENDER = ROOT / "scripts" / "check_plots_render.py"

METHODS = ["erm", "egat", "igr"]
DOMAINS = ["grass", "gravel", "brick"]
TRAIN_DOMAINS = ["grass", "gravel"]
SEEDS = [0, 1]
ATTACKS = ["fgsm", "mifgsm", "pgd"]
EPS = [0.01, 0.02, 0.03, 0.04]

# OOD cAcc (seed 0, seed 1) per (method, train, test), on OOD_N test images each. Seeds differ by
# 0.2, so each 95 % interval is sqrt((t_1 * 0.1414 / sqrt 2)^2 + (1.96 sqrt(p (100 - p) / n))^2)
# ~ +-1.3 to 1.6 wide. Ranks (1 + methods whose interval lies wholly above):
#   grass->gravel: erm 50 [2], egat 55 [1], igr 45 [3]
#   grass->brick:  erm 40 [1], egat 40.002 [1], igr 42 [1] (all intervals overlap: a tie)
#   gravel->grass: erm 60 [3], egat 70 [1], igr 66 [2]
#   gravel->brick: erm 30 [2], egat 35 [1], igr 20 [3]
OOD_N = 10_000
OOD_CACC = {
    ("erm", "grass", "gravel"): (49.9, 50.1), ("egat", "grass", "gravel"): (54.9, 55.1),
    ("igr", "grass", "gravel"): (44.9, 45.1),
    ("erm", "grass", "brick"): (39.9, 40.1), ("egat", "grass", "brick"): (39.903, 40.101),
    ("igr", "grass", "brick"): (41.9, 42.1),
    ("erm", "gravel", "grass"): (59.9, 60.1), ("egat", "gravel", "grass"): (69.9, 70.1),
    ("igr", "gravel", "grass"): (65.9, 66.1),
    ("erm", "gravel", "brick"): (29.9, 30.1), ("egat", "gravel", "brick"): (34.9, 35.1),
    ("igr", "gravel", "brick"): (19.9, 20.1),
}
EXPECTED_RANKS = {"erm": [2, 1, 3, 2], "egat": [1, 1, 1, 1], "igr": [3, 1, 2, 3]}
EXPECTED_MEAN_RANK = {"erm": 2.0, "egat": 1.0, "igr": 2.25}
EXPECTED_RANK_VARIANCE = {"erm": 0.5, "egat": 0.0, "igr": 0.6875}  # population variance


def in_domain_metrics(method: str, seed: int) -> dict:
    """Method i: cAcc (80+i, 84+i), aAcc (10i, 10i+10), Comp (20, 22), Suff (5, 7) for seeds 0, 1."""
    i = METHODS.index(method)
    return {"cacc": 80 + i + 4 * seed, "aacc": 10 * i + 10 * seed, "comp": 20 + 2 * seed,
            "suff": 5 + 2 * seed}


def domain_entry(method: str, train: str, test: str, seed: int, masks: bool) -> dict:
    i = METHODS.index(method)
    if test == train:
        entry = {"in_domain": True, **in_domain_metrics(method, seed)}
    else:
        entry = {"in_domain": False, "cacc": OOD_CACC[method, train, test][seed], "aacc": 5.0,
                 "comp": 10.0, "suff": 8.0}
    # The cue: method i is right on 50 + 5 i + seed % of the cue-free renders and follows the
    # cue on 30 - 10 i + 2 seed % of the 20 images where it misleads.
    entry.update(spearman=0.5 + 0.1 * i + 0.02 * seed, top_intersection=0.4 + 0.1 * i,
                 n=100 if test == train else OOD_N, cue_free_cacc=50.0 + 5 * i + seed,
                 cue_follow=30.0 - 10 * i + 2 * seed, n_cue_mismatch=20)
    if masks:
        entry.update(pointing_game=0.6 + 0.1 * i, mass_in_mask=0.3)
    return entry


def sweep_accuracy(method: str, attack: str, eps: float, seed: int) -> float:
    return 90.0 - 10 * ATTACKS.index(attack) - 1000 * eps * (METHODS.index(method) + 1) / 3 + seed


def write_runs(root: Path, masks: bool = True) -> Path:
    """runs/<method>/<train>/seed<seed>/eval.json for every method, training domain and seed."""
    for method in METHODS:
        for train in TRAIN_DOMAINS:
            for seed in SEEDS:
                ev = {
                    "train_domains": [train],
                    "domains": {d: domain_entry(method, train, d, seed, masks) for d in DOMAINS},
                    "sweep": {a: {f"{e:g}": sweep_accuracy(method, a, e, seed) for e in EPS}
                              for a in ATTACKS},
                    "summary": {},
                }
                path = root / method / train / f"seed{seed}" / "eval.json"
                path.parent.mkdir(parents=True)
                path.write_text(json.dumps(ev))
    return root


def load_script(path: Path):
    """A script of scripts/ or pipelines/ as a module, without running its main()."""
    return runpy.run_path(str(path), run_name=path.stem)


# Module-scoped: the runs are read-only inputs and building the report (PNGs) takes ~1 s.
@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return write_runs(tmp_path_factory.mktemp("study") / "runs")


@pytest.fixture(scope="module")
def results(runs_dir):
    return load_runs(find_eval_files(runs_dir), methods_order=METHODS)


@pytest.fixture(scope="module")
def report_dir(runs_dir) -> Path:
    out = runs_dir.parent / "reports"
    build_report(runs_dir, out, methods_order=METHODS)
    return out


def test_finds_every_run_with_method_and_seed_from_the_path(runs_dir):
    files = find_eval_files(runs_dir)
    assert len(files) == 3 * 2 * 2
    assert {(f.method, f.seed) for f in files} == {(m, s) for m in METHODS for s in SEEDS}


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(EgatError, match="no eval.json"):
        build_report(tmp_path / "runs", tmp_path / "reports")


def test_methods_follow_the_given_order_then_the_rest_alphabetically(runs_dir):
    results = load_runs(find_eval_files(runs_dir), methods_order=["igr", "unknown"])
    assert results.methods == ["igr", "egat", "erm"]
    assert results.domain_order == DOMAINS
    assert results.train_order == TRAIN_DOMAINS


def test_table2_ranks_ties_mean_rank_and_population_variance(results):
    table = ood_table(results)
    assert [pair for pair in table.mean.columns] == [
        ("grass", "gravel"), ("grass", "brick"), ("gravel", "grass"), ("gravel", "brick")]
    assert table.rank.astype(int).T.to_dict("list") == EXPECTED_RANKS
    assert table.mean_rank.to_dict() == pytest.approx(EXPECTED_MEAN_RANK)
    assert table.rank_variance.to_dict() == pytest.approx(EXPECTED_RANK_VARIANCE)
    assert table.mean.loc["egat", ("grass", "brick")] == pytest.approx(40.002)
    # Each training domain's OOD mean: grass -> (gravel, brick), gravel -> (grass, brick).
    assert table.ood_mean.mean.loc["egat", "grass"] == pytest.approx((55 + 40.002) / 2)
    assert table.ood_mean.mean.loc["igr", "gravel"] == pytest.approx(43.0)


def test_table2_files_show_mean_std_interval_and_rank(report_dir):
    markdown = (report_dir / "table2_ood.md").read_text()
    assert "| grass -> gravel " in markdown and "| grass OOD mean " in markdown
    # erm grass -> gravel: 50 ± 0.1414; half = sqrt((12.706 * 0.1)^2 + (1.96 * 0.5)^2) = 1.604
    assert "50.00 ± 0.14 (48.40, 51.60) [2]" in markdown
    csv = pd.read_csv(report_dir / "table2_ood.csv", index_col="method")
    assert list(csv.index) == METHODS
    assert csv.loc["egat", "grass -> brick rank"] == 1
    assert csv.loc["igr", "mean rank"] == 2.25
    assert csv.loc["erm", "rank variance"] == 0.5
    assert csv.loc["erm", "grass -> gravel std"] == pytest.approx(0.02 ** 0.5, abs=1e-4)
    assert csv.loc["erm", "grass -> gravel ci_low"] == pytest.approx(48.396, abs=2e-3)


def test_interval_of_two_seeds_counts_seeds_and_test_images(results):
    """Table I's erm grass cAcc: seeds 80, 84 on n = 100 test images each (hand-computed)."""
    stats = in_domain_table(results)
    seeds = 12.7062 * 8 ** 0.5 / 2 ** 0.5  # t_{0.975, 1} * s / sqrt(k)
    images = 1.96 * ((80 * 20 / 100 + 84 * 16 / 100) / 2) ** 0.5  # z * sqrt(mean p (100 - p) / n)
    assert stats.half.loc["erm", ("grass", "cacc")] == pytest.approx((seeds**2 + images**2) ** 0.5,
                                                                     rel=1e-4)


def test_test_set_variance_of_each_metric_counts_its_own_images():
    """p (100 - p) / N with N the images the metric is a mean over: all n, the costly subset, the
    images whose cue misleads (or matches); sd^2 / N for Comp; no term for rank scores."""
    from egat.report import test_variances

    m = {"n": 100, "n_costly": 20, "n_cue_mismatch": 25, "cacc": 80.0, "aacc": 50.0,
         "comp": 10.0, "comp_sd": 4.0, "suff": 5.0, "spearman": 0.5, "cue_follow": 40.0,
         "cacc_cue_mismatch": 20.0, "cacc_cue_match": 60.0, "object_erased_cacc": 30.0}
    assert test_variances(m) == pytest.approx({
        "cacc_var": 80 * 20 / 100, "aacc_var": 50 * 50 / 20, "comp_var": 4**2 / 20,
        "object_erased_cacc_var": 30 * 70 / 100, "cue_follow_var": 40 * 60 / 25,
        "cacc_cue_mismatch_var": 20 * 80 / 25, "cacc_cue_match_var": 60 * 40 / 75})
    assert test_variances({**m, "n": 0}) == {}


def test_one_seed_interval_is_the_test_sets_alone():
    per_seed = pd.DataFrame({"method": ["a"], "seed": [0], "cacc": [50.0], "cacc_var": [25.0]})
    stats = over_seeds(per_seed.set_index(["method", "seed"]), ["method"])
    assert stats.half.loc["a", "cacc"] == pytest.approx(1.959964 * 5.0)
    assert pd.isna(stats.std.loc["a", "cacc"])


def test_every_metrics_interval_is_clipped_to_its_range_and_printed_as_clipped():
    """99.5 % and 0.5 % of 100 images, one seed: half = 1.96 sqrt(0.4975) = 1.3825 would leave
    cAcc's [0, 100] and a Comp of -99.5 would leave its [-100, 100]; both are clipped to the
    catalog's range, a Comp of 3.0 is not."""
    from egat.report import bounds_of, format_cell

    per_seed = pd.DataFrame({"method": ["a", "b"], "seed": [0, 0], "cacc": [99.5, 0.5],
                             "cacc_var": [0.4975, 0.4975], "comp": [-99.5, 3.0],
                             "comp_var": [0.4975, 0.4975]}).set_index(["method", "seed"])
    assert bounds_of(per_seed.columns) == {"cacc": (0.0, 100.0), "comp": (-100.0, 100.0)}
    stats = over_seeds(per_seed, ["method"], bounds_of(per_seed.columns))
    half = 1.959964 * 0.4975**0.5
    assert stats.half.loc["a", "cacc"] == pytest.approx(half)
    assert stats.high["cacc"].tolist() == [100.0, pytest.approx(0.5 + half)]
    assert stats.low["cacc"].tolist() == [pytest.approx(99.5 - half), 0.0]
    assert stats.low["comp"].tolist() == [-100.0, pytest.approx(3.0 - half)]
    assert format_cell(99.5, float("nan"), *stats.low.loc["a", ["cacc"]],
                       *stats.high.loc["a", ["cacc"]]) == "99.50 (98.12, 100.00)"
    picked = stats.map(lambda s: s.loc[["b"]])  # map keeps the bounds with their cells
    assert picked.low.loc["b", "cacc"] == 0.0


def test_interval_ranks_tie_overlapping_intervals():
    mean = pd.DataFrame({"c": [50.0, 55.0, 45.0, 53.5]}, index=["a", "b", "c", "d"])
    half = pd.DataFrame({"c": [2.0, 2.0, 2.0, 1.0]}, index=mean.index)
    ranks = interval_ranks(Stats(mean, mean * float("nan"), half))
    # b [53, 57] and d [52.5, 54.5] overlap: both first; a [48, 52] lies below both; c below a.
    assert ranks["c"].to_dict() == {"a": 3, "b": 1, "c": 4, "d": 1}


def test_paper_table2_mean_ranks_and_variances():
    """The paper's Table II cAcc values give its printed ranks (IGR/EGAT tie at 97.87)."""
    columns = [
        [28.11, 33.01, 26.65, 30.94, 34.19, 38.15], [34.66, 43.04, 33.52, 34.75, 40.85, 39.04],
        [48.01, 52.96, 43.70, 45.22, 42.96, 46.59], [91.59, 86.28, 88.49, 93.36, 92.47, 94.34],
        [56.40, 54.28, 55.61, 62.34, 64.63, 57.33], [66.55, 64.44, 70.18, 67.40, 67.22, 69.77],
        [73.45, 69.91, 67.25, 34.75, 40.85, 74.20], [57.54, 60.37, 64.38, 62.34, 64.63, 67.68],
        [63.14, 58.14, 63.51, 70.48, 75.76, 66.22], [94.34, 97.87, 97.34, 97.58, 98.67, 97.87],
        [52.64, 62.50, 64.15, 67.40, 67.22, 64.62], [71.49, 79.80, 76.57, 61.45, 61.85, 74.66],
    ]
    methods = ["ERM", "IGR", "IGN", "DRE", "SGDrop", "EGAT"]
    mean = pd.DataFrame(columns, columns=methods).T
    ranks = interval_ranks(Stats(mean, mean * float("nan"), mean * 0.0))  # exact values, no interval
    assert ranks.loc["EGAT"].tolist() == [1, 3, 3, 1, 3, 2, 1, 1, 3, 2, 3, 3]
    assert ranks.loc["IGR", 9] == ranks.loc["EGAT", 9] == 2
    mean = ranks.mean(axis=1).round(2).to_dict()
    assert mean == {"ERM": 4.5, "IGR": 3.75, "IGN": 4.17, "DRE": 3.5, "SGDrop": 2.83, "EGAT": 2.17}
    variance = ranks.var(axis=1, ddof=0).round(2)
    assert (variance["EGAT"], variance["SGDrop"]) == (0.81, 2.81)


def test_table1_means_and_std_over_seeds(results):
    stats = in_domain_table(results)
    mean, std = stats.mean, stats.std
    assert list(mean.columns) == [(d, m) for d in TRAIN_DOMAINS for m in ("cacc", "aacc", "comp", "suff")]
    assert mean.loc["erm", ("grass", "cacc")] == 82.0  # seeds 80, 84
    assert std.loc["erm", ("grass", "cacc")] == pytest.approx(8 ** 0.5)  # sample std
    assert mean.loc["egat", ("gravel", "aacc")] == 15.0  # seeds 10, 20
    assert mean.loc["igr", ("gravel", "suff")] == 6.0


def test_table1_files(report_dir):
    markdown = (report_dir / "table1_in_domain.md").read_text()
    assert "| grass cAcc " in markdown and "| gravel Suff " in markdown
    assert "82.00 ± 2.83 (" in markdown
    csv = pd.read_csv(report_dir / "table1_in_domain.csv", index_col="method")
    assert csv.loc["egat", "gravel aAcc"] == 15.0
    assert csv.loc["egat", "gravel aAcc std"] == pytest.approx(7.0711)


def test_paired_table_is_each_method_minus_the_floor_seed_by_seed(results):
    table = paired_table(results, "erm")
    mean, std, low, high = table.stats.mean, table.stats.std, table.stats.low, table.stats.high
    assert list(mean.index) == ["egat", "igr"]
    assert list(mean.columns) == [(t, m) for t in TRAIN_DOMAINS for m in (
        "ood_cacc", "id_cacc", "id_aacc", "ood_cue_free_cacc", "id_cue_follow", "id_pointing_game")]
    # In domain: cAcc 80 + i + 4 seed, aAcc 10 i + 10 seed: the same gap on both seeds.
    assert mean.loc["egat", ("grass", "id_cacc")] == pytest.approx(1.0)
    assert mean.loc["igr", ("gravel", "id_aacc")] == pytest.approx(20.0)
    assert std.loc["igr", ("gravel", "id_aacc")] == pytest.approx(0.0)
    # OOD mean of grass runs (gravel, brick): egat - erm = 2.5015 (seed 0), 2.5005 (seed 1); the
    # t interval over the two differences only: 12.706 * (0.001 / sqrt 2) / sqrt 2 = 0.006353.
    assert mean.loc["egat", ("grass", "ood_cacc")] == pytest.approx(2.501)
    assert std.loc["egat", ("grass", "ood_cacc")] == pytest.approx(0.001 / 2**0.5)
    assert high.loc["egat", ("grass", "ood_cacc")] - mean.loc["egat", ("grass", "ood_cacc")] == (
        pytest.approx(12.7062 * 0.0005, rel=1e-4))
    # igr trained on gravel: (66 + 20) / 2 - (60 + 30) / 2 = -2 on both seeds, ahead on none.
    assert mean.loc["igr", ("gravel", "ood_cacc")] == pytest.approx(-2.0)
    assert low.loc["igr", ("gravel", "ood_cacc")] == pytest.approx(-2.0)
    assert table.positive.loc["igr", ("gravel", "ood_cacc")] == 0
    assert table.positive.loc["egat", ("grass", "ood_cacc")] == table.seeds.loc[
        "egat", ("grass", "ood_cacc")] == 2
    # The shortcut's evidence: method i minus method 0 is 5 i, -10 i and 0.1 i on every seed.
    assert mean.loc["igr", ("grass", "ood_cue_free_cacc")] == pytest.approx(10.0)
    assert mean.loc["egat", ("gravel", "id_cue_follow")] == pytest.approx(-10.0)
    assert mean.loc["igr", ("gravel", "id_pointing_game")] == pytest.approx(0.2)
    assert table.positive.loc["egat", ("grass", "id_cue_follow")] == 0
    cells, numbers = paired_outputs(table)
    assert cells.loc["igr", "gravel OOD cAcc"].startswith("-2.00 ± 0.00")  # float-noise width
    assert cells.loc["igr", "gravel OOD cAcc"].endswith(", 0/2 > 0")
    assert cells.loc["egat", "grass OOD cAcc"] == "2.50 ± 0.00 (2.49, 2.51), 2/2 > 0"
    assert numbers.loc["egat", "grass ID aAcc seeds_positive"] == 2


def test_paired_differences_keep_only_the_seeds_both_have():
    index = pd.MultiIndex.from_tuples(
        [("erm", "a", 0), ("erm", "a", 1), ("egat", "a", 0), ("egat", "a", 1), ("egat", "a", 2)],
        names=["method", "train_domain", "seed"])
    per_seed = pd.DataFrame({"ood_cacc": [10.0, 20.0, 13.0, 21.0, 99.0]}, index=index)
    diff = paired_differences(per_seed, "erm")
    assert diff["ood_cacc"].to_dict() == {("egat", "a", 0): 3.0, ("egat", "a", 1): 1.0}


def test_paired_table_without_its_baseline_is_empty(results):
    table = paired_table(results, "oracle")
    assert table.stats.mean.isna().all().all()
    cells, _ = paired_outputs(table)
    assert (cells == "-").all().all()


def test_explanation_table_stability_and_mask_alignment(results):
    mean = explanation_table(results).mean
    assert list(mean.columns) == [
        "id_spearman", "ood_spearman", "id_top_intersection", "ood_top_intersection",
        "id_pointing_game", "ood_pointing_game", "id_mass_in_mask", "ood_mass_in_mask"]
    assert mean.loc["egat", "id_spearman"] == pytest.approx(0.61)  # 0.6 + 0.02 * mean seed
    assert mean.loc["igr", "ood_pointing_game"] == pytest.approx(0.8)


def test_explanation_table_leaves_out_mask_metrics_without_masks(tmp_path):
    results = load_runs(find_eval_files(write_runs(tmp_path / "runs", masks=False)))
    mean = explanation_table(results).mean
    assert not [c for c in mean.columns if "pointing_game" in c or "mass_in_mask" in c]
    build_report(tmp_path / "runs", tmp_path / "reports")
    assert "ID pointing game" not in (tmp_path / "reports" / "explanations.md").read_text()
    paired = (tmp_path / "reports" / "paired.md").read_text()
    assert "ID pointing game" not in paired and "Pointing game: a fraction" not in paired
    assert "| grass ID cue-follow rate " in paired  # the cue's column stays


def test_paired_caption_says_which_way_each_column_is_ahead(report_dir):
    paired = (report_dir / "paired.md").read_text()
    assert "| grass OOD cue-free cAcc " in paired and "| gravel ID pointing game " in paired
    assert "except for the cue-follow rate, where > 0 is behind" in paired
    assert "Pointing game: a fraction, not points." in paired


def test_metrics_json_is_flat_per_method(report_dir):
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert list(metrics) == sorted(METHODS)
    for values in metrics.values():
        assert all(isinstance(k, str) and isinstance(v, float) for k, v in values.items())
        assert {"id_cacc", "id_aacc", "ood_cacc", "ood_aacc", "id_comp", "id_suff",
                "ood_mean_rank", "ood_rank_variance", "id_cacc_ci"} <= set(values)
    assert metrics["egat"]["id_cacc"] == 83.0
    # The mean over training domains and seeds of each run's OOD mean.
    assert metrics["egat"]["ood_cacc"] == pytest.approx((55 + 40.002 + 70 + 35) / 4, abs=1e-4)
    assert metrics["egat"]["ood_mean_rank"] == 1.0
    # Paired by seed with the floor (the first method), over both training domains:
    # seed 0 (47.4015 + 52.4) / 2 - 44.9 = 5.00075, seed 1 (47.6005 + 52.6) / 2 - 45.1 = 5.00025.
    assert metrics["egat"]["ood_cacc_minus_erm"] == pytest.approx(5.0005, abs=1e-4)
    assert "ood_cacc_minus_erm" not in metrics["erm"]


def test_sweep_plot_data_for_dvc(results, report_dir):
    data = pd.read_csv(report_dir / "plots" / "attack_sweep.csv")
    assert list(data.columns) == ["method", "attack", "eps", "accuracy", "train_domain"]
    assert len(data) == len(METHODS) * len(TRAIN_DOMAINS) * len(ATTACKS) * len(EPS)
    assert set(data["attack"]) == {"FGSM", "MI-FGSM", "PGD"}
    row = data[(data.method == "igr") & (data.attack == "PGD") & (data.eps == 0.04)
               & (data.train_domain == "gravel")]
    assert row["accuracy"].item() == pytest.approx(sweep_accuracy("igr", "pgd", 0.04, 0) + 0.5)
    assert sweep_plot_data(results).shape == data.shape


@pytest.mark.parametrize("name", ["attack_sweep.png", "accuracy_bars.png"])
def test_figures_are_valid_pngs(report_dir, name):
    path = report_dir / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 300 and width > 500


def test_every_file_written_and_no_temp_files_left(runs_dir, report_dir):
    expected = {"table1_in_domain.md", "table1_in_domain.csv", "table2_ood.md", "table2_ood.csv",
                "paired.md", "paired.csv", "cue.md", "cue.csv",
                "explanations.md", "explanations.csv", "metrics.json", "plots/attack_sweep.csv",
                "attack_sweep.png", "accuracy_bars.png"}
    before = {p.relative_to(report_dir).as_posix(): p.read_bytes()
              for p in report_dir.rglob("*") if p.is_file()}
    assert set(before) == expected  # temp files would show up as .<name>.* leftovers
    build_report(runs_dir, report_dir, methods_order=METHODS)
    after = {p.relative_to(report_dir).as_posix(): p.read_bytes()
             for p in report_dir.rglob("*") if p.is_file()}
    assert after == before  # rewritten in place, deterministically


def test_failed_figure_leaves_neither_file_nor_temp(runs_dir, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"half a png")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    out = tmp_path / "reports"
    with pytest.raises(RuntimeError, match="disk full"):
        build_report(runs_dir, out)
    assert not (out / "attack_sweep.png").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_pipeline_stage_entry_point(runs_dir, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("study:\n  methods: [egat, erm]\nrobust:\n  transfer_fallback: egat\n")
    out = tmp_path / "reports"
    subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "report.py"), "--runs", str(runs_dir),
         "--out", str(out), "--config", str(params)],
        check=True, cwd=tmp_path,
    )
    csv = pd.read_csv(out / "table2_ood.csv")
    assert list(csv["method"]) == ["egat", "erm", "igr"]


# --- offline `dvc plots show` -------------------------------------------------------------------

DVC_PLOTS = """\
plots:
  - reports/plots/attack_sweep.csv:
      template: egat/report_assets/attack_sweep.vega.json
      x: eps
      y: accuracy
      title: Accuracy under attack vs ε (test split of the training domains)
      x_label: ε (L∞ budget, pixels in [0, 1])
      y_label: accuracy under attack (%)
  - reports/attack_sweep.png
  - reports/accuracy_bars.png
"""


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, check=True,
                          capture_output=True, text=True)


@pytest.fixture()
def plots_repo(report_dir, tmp_path) -> Path:
    """A DVC repo (no git) with the report and the plots definition of dvc.yaml."""
    repo = tmp_path / "repo"
    shutil.copytree(report_dir, repo / "reports")
    shutil.copytree(ASSETS, repo / "egat" / "report_assets")
    (repo / "dvc.yaml").write_text(DVC_PLOTS)
    dvc(repo, "init", "--no-scm", "-q")
    return repo


def test_offline_template_inlines_vega_and_keeps_dvc_placeholders():
    page = OFFLINE_TEMPLATE.read_text(encoding="utf-8")
    assert OFFLINE_TEMPLATE.stat().st_size < 2 * 1024 * 1024
    assert page.count("{plot_divs}") == 1
    assert "{scripts}" not in page  # DVC would insert its CDN <script src> tags there
    assert "<script src" not in page
    for package in ("vega@5.", "vega-lite@5.", "vega-embed@6."):
        assert f"/* {package}" in page


def test_dvc_plots_show_uses_the_offline_template(plots_repo):
    dvc(plots_repo, "plots", "show", "--html-template", str(OFFLINE_TEMPLATE), "-o", "dvc_plots")
    page = (plots_repo / "dvc_plots" / "index.html").read_text(encoding="utf-8")
    assert "cdn.jsdelivr.net" not in page
    assert "vegaEmbed('#reports_plots_attack_sweep_csv'" in page
    assert '"field": "method"' in page  # the sweep's own template: one line per method


def test_dvc_plots_render_offline_in_headless_chromium(plots_repo):
    """The permanent setup (.dvc/config plots.html_template) renders every chart with no network."""
    if load_script(CHECK_RENDER)["find_chromium"]() is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium); "
                    "the headless offline render check needs it")
    dvc(plots_repo, "config", "plots.html_template", "../egat/report_assets/vega_offline.html")
    dvc(plots_repo, "plots", "show", "-o", "dvc_plots")
    out = subprocess.run([sys.executable, str(CHECK_RENDER), "dvc_plots/index.html"],
                         cwd=plots_repo, capture_output=True, text=True, timeout=180)
    summary = json.loads(out.stdout)
    assert out.returncode == 0, summary
    assert summary["svg_charts"] == summary["vega_divs"] == 1
    # 2 training domains x 3 attacks panels, one line per method in each.
    assert summary["line_marks"] == 2 * 3 * len(METHODS)

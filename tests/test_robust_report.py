"""The robustness report and Table I's AA column, from hand-written robust.json files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from egat.report import build_report, find_eval_files, in_domain_table, load_runs
from egat.robust_report import add_aa_column, build_robust_report, failed_checks, load_robust
from egat.stats import Stats
from tests.test_report import METHODS, SEEDS, TRAIN_DOMAINS, write_runs


def robust_entry(method: str, train: str, seed: int) -> dict:
    """AA 30 + 10 i + 2 seed for method i; igr fails (c) on seed 1 and (e) on both seeds."""
    i = METHODS.index(method)
    aa = 30.0 + 10 * i + 2 * seed
    square_fails = method == "igr" and seed == 1
    flat = method == "igr"
    return {
        "method": method, "train_domain": train, "seed": seed, "n": 50, "eps": 8 / 255,
        "clean": 80.0, "aa": aa, "aa_fooled_by": {"APGD": 10, "APGDT": 2, "Square": 1},
        "checks": {
            "a": {"eps": [0.03, 0.25], "accuracy": [aa + 5, 0.0], "clean": 80.0, "passed": True},
            "b": {"pgd": aa + 10, "strong_pgd": aa + 8, "steps": 100, "restarts": 5, "passed": True},
            "c": {"square": aa - 5 if square_fails else aa + 20, "apgd": aa + 2,
                  "passed": not square_fails},
            "d": {"transfer": 70.0, "white_box": aa + 10, "passed": True},
            "e": {"rising_fraction": 0.0 if flat else 1.0, "flat_fraction": 1.0 if flat else 0.0,
                  "mean_loss": [0.1, 0.2], "min_rising": 0.75, "passed": not flat},
        },
        "failed": [k for k, bad in (("c", square_fails), ("e", flat)) if bad],
        "transfer_from": "erm",
    }


def write_robust(root: Path) -> Path:
    for method in METHODS:
        for train in TRAIN_DOMAINS:
            for seed in SEEDS:
                path = root / method / train / f"seed{seed}" / "robust.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(robust_entry(method, train, seed)))
    return root


@pytest.fixture(scope="module")
def evals(tmp_path_factory) -> Path:
    return write_robust(write_runs(tmp_path_factory.mktemp("robust") / "evals"))


def test_aa_column_means_over_seeds_and_flags_failing_methods(evals):
    table1 = in_domain_table(load_runs(find_eval_files(evals), METHODS))
    stats, caption = add_aa_column(evals, table1)
    assert isinstance(stats, Stats) and "AutoAttack" in caption
    assert stats.mean.loc["egat", ("grass", "aa")] == 41.0  # method 1: seeds 40, 42
    assert stats.std.loc["erm", ("gravel", "aa")] == pytest.approx(2 ** 0.5)
    # t_{0.975, 1} * sqrt(2) / sqrt(2) and 1.96 * sqrt(mean of p (100 - p) / 50) in quadrature
    images = 1.959964 * ((40 * 60 + 42 * 58) / 2 / 50) ** 0.5
    assert stats.half.loc["egat", ("grass", "aa")] == pytest.approx((12.7062**2 + images**2) ** 0.5, rel=1e-4)
    assert failed_checks(load_robust(evals)) == {"igr": "c, e"}
    assert "igr ⚠ (c, e)" in stats.mean.index


def test_table1_gets_the_aa_column_and_the_flag(evals, tmp_path):
    build_report(evals, tmp_path, methods_order=METHODS)
    markdown = (tmp_path / "table1_in_domain.md").read_text()
    assert "| grass AA " in markdown and "igr ⚠ (c, e)" in markdown
    assert "41.00 ± 1.41 (" in markdown and "AutoAttack" in markdown
    csv = pd.read_csv(tmp_path / "table1_in_domain.csv", index_col="method")
    header = list(csv.columns)
    assert header.index("grass AA") == header.index("grass Suff ci_high") + 1  # after grass's metrics
    assert csv.loc["egat", "gravel AA"] == 41.0
    assert (tmp_path / "robustness.md").is_file()


def test_robustness_table_numbers_and_verdicts(evals, tmp_path):
    paths = build_robust_report(evals, tmp_path, methods_order=METHODS)
    assert [p.name for p in paths] == ["robustness.md", "robustness.csv"]
    csv = pd.read_csv(tmp_path / "robustness.csv")
    row = csv[(csv.method == "igr") & (csv.train_domain == "grass")].iloc[0]
    assert row["AA"] == 51.0 and row["seeds"] == 2 and row["n"] == 50
    assert row["(c) black-box Square accuracy >= white-box APGD-CE accuracy"] == "FAIL (1/2 seeds)"
    assert row["(e) loss rises along the gradient sign"] == "FAIL (2/2 seeds)"
    assert row["(a) accuracy falls with eps to <= max_final_acc"] == "pass"
    markdown = (tmp_path / "robustness.md").read_text()
    assert list(csv.method.unique()) == METHODS and "| erm " in markdown
    assert "41.0 ± 1.4" in markdown


def test_no_robust_json_leaves_table1_as_it_was(tmp_path):
    evals = write_runs(tmp_path / "evals")
    assert load_robust(evals).empty and build_robust_report(evals, tmp_path / "out") == []
    build_report(evals, tmp_path / "out", methods_order=METHODS)
    assert "AA" not in (tmp_path / "out" / "table1_in_domain.md").read_text()


def test_the_statistics_sit_below_both_reports():
    """egat.stats imports neither report, and robust_report does not import report (which imports
    it): no import circle between the three."""
    import ast

    import egat.robust_report
    import egat.stats

    def imported(module) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}

    assert not imported(egat.stats) & {"egat.report", "egat.robust_report"}
    assert "egat.report" not in imported(egat.robust_report)

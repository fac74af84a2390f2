"""The studies (Tables III/IV, Figs. 3/4): variants from params, tables on synthetic evaluations,
the Pareto helper; and the DVC stages end to end on tiny params (slow)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pandas as pd
import pytest

from egat.build import params_from_dict
from egat.errors import EgatError, ParamsError
from egat.run.layout import run_dir
from egat.studies import (
    Point, ablation_table, load_study_results, pareto_front, plot_pareto, plot_sensitivity,
    sensitivity_table, subset, variant_params,
)
from tests.helpers import prepared

DOMAINS = ["grass", "gravel", "brick"]


def write_eval(root: Path, name: str, cacc: dict, aacc=50.0, comp=30.0, suff=10.0, seed=0):
    """An eval.json as the evaluate stage writes it, trained on grass."""
    domains = {d: {"cacc": cacc[d], "aacc": aacc, "comp": comp, "suff": suff, "spearman": 0.5,
                   "top_intersection": 0.4, "n": 10**6, "in_domain": d == "grass"} for d in DOMAINS}
    path = root / name / "grass" / f"seed{seed}" / "eval.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"train_domains": ["grass"], "domains": domains,
                                "sweep": {"pgd": {"0.01": aacc}}}))


def test_pareto_front_keeps_the_undominated_points():
    points = [Point("a", 1.0, 50.0), Point("b", 2.0, 60.0), Point("c", 3.0, 55.0),
              Point("d", 0.5, 40.0), Point("e", 2.0, 58.0), Point("f", 4.0, 60.0)]
    assert [p.label for p in pareto_front(points)] == ["d", "a", "b"]
    assert pareto_front([Point("x", 1.0, 1.0), Point("y", 1.0, 1.0)]) == [
        Point("x", 1.0, 1.0), Point("y", 1.0, 1.0)]  # ties dominate neither


# Fig. 3 as the README's study run gives it: the baselines crowd near (3 s, 0 %).
CROWDED = [("erm", 3.0, 0.0), ("pgd_at", 17.0, 65.0), ("igr", 8.0, 20.0), ("ign", 40.0, 30.0),
           ("dmada", 3.2, 0.5), ("irm", 3.1, 0.0), ("dre", 6.0, 1.0), ("sgdrop", 3.5, 0.0),
           ("egat", 21.0, 70.5), ("fgsm_rs", 7.9, 76.5), ("free_at", 8.2, 52.0),
           ("resnet50", 235.0, 46.0), ("mobilenet_v2", 64.0, 9.5), ("efficientnet_b0", 84.0, 0.0)]


def test_pareto_point_labels_do_not_overlap():
    import itertools

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from egat.studies import pareto_figure

    fig = pareto_figure([Point(*p) for p in CROWDED], "t")
    renderer = FigureCanvasAgg(fig).get_renderer()
    boxes = {t.get_text(): t.get_window_extent(renderer) for t in fig.axes[0].texts}
    assert set(boxes) == {label for label, _, _ in CROWDED}
    overlapping = [(a, b) for (a, x), (b, y) in itertools.combinations(boxes.items(), 2) if x.overlaps(y)]
    assert overlapping == []
    inside = fig.bbox
    assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 and inside.y0 <= b.y0 and b.y1 <= inside.y1
               for b in boxes.values())


def test_plot_pareto_writes_a_png(tmp_path):
    path = plot_pareto([Point("erm", 0.2, 10.0), Point("egat", 2.0, 40.0),
                        Point("egat+fgsm_rs", 0.8, 35.0)], tmp_path / "fig.png", "t")
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] > 200 and image.std() > 0
    with pytest.raises(EgatError, match="no runtime points"):
        plot_pareto([], tmp_path / "none.png")


def test_variant_params_apply_overrides_and_their_own_folder():
    params = params_from_dict({"studies": {"train": [], "variants": {
        "ig4": {"method": "egat", "overrides": {"explainer.name": "ig", "explainer.ig.steps": 4}}},
        "sensitivity": [], "ablation": [], "runtime": [], "case_study": {"runs": []}}})
    cell, method = variant_params(params, "ig4")
    assert method == "egat" and cell.explainer.name == "ig" and cell.explainer.ig.steps == 4
    assert cell.train.out_dir == "runs/variants" and params.explainer.name == "gradcam"
    noisy, _ = variant_params(params, "noisy_0.3")  # one per guides.sigmas level, added
    assert (noisy.guides.variant, noisy.guides.sigma) == ("noisy", 0.3)
    with pytest.raises(EgatError, match="unknown variant 'nope'; valid: "):
        variant_params(params, "nope")
    with pytest.raises(ParamsError, match="explainer.ig.steps: Input should be greater than"):
        variant_params(params_from_dict({"studies": {"variants": {
            "bad": {"method": "egat", "overrides": {"explainer.ig.steps": 0}}}, "train": [],
            "sensitivity": [], "ablation": [], "runtime": []}}), "bad")


@pytest.mark.parametrize("raw, needle", [
    ({"studies": {"train": ["nope"]}}, "studies.train='nope' is unknown; valid: "),
    ({"studies": {"ablation": ["erm", "ghost"]}}, "studies.ablation='ghost' is unknown"),
    ({"studies": {"variants": {"x": {"method": "sgd"}}}}, "studies.variants.x.method='sgd' is unknown"),
    ({"studies": {"variants": {"erm": {"method": "egat"}}}}, "may not be named like a method"),
    ({"studies": {"variants": {"a/b": {"method": "egat"}}}}, "must be letters, digits"),
])
def test_bad_studies_params_are_named(raw, needle):
    with pytest.raises(ParamsError, match=needle):
        params_from_dict(raw)


@pytest.fixture
def evals(tmp_path):
    write_eval(tmp_path, "egat", {"grass": 90, "gravel": 70, "brick": 60}, aacc=55)
    write_eval(tmp_path, "erm", {"grass": 92, "gravel": 60, "brick": 50}, aacc=5)
    write_eval(tmp_path / "variants", "ig", {"grass": 88, "gravel": 72, "brick": 66})
    write_eval(tmp_path / "variants", "wo_at", {"grass": 91, "gravel": 65, "brick": 55}, aacc=7)
    return tmp_path


def test_sensitivity_table_ranks_the_rows_ood(evals):
    results = load_study_results(evals, ["erm", "egat"])
    rows, missing = subset(results, ["egat", "ig", "golden"])
    assert missing == ["golden"] and rows.methods == ["egat", "ig"]
    cells, numbers = sensitivity_table(rows)
    assert numbers.loc["egat", "OOD mean"] == pytest.approx(65.0)
    assert numbers.loc["ig", "OOD mean"] == pytest.approx(69.0)
    assert numbers.loc["ig", "grass -> brick rank"] == 1 and numbers.loc["egat", "grass -> brick rank"] == 2
    # One seed on 10^6 test images: intervals of +-0.09, so the ranks are the values' order.
    assert cells.loc["ig", "grass -> gravel"] == "72.00 (71.91, 72.09) [1]"
    assert cells.loc["ig", "grass OOD mean"].startswith("69.00 (")


def test_variants_paired_with_egat_one_seed_has_no_interval(evals):
    from egat.report import paired_outputs, paired_table
    from egat.studies import VARIANT_BASELINE

    rows, _ = subset(load_study_results(evals, ["erm", "egat"]), ["egat", "ig", "wo_at"])
    cells, numbers = paired_outputs(paired_table(rows, VARIANT_BASELINE))
    assert list(cells.index) == ["ig", "wo_at"]
    # OOD mean: ig (72 + 66) / 2 - egat (70 + 60) / 2 = +4; wo_at 60 - 65 = -5, aAcc 7 - 55.
    assert cells.loc["ig", "grass OOD cAcc"] == "4.00, 1/1 > 0"
    assert cells.loc["wo_at", "grass OOD cAcc"] == "-5.00, 0/1 > 0"
    assert numbers.loc["wo_at", "grass ID aAcc"] == pytest.approx(-48.0)
    assert pd.isna(numbers.loc["wo_at", "grass ID aAcc std"])


def test_plot_sensitivity_draws_every_row_and_handles_no_rows(evals, tmp_path):
    _, numbers = sensitivity_table(subset(load_study_results(evals), ["egat", "ig"])[0])
    six = pd.concat([numbers.rename(index=lambda n, k=k: f"{n}{k}") for k in range(3)])
    small = cv2.imread(str(plot_sensitivity(numbers.iloc[:1], tmp_path / "one.png")))
    wide = cv2.imread(str(plot_sensitivity(six, tmp_path / "six.png")))
    assert wide.shape[1] > small.shape[1]  # the figure grows with the rows
    empty = plot_sensitivity(numbers.iloc[:0], tmp_path / "none.png")
    assert cv2.imread(str(empty)) is not None


def test_plot_sensitivity_draws_one_bar_series_per_domain_pair(evals, tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    labels, bar = [], Axes.bar
    monkeypatch.setattr(Axes, "bar", lambda ax, *a, **k: labels.append(k["label"]) or bar(ax, *a, **k))
    _, numbers = sensitivity_table(subset(load_study_results(evals), ["egat", "ig"])[0])
    assert "grass -> brick std" in numbers.columns  # seed std columns: error bars, not series
    plot_sensitivity(numbers, tmp_path / "t.png")
    assert labels == [c for c in numbers.columns if c.startswith("grass -> ") and c.count(" ") == 2]


def test_ablation_table_reports_in_domain_metrics(evals):
    rows, missing = subset(load_study_results(evals), ["erm", "wo_egl", "wo_at", "egat"])
    assert missing == ["wo_egl"] and rows.methods == ["erm", "wo_at", "egat"]
    cells, numbers = ablation_table(rows)
    assert list(numbers.loc["wo_at", ["grass cAcc", "grass aAcc", "grass Comp", "grass Suff"]]) == [
        91.0, 7.0, 30.0, 10.0]
    assert cells.loc["egat", "grass aAcc"] == "55.00 (54.90, 55.10)"


ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"embedded": {"per_class": 10}},
    "train": {"steps": 2, "batch_size": 16, "eval_every": 2, "progress": False},
    "attack": {"steps": 1},
    "explainer": {"smoothgrad": {"samples": 2}},
    "eval": {"max_examples": 8, "batch_size": 8, "attack": {"steps": 1},
             "sweep": {"attacks": ["fgsm"], "eps": [0.01], "max_examples": 8}},
    "study": {"methods": ["erm", "egat"], "train_domains": ["grass"], "seeds": [0]},
    "robust": {"transfer_fallback": "egat"},  # check (d)'s sources among the study's methods
    "studies": {"train": ["wo_at", "smoothgrad", "noisy_0.1"], "sensitivity": ["egat", "smoothgrad",
                "golden"], "ablation": ["erm", "wo_at", "egat"], "runtime": ["smoothgrad"],
                "case_study": {"runs": ["erm", "egat", "wo_at"], "images": 2}},
}


@pytest.mark.slow
def test_study_stages_end_to_end(tmp_path, monkeypatch):
    """The DVC stage list with variants (names with dots), then every stage's command in process:
    prepare, guides, train/evaluate of methods and variants, studies; MLflow in sqlite."""
    import yaml

    from egat import stages
    from egat.cli import main
    from egat.studies import run_params_of
    from egat.train import Trainer
    from tests.test_pipeline import write_params

    for item in ("dvc.yaml", "pipelines"):
        (shutil.copytree if (ROOT / item).is_dir() else shutil.copy)(ROOT / item, tmp_path / item)
    write_params(tmp_path / "params.yaml", {**TINY, "data": {**TINY["data"], "dir": "data"}})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([dvc, "init", "-q"], check=True)
    listed = subprocess.run([dvc, "stage", "list"], capture_output=True, text=True, check=True).stdout
    for stage in ("variant_train@wo_at-grass-0", "variant_evaluate@noisy_0.1-grass-0", "studies"):
        assert stage in listed, listed
    params = prepared(yaml.safe_load((tmp_path / "params.yaml").read_text()))

    def run(*args):
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--config", "params.yaml"])
            raise SystemExit(0)
        assert exit_.value.code == 0

    # One variant through the train stage's command (MLflow and its logged model); the others
    # through the same Trainer directly, into the folders the stages use.
    run("train-cell", "--variant", "wo_at", "--domain", "grass", "--seed", "0")
    for name in ("erm", "egat", "smoothgrad"):
        cell, method, _ = run_params_of(params, name)
        cell = stages.run_params(cell, method, "grass", 0)
        Trainer(cell, run_dir(cell, name, "grass", 0)).fit()
    for flag, name in [("--method", "erm"), ("--method", "egat"), ("--variant", "wo_at"),
                       ("--variant", "smoothgrad")]:
        run("evaluate-cell", flag, name, "--domain", "grass", "--seed", "0")
    assert (tmp_path / "runs/variants/wo_at/grass/seed0/best.pt").is_file()
    assert (tmp_path / "evals/variants/smoothgrad/grass/seed0/eval.json").is_file()
    run("studies")
    reports = tmp_path / "reports"
    table3 = (reports / "table3_sensitivity.md").read_text()
    assert "| smoothgrad" in table3 and "Not run yet: golden" in table3
    assert [line.split(",")[0] for line in (reports / "table4_ablation.csv").read_text().splitlines()] == [
        "method", "erm", "wo_at", "egat"]
    paired = pd.read_csv(reports / "studies_paired.csv", index_col="method")
    assert list(paired.index) == ["smoothgrad", "erm", "wo_at"]  # Table III then IV, minus egat
    assert "Not run yet: golden" in (reports / "studies_paired.md").read_text()
    floor = pd.read_csv(reports / "studies_paired_floor.csv", index_col="method")
    assert list(floor.index) == ["egat", "smoothgrad", "wo_at"]  # the same rows, minus erm
    # Differences of the same per-seed values: x - erm = (x - egat) - (erm - egat).
    column = "grass OOD cAcc"
    assert floor.loc["egat", column] == pytest.approx(-paired.loc["erm", column])
    for name in ("smoothgrad", "wo_at"):
        assert floor.loc[name, column] == pytest.approx(
            paired.loc[name, column] - paired.loc["erm", column])
    assert "minus erm (the floor)" in (reports / "studies_paired_floor.md").read_text()
    runtime = (reports / "fig3_runtime.csv").read_text()
    assert {"erm", "egat", "smoothgrad"} <= {line.split(",")[0] for line in runtime.splitlines()[1:]}
    for png in ("table3_sensitivity.png", "fig3_runtime.png", "fig4_case_study.png"):
        assert cv2.imread(str(reports / png)) is not None
    import mlflow

    runs = mlflow.search_runs(experiment_names=["egat"], filter_string="tags.stage = 'studies'")
    assert len(runs) == 1 and runs["metrics.sensitivity/smoothgrad/ood_cacc"].notna().all()
    assert runs["metrics.paired/wo_at/ood_cacc_minus_egat"].notna().all()
    assert runs["metrics.paired/wo_at/ood_cacc_minus_erm"].notna().all()


def test_runtime_points_are_steps_per_epoch_times_step_time(evals, tmp_path, monkeypatch):
    from egat.data.splits import write_splits
    from egat.studies import runtime_points

    monkeypatch.chdir(tmp_path)
    params = params_from_dict({"data": {"dir": "data"}, "train": {"batch_size": 16},
                               "study": {"methods": ["erm", "egat"]},
                               "robust": {"transfer_fallback": "egat"}})
    write_splits(params.data.splits_file, {
        "seed": 0, "fractions": [0.6, 0.2, 0.2], "domains": DOMAINS, "classes": ["a"],
        "has_masks": False, "images_root": "images",
        "splits": {d: {"train": [f"{d}/a/{i}.png" for i in range(40)], "val": [], "test": []}
                   for d in DOMAINS}})
    for root, name, step in [("runs", "erm", 0.5), ("runs", "egat", 2.0), ("runs/variants", "wo_at", 1.0)]:
        path = tmp_path / root / name / "grass" / "seed0" / "train_timing.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"time_per_step_s": step, "train_time_s": 300 * step}))
    results = load_study_results(evals)
    points, table = runtime_points(params, results, ["erm", "egat", "wo_at", "ig"])
    # 40 training images at batch 16: 3 steps per epoch; `ig` has no timing file and is left out.
    assert points == [Point("erm", 1.5, 5.0), Point("egat", 6.0, 55.0), Point("wo_at", 3.0, 7.0)]
    assert [p.label for p in pareto_front(points)] == ["erm", "wo_at", "egat"]
    assert list(table.index) == ["erm", "egat", "wo_at"]

"""`python -m benchmarks` with tiny settings: the JSON/markdown shape, targets, and a missing
benchmark-only package (blocked on the import path of a real subprocess) turning into a note."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--repeats", "1", "--warmup", "0", "--batch", "4", "--threads", "1",
        "--set", "attack.steps=1", "--set", "eval.attack.steps=2",
        "--set", "eval.faithfulness.ks=[5,50]", "--set", "data.dir=/nonexistent/data"]


def test_benchmark_writes_the_table_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "reports" / "benchmarks"
    assert main([*TINY, "--only", "step", "gradcam", "attacks", "comp/suff", "data",
                 "--methods", "erm", "pgd_at", "egat", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["section"], r["name"]): r for r in report["rows"]}
    assert report["conditions"]["batch"] == 4 and report["conditions"]["repeats"] == 1
    assert {n for s, n in rows if s == "step"} == {"erm", "pgd_at", "egat", "egat / pgd_at"}
    assert rows[("step", "erm")]["ratio"] == 1.0
    target = rows[("step", "egat / pgd_at")]
    assert target["target"] == "<= 1.2" and target["met"] == (target["ratio"] <= 1.2)
    for name in ("ours autograd", "captum LayerGradCam", "pytorch-grad-cam"):
        assert rows[("gradcam", name)]["diff"] < 1e-5  # the same maps
    floor = rows[("gradcam", "ours closed form")]  # one repeat: the range is the ratio itself
    assert floor["versus"] == "model forward alone" and floor["target"] == "<= 1.1x the forward pass"
    assert floor["ratio_low"] == floor["ratio"] == floor["ratio_high"]
    assert floor["met"] == (floor["ratio"] <= 1.1)
    assert rows[("attacks", "torchattacks PGD-2")]["diff"] < 1e-6
    assert rows[("attacks", "torchattacks FGSM")]["diff"] < 1e-6
    assert {n for s, n in rows if s == "comp/suff"} == {"k=5%", "k=50%", "all k [5.0, 50.0]"}
    assert all(r["value"] > 0 for r in report["rows"] if r["section"] == "comp/suff")
    assert rows[("data", "loader vs in-memory")]["note"].startswith("not run: /nonexistent/data")
    markdown = out.with_suffix(".md").read_text()
    assert "| step | egat / pgd_at |" in markdown and markdown in capsys.readouterr().out + "\n"
    assert markdown.count("\n|") == len(report["rows"]) + 2  # header, rule, one line per row


@pytest.mark.slow  # a fresh interpreter importing torch, captum, cv2: ~10 s on 2 busy cores
def test_a_missing_benchmark_extra_is_a_note_and_the_rest_runs(tmp_path):
    blocked = tmp_path / "blocked"
    for package in ("pytorch_grad_cam", "torchattacks"):  # shadows the installed package
        (blocked / package).mkdir(parents=True)
        (blocked / package / "__init__.py").write_text(f"raise ImportError('{package} blocked')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(ROOT)])}
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", *TINY, "--only", "gradcam", "attacks",
         "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert rows["pytorch-grad-cam"]["note"].startswith("not run: grad-cam is not installed")
    assert rows["torchattacks"]["note"].startswith("not run: torchattacks is not installed")
    assert rows["captum LayerGradCam"]["diff"] < 1e-5  # the rest of the table ran
    assert "pip install -e '.[bench]'" in proc.stdout


def test_ratios_pair_calls_of_one_round_and_a_target_needs_the_whole_range():
    from benchmarks.timing import Spread, Timings, all_of

    timings = Timings({"a": [2.0, 6.0, 3.0], "b": [1.0, 2.0, 3.0]})
    ratio = timings.ratio("a", "b")  # per round: 2, 3, 1 (not median(a) / median(b) = 1.5)
    assert (ratio.median, ratio.low, ratio.high) == (2.0, 1.0, 3.0)
    assert timings.median("a") == 3.0 and str(ratio) == "2.00 [1.00, 3.00]"
    assert ratio.at_most(3.0) is True and ratio.at_most(0.5) is False
    assert ratio.at_most(1.2) is None  # straddles: undecided, neither met nor NOT met
    assert Spread(1.0, 0.9, 1.1).at_least(0.8) is True and Spread(1.0, 0.9, 1.1).at_least(1.0) is None
    assert all_of(True, None) is None and all_of(None, False) is False and all_of(True) is True


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--repeats", "0"])
    assert exc.value.code == 2 and "--repeats must be >= 1" in capsys.readouterr().err


def test_selection_audit_reads_each_rules_pick_from_the_validation_history(tmp_path):
    import mlflow

    from benchmarks.selection_audit import audit, best_step

    assert best_step([(100, 5.0), (300, 7.0), (200, 7.0)]) == 200  # a tie keeps the earlier step
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("egat")
    for key, acc, free in [("train/erm/grass/seed0", [34, 82, 84], [19, 31, 42]),
                           ("train/egat/grass/seed0", [38, 88, 87], [31, 40, 66])]:
        run = client.create_run(exp, tags={"stage": "train", "egat_key": key})
        for step, a, f in zip((100, 200, 300), acc, free):
            client.log_metric(run.info.run_id, "val/acc", a, step=step)
            client.log_metric(run.info.run_id, "val/cue_free_acc", f, step=step)
        client.set_terminated(run.info.run_id)
    rows = audit(uri).set_index("run")
    assert rows.loc["train/erm/grass/seed0", ["val", "cue_free_val", "last", "agree"]].tolist() == [
        300, 300, 300, True]
    assert rows.loc["train/egat/grass/seed0", ["val", "cue_free_val", "last", "agree"]].tolist() == [
        200, 300, 300, False]


# ----------------------------------------------------------------- study breakdown


def test_breakdown_charges_each_stage_until_the_next_and_splits_the_training_loop(tmp_path):
    from benchmarks.breakdown import loop_seconds, stage_times, table

    log = ["0.000 Running stage 'prepare':", "1.500 > python pipelines/prepare.py",
           "4.000 Running stage 'train@erm-grass-0':", "9.000 Running stage 'train@erm-grass-1':",
           "15.000 Stage 'guides' didn't change, skipping",
           "16.000 Running stage 'variant_train@oracle-grass-0':",
           "20.000 [end]"]
    stages = stage_times(log)
    assert stages == {"prepare": 4.0, "train@erm-grass-0": 5.0, "train@erm-grass-1": 7.0,
                      "variant_train@oracle-grass-0": 4.0}
    for rel, seconds in (("erm/grass/seed0", 3.0), ("erm/grass/seed1", 4.5),
                         ("variants/oracle/grass/seed0", 2.0)):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "train_timing.json").write_text(f'{{"train_time_s": {seconds}}}')
    loops = loop_seconds(tmp_path)
    assert loops == {("train", "erm"): 7.5, ("variant_train", "oracle"): 2.0}
    text = table(stages, loops, {"interpreter": 0.1})
    assert "| train | erm | 2 | 12 | 60 % | 8 | 4 |" in text  # 12 s wall, 7.5 s loop, 4.5 s rest
    assert "| **all** | | 4 | 20 | 100 % | | |" in text


def test_breakdown_splits_evaluation_into_its_parts(tmp_path):
    from benchmarks.breakdown import eval_part_seconds, eval_table, robust_seconds

    for rel, pgd in (("erm/grass/seed0", 2.0), ("variants/oracle/grass/seed0", 4.0)):
        (tmp_path / rel).mkdir(parents=True)
        timing = {"clean": 1.0, "pgd": pgd, "sweep": 3.0, "total": pgd + 6.0}
        (tmp_path / rel / "eval_timing.json").write_text(json.dumps(timing))
    parts = eval_part_seconds(tmp_path)
    assert parts == {"clean": 2.0, "pgd": 6.0, "sweep": 6.0, "total": 18.0}
    text = eval_table(parts, study_seconds=36.0)
    assert "| pgd | 6 | 33 % | 17 % |" in text
    assert "| data and bookkeeping | 4 | 22 % | 11 % |" in text  # 18 - (2 + 6 + 6)
    assert "| **all evaluation** | 18 | 100 % | 50 % |" in text
    assert "| robustness (AutoAttack, checklist) | 0 | 0 % | 0 % |" in text
    assert "No evaluation timing" in eval_table({}, 10.0)
    # the evaluate stage's robustness checks count as evaluation
    (tmp_path / "erm/grass/seed0/robust_timing.json").write_text('{"aa": 4.0, "total": 6.0}')
    text = eval_table(parts, 36.0, robust_seconds(tmp_path))
    assert "| robustness (AutoAttack, checklist) | 6 | 25 % | 17 % |" in text
    assert "| **all evaluation** | 24 | 100 % | 67 % |" in text


def test_breakdown_refuses_a_log_without_stages(tmp_path):
    from benchmarks.breakdown import main

    log = tmp_path / "b.log"
    log.write_text("0.0 Stage 'prepare' didn't change, skipping\n1.0 [end]\n")
    with pytest.raises(SystemExit, match="records no 'Running stage' line"):
        main(["--log", str(log), "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--log", str(tmp_path / "none.log")])


def test_training_attack_section_times_each_attack_against_pgd10(tmp_path):
    out = tmp_path / "bench"
    assert main([*TINY, "--only", "train-attack", "--out", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {f"{m} {a}" for m in ("pgd_at", "egat")
                         for a in ("PGD-10", "PGD-3", "PGD-2", "FGSM-RS")}
    for name, row in rows.items():
        assert row["versus"] == f"{name.split()[0]} PGD-10" and row["value"] > 0
    assert rows["egat PGD-10"]["ratio"] == rows["pgd_at PGD-10"]["ratio"] == 1.0


def test_sweep_nesting_refuses_a_folder_without_runs_and_zero_repeats(tmp_path, capsys):
    from benchmarks.sweep_nesting import main

    for argv, needle in ((["--runs", str(tmp_path)], "no best.pt below it; train the study first"),
                         (["--repeats", "0"], "--repeats=0: must be >= 1")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and needle in capsys.readouterr().err

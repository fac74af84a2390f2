"""`python -m benchmarks.breakdown`: where the default study's wall time goes, per stage kind.

Runs `dvc repro` (extra arguments go to it) and stamps every line DVC prints; a stage's wall time
runs from its "Running stage" line to the next stage's (so DVC's own bookkeeping between stages is
charged to the stage before it). The table sums stages per kind and, for training, per method, and
splits a training stage into its loop (the run's train_timing.json) and the rest (interpreter and
import start-up, data loading, checkpoints, MLflow). The import start-up of a process that only
trains or only evaluates is measured apart (median of 3 fresh interpreters), and evaluation is
split into its parts (clean, counterfactual, PGD, Comp/Suff, explanations, sweep: each run's
eval_timing.json, egat.evaluation.PartClock) and the robustness checks the evaluate stage runs
after them (robust_timing.json). ``--log`` re-reads the stamped log of an earlier run
instead of running DVC. Every later speed change is a ratio
against this table (issue: throughput).

    python -m benchmarks.breakdown                 # dvc repro, then the table
    python -m benchmarks.breakdown --log reports/breakdown.log
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from egat import io
from egat.evaluation import PartClock
from egat.run.layout import EVAL_TIMING, ROBUST_TIMING, TIMING, VARIANTS, cell_files

STAGE_LINE = re.compile(r"Running stage '([^']+)'")
# What a stage process imports before it trains / evaluates (egat/stages.py's lazy imports).
STARTUP_IMPORTS = {
    "train": "import egat.stages, egat.train.launch, egat.train.trainer, egat.data, "
             "egat.run.checkpoint",
    "evaluate": "import egat.stages, egat.evaluation, egat.robustness, egat.run.checkpoint, "
                "egat.run.device",
}


def stamp_dvc_repro(args: list[str], log: Path) -> None:
    """Run ``dvc repro *args``, echo its output and write it to ``log`` as "<seconds> <line>"."""
    start = time.perf_counter()
    with io.atomic_path(log) as tmp, tmp.open("w") as out, subprocess.Popen(
        ["dvc", "repro", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        bufsize=1,
    ) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            out.write(f"{time.perf_counter() - start:.3f} {line}")
        out.write(f"{time.perf_counter() - start:.3f} [end]\n")
    if proc.returncode:
        raise SystemExit(f"error: dvc repro exited with {proc.returncode}; see {log}")


def stage_times(lines: list[str]) -> dict[str, float]:
    """{stage name: wall seconds} from a stamped log (each line "<seconds> <text>")."""
    marks: list[tuple[str | None, float]] = []
    for line in lines:
        seconds, _, text = line.partition(" ")
        match = STAGE_LINE.search(text)
        if match or text.startswith("[end]"):
            marks.append((match.group(1) if match else None, float(seconds)))
    return {name: round(marks[i + 1][1] - at, 3)
            for i, (name, at) in enumerate(marks[:-1]) if name is not None}


def stage_kind(name: str) -> tuple[str, str]:
    """("train", "erm") for "train@erm-grass-0"; (name, "") for an unmatrixed stage."""
    kind, _, item = name.partition("@")
    return kind, item.split("-")[0]


def loop_seconds(runs_root: Path) -> dict[tuple[str, str], float]:
    """Training-loop seconds summed per (stage kind, method) from every run's timing file."""
    out: dict[tuple[str, str], float] = defaultdict(float)
    for kind, root in (("train", runs_root), ("variant_train", runs_root / VARIANTS)):
        for cell in cell_files(root, TIMING):
            out[kind, cell.name] += json.loads(cell.path.read_text())["train_time_s"]
    return out


def eval_part_seconds(evals_root: Path) -> dict[str, float]:
    """Evaluation seconds per part (and ``total``) summed over every run's timing file."""
    out: dict[str, float] = defaultdict(float)
    for root in (evals_root, evals_root / VARIANTS):
        for cell in cell_files(root, EVAL_TIMING):
            for part, seconds in json.loads(cell.path.read_text()).items():
                out[part] += seconds
    return dict(out)


def robust_seconds(evals_root: Path) -> float:
    """Seconds of the robustness checks (AutoAttack and the checklist) summed over every run."""
    return sum(json.loads(cell.path.read_text())["total"]
               for cell in cell_files(evals_root, ROBUST_TIMING))


def eval_table(parts: dict[str, float], study_seconds: float, robust: float = 0.0) -> str:
    """Evaluation time per part and of the robustness checks (which the evaluate stage runs
    after the evaluation), as a share of all evaluation and of the whole study."""
    if not parts.get("total", 0.0):
        return "No evaluation timing found (evals/**/eval_timing.json)."
    total = parts["total"] + robust
    rows = ["| evaluation part | s | share of evaluation | share of the study |",
            "|---|---:|---:|---:|"]
    named = {part: parts.get(part, 0.0) for part in PartClock.PARTS}
    named["data and bookkeeping"] = parts["total"] - sum(named.values())
    named["robustness (AutoAttack, checklist)"] = robust
    for part, seconds in (*named.items(), ("**all evaluation**", total)):
        rows.append(f"| {part} | {seconds:.0f} | {100 * seconds / total:.0f} % "
                    f"| {100 * seconds / (study_seconds or 1.0):.0f} % |")
    return "\n".join(rows)


def startup_seconds(python: str = sys.executable, repeats: int = 3) -> dict[str, float]:
    """Median wall seconds of a fresh interpreter importing what each stage kind needs."""
    out = {}
    for kind, code in {"interpreter": "pass", **STARTUP_IMPORTS}.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run([python, "-c", code], check=True)
            times.append(time.perf_counter() - t0)
        out[kind] = statistics.median(times)
    return out


def table(stages: dict[str, float], loops: dict[tuple[str, str], float],
          startup: dict[str, float]) -> str:  # fmt: skip
    total = sum(stages.values()) or 1.0
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for name, seconds in stages.items():
        kind, method = stage_kind(name)
        groups[kind, method if kind.endswith("train") else ""].append(seconds)
    rows = ["| stage kind | method | stages | wall s | share | training loop s | rest s |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for (kind, method), times in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        wall = sum(times)
        loop = loops.get((kind, method))
        extra = f"{loop:.0f} | {wall - loop:.0f}" if loop is not None else " | "
        rows.append(f"| {kind} | {method} | {len(times)} | {wall:.0f} | {100 * wall / total:.0f} % "
                    f"| {extra} |")
    rows.append(f"| **all** | | {len(stages)} | {total:.0f} | 100 % | | |")
    rows.append("")
    rows.append("Import start-up of one stage process (median of 3, s): "
                + ", ".join(f"{k} {v:.2f}" for k, v in startup.items()))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.breakdown",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--log", type=Path, default=None, help="re-read this stamped log; no dvc repro")
    ap.add_argument("--runs", type=Path, default=Path("runs"),
                    help="the runs folder (train.out_dir), read for the training-loop times")
    ap.add_argument("--evals", type=Path, default=Path("evals"),
                    help="the evaluations folder, read for the time of each evaluation part")
    ap.add_argument("--out", type=Path, default=Path("reports/breakdown"),
                    help="writes <out>.log and <out>.md")
    args, dvc_args = ap.parse_known_args(argv)
    log = args.log
    if log is None:
        log = args.out.with_suffix(".log")
        stamp_dvc_repro(dvc_args, log)
    elif not log.is_file():
        raise SystemExit(f"error: --log {log} does not exist (run without --log to make one)")
    stages = stage_times(log.read_text().splitlines())
    if not stages:
        raise SystemExit(f"error: {log} records no 'Running stage' line: every stage was cached "
                         "(run `dvc repro --force` to time them)")
    text = table(stages, loop_seconds(args.runs), startup_seconds())
    text += "\n\n" + eval_table(eval_part_seconds(args.evals), sum(stages.values()),
                                 robust_seconds(args.evals))
    io.write_text(args.out.with_suffix(".md"), text + "\n")
    print(text)


if __name__ == "__main__":
    main()

"""`python -m benchmarks`: EGAT's costs measured side by side against its peers, one table.

Sections (``--only`` picks some):
  step       every registered method's training step relative to ERM; EGAT / PGD-AT (<= 1.2)
  gradcam    our Grad-CAM (closed form) vs the bare forward pass, its physical floor (<= 1.1x), and
             vs our autograd path, captum LayerGradCam and pytorch-grad-cam: max abs difference of
             the normalised maps (<= 1e-5), their time relative to ours
  attacks    our FGSM / PGD vs torchattacks, no random start: ours at least as fast, images
             within 1e-6
  comp/suff  Comp/Suff throughput (images/s) for every k bin of eval.faithfulness.ks
  data       train.method's step with the real loader vs on in-memory tensors (overhead <= 5%)
  train-attack  PGD-AT's and EGAT's step with PGD-3, PGD-2 and FGSM-RS relative to PGD-10 (the
             CPU preset's choice, docs/results/v5_cpu_attack_check.md)

The machine is shared and noisy: timings are medians of round-robin repeats of this process's CPU
time (``--clock cpu``, one thread by default; ``--clock wall`` on a quiet machine), and only ratios
measured in the same run mean anything. Every ratio is the median of per-round ratios with their
range (min, max) beside it, and a target counts as met only when the whole range meets it (else
NOT met, or undecided when the range straddles it: rerun with more --repeats). Writes <out>.json and <out>.md (atomically) and prints the
table. A benchmark-only package (grad-cam, torchattacks: `pip install -e '.[bench]'`) that is
missing turns its row into a note; the rest still runs.

    python -m benchmarks                           # everything, params.yaml, 10 repeats
    python -m benchmarks --only step --methods erm pgd_at egat --repeats 20
    python -m benchmarks --only gradcam attacks --repeats 3 --batch 16
    python -m benchmarks --only data --data-dir /path/to/prepared/data
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time

import torch

from benchmarks import timing
from benchmarks.timing import Row
from egat import io
from egat.build import load_params
from egat.errors import EgatError
from egat.models import build_model

SECTIONS = ("step", "gradcam", "attacks", "comp/suff", "data", "train-attack")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--repeats", type=int, default=10, help="timed calls of each thing (medians)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    ap.add_argument("--methods", nargs="+", default=None, help="step: default every method")
    ap.add_argument("--batch", type=int, default=64, help="synthetic batch (step, gradcam, ...)")
    ap.add_argument("--size", type=int, default=32, help="synthetic image size in pixels")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: this process's CPU time (robust on shared cores; 1 thread); wall")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data-dir", default=None, help="data: a prepared data.dir")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="params override, e.g. attack.steps=5 (repeatable)")
    ap.add_argument("--out", default="reports/benchmarks", help="writes <out>.json and <out>.md")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch < 2:
        ap.error("--repeats must be >= 1, --warmup >= 0 and --batch >= 2")
    return args


def run(args: argparse.Namespace) -> list[Row]:
    from benchmarks.attacks import attack_rows
    from benchmarks.explain import gradcam_rows
    from benchmarks.faithfulness import throughput_rows
    from benchmarks.steps import loader_step, method_steps, synthetic_batch, training_attack_steps

    torch.set_num_threads(args.threads)
    timing.use_clock(args.clock)
    torch.manual_seed(0)
    overrides = list(args.overrides) + ([f"data.dir={args.data_dir}"] if args.data_dir else [])
    params = load_params(args.params, overrides)
    batch = synthetic_batch(args.batch, args.size)
    x, y = batch["image"], batch["label"]
    model = build_model(params.model.name, 10, channels_last=params.model.channels_last).eval()
    rows: list[Row] = []
    r, w = args.repeats, args.warmup
    for section in args.only:
        print(f"... {section}", file=sys.stderr, flush=True)
        if section == "step":
            rows += method_steps(params, args.methods, batch, r, w)
        elif section == "gradcam":
            rows += gradcam_rows(model, x, y, r, w)
        elif section == "attacks":
            rows += attack_rows(model, x, y, params.eval.attack, r, w)
        elif section == "comp/suff":
            faith = params.eval.faithfulness
            rows += throughput_rows(model, x, faith.ks, faith.baseline, r, w)
        elif section == "data":
            rows += loader_step(params, r, w)
        elif section == "train-attack":
            rows += training_attack_steps(params, batch, r, w)
    return rows


def fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def ratio_text(row: Row) -> str:
    if row.ratio is None:
        return ""
    if row.ratio_low is None:
        return f"{row.ratio:.2f}"
    return f"{row.ratio:.2f} [{row.ratio_low:.2f}, {row.ratio_high:.2f}]"


def table(rows: list[Row]) -> str:
    """The markdown table (also what the command prints)."""
    lines = ["| section | row | value | unit | ratio [min, max] | vs | max abs diff | target | status "
             "| note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row.section} | {row.name} | {fmt(row.value, '.4g')} | {row.unit} | "
            f"{ratio_text(row)} | {row.versus} | {fmt(row.diff, '.1e')} | {row.target} | "
            f"{row.status} | {row.note} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows = run(args)
    except EgatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    conditions = {
        "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "threads": args.threads, "clock": args.clock, "batch": args.batch,
        "size": args.size, "repeats": args.repeats, "warmup": args.warmup,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "overrides": args.overrides,
    }
    text = table(rows)
    header = (f"Benchmarks ({', '.join(args.only)}): batch {args.batch} x {args.size} px, "
              f"{args.threads} threads, {args.clock} time, medians of {args.repeats} round-robin "
              "repeats, "
              f"torch {torch.__version__}, {conditions['cuda'] or 'CPU'}\n\n")
    io.write_json(f"{args.out}.json", {"conditions": conditions,
                                       "rows": [dataclasses.asdict(r) for r in rows]})
    io.write_text(f"{args.out}.md", header + text)
    print(header + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Our FGSM and PGD vs torchattacks at identical settings (no random start, so the adversarial
images must agree), same model in eval mode and batch."""

from __future__ import annotations

import torch

from benchmarks.timing import Row, all_of, missing_extra, round_robin
from egat.attacks import FGSM, PGD
from egat.config import AttackParams

IMAGE_TOL = 1e-6


def attack_rows(model, x: torch.Tensor, y: torch.Tensor, attack: AttackParams, repeats: int,
                warmup: int) -> list[Row]:
    try:
        import torchattacks
    except ImportError as exc:
        return [missing_extra("attacks", "torchattacks", "torchattacks", exc)]
    eps, alpha, steps = attack.eps, attack.alpha, attack.steps
    pairs = {
        "FGSM": (FGSM(model, eps), torchattacks.FGSM(model, eps=eps)),
        f"PGD-{steps}": (PGD(model, eps, alpha, steps, random_start=False),
                         torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps,
                                          random_start=False)),
    }
    rows = []
    for name, (ours, theirs) in pairs.items():
        timings = round_robin({"ours": lambda: ours(x, y), "theirs": lambda: theirs(x, y)},
                              repeats, warmup)
        diff = float((ours(x, y) - theirs(x, y)).abs().max())
        speedup = timings.ratio("theirs", "ours")
        is_pgd = name.startswith("PGD")
        rows.append(Row("attacks", f"ours {name}", timings.median("ours") * 1e3, "ms",
                        note=f"eps {eps:.4f}"))
        rows.append(Row(
            "attacks", f"torchattacks {name}", timings.median("theirs") * 1e3, "ms", f"ours {name}",
            diff=diff,
            target=("ours at least as fast, " if is_pgd else "") + f"images within {IMAGE_TOL:g}",
            met=all_of(speedup.at_least(1.0) if is_pgd else True, diff <= IMAGE_TOL),
        ).with_spread(speedup))
    return rows

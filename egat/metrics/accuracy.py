"""Clean and adversarial top-1 accuracy (cAcc, aAcc; docs/method.md, Metrics)."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from egat.metrics.stream import accumulate
from egat.models.mode import model_mode

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image (B,) bool: is the model's top-1 class on ``images`` the label? (No gradients;
    the model is used in its current mode.)"""
    with torch.no_grad():
        return model(images).argmax(1) == labels


def robust(model: nn.Module, attack: AttackFn, images: torch.Tensor, labels: torch.Tensor,
           clean_correct: torch.Tensor) -> torch.Tensor:
    """Per image (B,) bool, aAcc's score: right on the clean image and on ``attack``'s example.

    AutoAttack's convention (Croce & Hein 2020): an image the model already misclassifies counts
    as not robust, so the attack runs only on the ``clean_correct`` ones (the rest is saved work).
    """
    out = torch.zeros_like(clean_correct)
    todo = clean_correct.nonzero().flatten()
    if len(todo):
        out[todo] = correct(model, attack(images[todo], labels[todo]), labels[todo])
    return out


def evaluate_accuracy(
    model: nn.Module,
    loader: Iterable[Mapping[str, object]],
    device: torch.device | str,
    attacks: Mapping[str, AttackFn] | None = None,
    max_examples: int = 0,
    survivors_of: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Top-1 accuracy (%) on clean images and under each attack, in one pass over ``loader``.

    Args:
        model: on ``device``; evaluated in eval mode (its previous modes are restored afterwards).
        loader: yields dicts with "image" (B, 3, H, W) in [0, 1] and "label" (B,) int64.
        attacks: name -> ``attack(x, y) -> x_adv`` (e.g. a PGD and an eps sweep); may be empty.
            Each runs on the images the model gets right clean (:func:`robust`).
        max_examples: evaluate only the first N images (0 = all).
        survivors_of: attack name -> an earlier attack's name: it runs only on the images still
            right under that one, so an image counts as robust only if it survives both (a
            sweep over eps nested this way scores the per-image worst case over smaller eps).

    Returns:
        ``{"clean": cAcc, <attack name>: aAcc, ...}`` in percent.

    Example::

        evaluate_accuracy(model, test_loader, "cpu", {"pgd": PGD(model, 8 / 255, 2 / 255, 10)})
        # {"clean": 54.4, "pgd": 22.0}
    """
    attacks, survivors_of = dict(attacks or {}), dict(survivors_of or {})
    if "clean" in attacks:
        raise ValueError("evaluate_accuracy: 'clean' is reserved for the clean accuracy")
    names = list(attacks)
    for name, earlier in survivors_of.items():
        if name not in attacks or earlier not in names[: names.index(name)]:
            raise ValueError(f"evaluate_accuracy: survivors_of[{name!r}] = {earlier!r} must name "
                             f"an attack listed before {name!r} (attacks: {names})")

    def score(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        clean = correct(model, images, labels)
        scores = {"clean": clean}
        for name, attack in attacks.items():
            still_right = scores[survivors_of.get(name, "clean")]
            scores[name] = robust(model, attack, images, labels, still_right)
        return scores

    with model_mode(model, "eval"):
        sums = accumulate(loader, device, score, max_examples)
    if not sums.counts.get("clean"):
        raise ValueError("evaluate_accuracy: the loader yielded no examples")
    return {name: 100.0 * sums.sums[name] / sums.counts[name] for name in sums.sums}

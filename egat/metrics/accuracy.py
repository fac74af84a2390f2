"""Clean and adversarial top-1 accuracy (cAcc, aAcc; docs/method.md, Metrics), streamed over a DataLoader.

Also home of :func:`iterate_batches`, the batch stream every metric in this package reads.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from egat.models.mode import model_mode

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def iterate_batches(
    loader: Iterable[Mapping[str, object]], device: torch.device | str, max_examples: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's dict batches with their tensors on ``device``, at most ``max_examples`` images
    in all (0 = every batch; the last batch is cut to fit). Non-tensor entries are dropped.
    """
    seen = 0
    for batch in loader:
        take = len(batch["image"])
        if max_examples:
            take = min(take, max_examples - seen)
        yield {
            key: value[:take].to(device, non_blocking=True)
            for key, value in batch.items()
            if isinstance(value, torch.Tensor)
        }
        seen += take
        if max_examples and seen >= max_examples:
            return


def evaluate_accuracy(
    model: nn.Module,
    loader: Iterable[Mapping[str, object]],
    device: torch.device | str,
    attacks: Mapping[str, AttackFn] | None = None,
    max_examples: int = 0,
) -> dict[str, float]:
    """Top-1 accuracy (%) on clean images and under each attack, in one pass over ``loader``.

    Args:
        model: on ``device``; evaluated in eval mode (its previous modes are restored afterwards).
        loader: yields dicts with "image" (B, 3, H, W) in [0, 1] and "label" (B,) int64.
        attacks: name -> ``attack(x, y) -> x_adv`` (e.g. a PGD and an eps sweep); may be empty.
        max_examples: evaluate only the first N images (0 = all).

    Returns:
        ``{"clean": cAcc, <attack name>: aAcc, ...}`` in percent.

    Example::

        evaluate_accuracy(model, test_loader, "cpu", {"pgd": PGD(model, 8 / 255, 2 / 255, 10)})
        # {"clean": 54.4, "pgd": 22.0}
    """
    attacks = dict(attacks or {})
    if "clean" in attacks:
        raise ValueError("evaluate_accuracy: 'clean' is reserved for the clean accuracy")
    correct = dict.fromkeys(["clean", *attacks], 0)
    total = 0
    with model_mode(model, "eval"):
        for batch in iterate_batches(loader, device, max_examples):
            images, labels = batch["image"], batch["label"]
            with torch.no_grad():
                correct["clean"] += int((model(images).argmax(1) == labels).sum())
            for name, attack in attacks.items():
                adversarial = attack(images, labels)
                with torch.no_grad():
                    correct[name] += int((model(adversarial).argmax(1) == labels).sum())
            total += len(labels)
    if total == 0:
        raise ValueError("evaluate_accuracy: the loader yielded no examples")
    return {name: 100.0 * count / total for name, count in correct.items()}


def clean_accuracy(
    model: nn.Module,
    loader: Iterable[Mapping[str, object]],
    device: torch.device | str,
    max_examples: int = 0,
) -> float:
    """cAcc (%): top-1 accuracy on clean images. See :func:`evaluate_accuracy`."""
    return evaluate_accuracy(model, loader, device, max_examples=max_examples)["clean"]


def adversarial_accuracy(
    model: nn.Module,
    loader: Iterable[Mapping[str, object]],
    attack: AttackFn,
    device: torch.device | str,
    max_examples: int = 0,
) -> float:
    """aAcc (%): top-1 accuracy on ``attack(x, y)``. See :func:`evaluate_accuracy`."""
    return evaluate_accuracy(model, loader, device, {"adversarial": attack}, max_examples)[
        "adversarial"
    ]

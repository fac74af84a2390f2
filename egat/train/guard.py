"""Catastrophic-overfitting guard for fast adversarial training (Wong et al. 2020, section 5).

FGSM-based training can collapse within a few steps: accuracy under PGD falls to ~0 while clean
accuracy rises. The guard measures accuracy under ``eval.attack`` on a fixed validation batch every
``train.guard.every`` steps; the Trainer keeps the checkpoint of the best guard accuracy as best.pt
(Wong et al.'s early stopping) and the guard warns when accuracy falls ``collapse_drop`` points
below that best.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset, default_collate

from egat.build import build_attack
from egat.config import Params
from egat.data.subsets import stratified_indices
from egat.models.mode import model_mode
from egat.run.layout import BEST
from egat.seeding import seeded_scope

log = logging.getLogger(__name__)


class OverfitGuard:
    """Accuracy (percent) under ``params.eval.attack`` on ``guard.examples`` images of ``val_ds``
    (a stratified subset, seeded by ``data.split_seed``); the attack's random start is seeded by ``train.seed`` on a forked RNG, so every
    check sees the same attack and training's RNG stream is untouched.

    Example::

        guard = OverfitGuard(params, val_ds, device)
        if guard.due(step):
            acc = guard.accuracy(model)
            guard.warn_if_collapsed(acc, best_acc, step)
    """

    def __init__(self, params: Params, val_ds: Dataset, device: torch.device):
        self.params = params
        self.cfg = params.train.guard
        rows = stratified_indices(val_ds.labels, self.cfg.examples, params.data.split_seed)
        batch = default_collate([val_ds[int(i)] for i in rows])
        self.images = batch["image"].to(device)
        self.labels = batch["label"].to(device)
        self.device = device

    def due(self, step: int) -> bool:
        return step % self.cfg.every == 0 or step == self.params.train.steps

    def accuracy(self, model: torch.nn.Module) -> float:
        with seeded_scope(self.params.train.seed, self.device), model_mode(model, "eval"):
            x_adv = build_attack(model, self.params.eval.attack)(self.images, self.labels)
            with torch.no_grad():
                correct = (model(x_adv).argmax(1) == self.labels).float().mean()
        return float(correct) * 100

    def collapsed(self, accuracy: float, best: float) -> bool:
        return best - accuracy >= self.cfg.collapse_drop

    def warn_if_collapsed(self, accuracy: float, best: float, step: int) -> bool:
        """Log a warning (and return True) when ``accuracy`` has collapsed below ``best``."""
        if not self.collapsed(accuracy, best):
            return False
        log.warning(
            "catastrophic overfitting at step %d: accuracy under %s on the guard batch fell to "
            "%.1f%% from a best of %.1f%%; %s keeps the best model", step,
            self.params.eval.attack.name, accuracy, best, BEST,
        )
        return True

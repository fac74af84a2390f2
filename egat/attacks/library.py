"""Attacks implemented by torchattacks (https://github.com/Harry24k/adversarial-attacks-pytorch),
behind our :class:`Attack` interface: our eps, model-mode policy and seeding.

torchattacks is a runtime dependency of evaluation but goes in with ``pip install --no-deps``
(Makefile, pyproject.toml): its metadata pins ``requests~=2.25`` although no module of it imports
requests, and mlflow needs a newer one.
"""

from __future__ import annotations

import torch
from torch import nn

from egat.attacks.base import Attack
from egat.errors import EgatError
from egat.models.mode import ModelMode
from egat.seeding import seeded_scope

INSTALL = "pip install --no-deps 'torchattacks>=3.5'"


def import_torchattacks():
    """The torchattacks module, or one error line saying how to install it."""
    try:
        import torchattacks
    except ImportError as exc:
        raise EgatError(
            f"the AutoAttack attacks (apgd, apgdt, square, autoattack) need torchattacks, which "
            f"is not importable ({exc}); install it with: {INSTALL}  (`make setup` does)"
        ) from None
    return torchattacks


class LibraryAttack(Attack):
    """Base of the torchattacks-backed attacks: :meth:`build` returns the library's attack;
    ``restarts`` random restarts, per image the best kept.

    torchattacks reseeds torch's global RNG with a fixed seed on every call; here each call draws
    that seed from the caller's RNG (one number, as PGD's random start draws its own) and runs on a
    forked RNG, so the attacks are reproducible under ``seeded_scope`` and the library's reseeding
    never resets the caller's random stream. As in AutoAttack,
    an image the attack does not fool comes back unchanged: accuracy under attack is what these
    attacks are for, not explanations of perturbed images.
    """

    perturbs_every_image = False

    def __init__(self, model: nn.Module, eps: float, restarts: int = 1,
                 model_mode: ModelMode = "eval"):
        super().__init__(model, eps, model_mode)
        if restarts < 1:
            raise ValueError(f"{type(self).__name__}: restarts must be >= 1, got {restarts}")
        self.restarts = int(restarts)
        self._torchattacks = import_torchattacks()

    def build(self, num_classes: int):
        raise NotImplementedError

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seed = int(torch.randint(2**31 - 1, ()))
        with torch.no_grad():
            num_classes = self.model(x[:1]).shape[1]
        impl = self.build(num_classes)
        # torchattacks puts the model in eval mode unless told otherwise; our mode is already set.
        training = self.model_mode == "train"
        impl.set_model_training_mode(training, batchnorm_training=training, dropout_training=training)
        impl.seed = seed
        with seeded_scope(seed, x.device):
            return impl(x, y)

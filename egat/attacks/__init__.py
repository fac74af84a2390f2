"""L_inf adversarial attacks in pixel scale (torchattacks-style): ``attack(x, y) -> x_adv``.

Registered names: ``fgsm``, ``mifgsm``, ``pgd`` and the training-time ``fgsm_rs``, ``free``;
:func:`build_attack` maps :class:`AttackParams`.
"""

from egat.attacks.base import Attack, attack_registry, build_attack, model_mode
from egat.attacks.fgsm import FGSM
from egat.attacks.fgsm_rs import FGSMRandomStart
from egat.attacks.free import FreePerturbation
from egat.attacks.mifgsm import MIFGSM
from egat.attacks.pgd import PGD

__all__ = [
    "Attack", "FGSM", "FGSMRandomStart", "FreePerturbation", "MIFGSM", "PGD", "attack_registry",
    "build_attack", "model_mode",
]

"""L_inf adversarial attacks in pixel scale (torchattacks-style): ``attack(x, y) -> x_adv``.

Registered names: ``fgsm``, ``mifgsm``, ``pgd``, AutoAttack's ``apgd`` (APGD-CE), ``apgdt``
(APGD-T, targeted DLR), ``square`` and ``autoattack`` (the ensemble), and the training-time
``fgsm_rs``, ``free``. They take plain keyword arguments; egat/build.py maps the params onto them.
"""

from egat.attacks.apgd import APGD
from egat.attacks.apgdt import APGDT
from egat.attacks.autoattack import AutoAttack, Ensemble
from egat.attacks.base import Attack, attack_registry
from egat.attacks.fgsm import FGSM
from egat.attacks.fgsm_rs import FGSMRandomStart
from egat.attacks.free import FreePerturbation
from egat.attacks.mifgsm import MIFGSM
from egat.attacks.pgd import PGD
from egat.attacks.square import Square

__all__ = [
    "APGD", "APGDT", "Attack", "AutoAttack", "Ensemble", "FGSM", "FGSMRandomStart",
    "FreePerturbation", "MIFGSM", "PGD", "Square", "attack_registry",
]

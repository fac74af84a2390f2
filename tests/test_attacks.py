"""Attacks: invariants over the registry, FGSM/PGD/MI-FGSM specifics, mode and gradient hygiene."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from egat.attacks import FGSM, MIFGSM, PGD, Attack, attack_registry
from egat.build import build_attack
from egat.config import AttackParams
from egat.models.classifier import Classifier

EPS = 0.05


def tiny_classifier(seed: int = 0) -> Classifier:
    """conv -> BN -> ReLU -> conv backbone (BN and dropout make the train/eval mode matter)."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2)
    )
    model = Classifier(backbone, num_features=8, num_classes=4, dropout=0.3)
    with torch.no_grad():  # non-trivial BN running statistics
        for _ in range(3):
            model.train()(torch.rand(8, 3, 12, 12))
    return model.eval()


@pytest.fixture
def model() -> Classifier:
    return tiny_classifier()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(6, 3, 12, 12, generator=generator)
    images[0, :, :3] = 0.0  # pixels at the [0, 1] borders exercise the clipping
    images[1, :, -3:] = 1.0
    return images, torch.randint(0, 4, (6,), generator=generator)


def loss_per_sample(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model.eval()(images), labels, reduction="none")


def registered_attack(name: str, model: nn.Module, eps: float = EPS, **kwargs) -> Attack:
    kwargs = {"queries": 20, "targets": 2, **kwargs}  # Square and APGD-T kept cheap
    return build_attack(model, AttackParams(name=name, eps=eps, alpha=EPS / 4, **kwargs))


# The evaluation attacks; the training-time ones (fgsm_rs, free) have tests in test_fast_at.py.
ALL = [name for name in attack_registry.names() if not attack_registry.get(name).training_only]
# AutoAttack's attacks return an image they do not fool unchanged (tests/test_autoattack.py).
EVERY_IMAGE = [name for name in ALL if attack_registry.get(name).perturbs_every_image]


def test_registry_holds_the_evaluation_and_training_attacks():
    assert ALL == ["apgd", "apgdt", "autoattack", "fgsm", "mifgsm", "pgd", "square"]
    assert attack_registry.names() == [
        "apgd", "apgdt", "autoattack", "fgsm", "fgsm_rs", "free", "mifgsm", "pgd", "square"]


@pytest.mark.parametrize("name", EVERY_IMAGE)
def test_stays_in_the_eps_ball_and_the_pixel_range(name, model, batch):
    images, labels = batch
    adversarial = registered_attack(name, model)(images, labels)
    assert adversarial.shape == images.shape and adversarial.dtype == images.dtype
    assert not adversarial.requires_grad
    assert (adversarial - images).abs().max() <= EPS + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert (adversarial != images).any()


@pytest.mark.parametrize("name", EVERY_IMAGE)
def test_increases_the_loss(name, model, batch):
    images, labels = batch
    adversarial = registered_attack(name, model)(images, labels)
    clean_loss = loss_per_sample(model, images, labels)
    assert loss_per_sample(model, adversarial, labels).mean() > clean_loss.mean()


@pytest.mark.parametrize("name", ALL)
def test_eps_zero_is_the_identity(name, model, batch):
    images, labels = batch
    assert torch.equal(registered_attack(name, model, eps=0.0)(images, labels), images)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("start_mode", ["train", "eval", "mixed"])
@pytest.mark.parametrize("attack_mode", ["eval", "train"])
def test_model_mode_is_set_during_and_restored_after(name, start_mode, attack_mode, model, batch):
    model.train(start_mode != "eval")
    if start_mode == "mixed":
        model.backbone[1].eval()  # e.g. a frozen BatchNorm inside a training model
    before = {module_name: m.training for module_name, m in model.named_modules()}
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    registered_attack(name, model, model_mode=attack_mode)(*batch)
    assert seen and set(seen) == {attack_mode == "train"}
    assert {module_name: m.training for module_name, m in model.named_modules()} == before


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("start_mode", ["train", "eval"])
def test_model_mode_is_restored_when_the_attack_raises(name, start_mode, model, batch):
    model.train(start_mode == "train")

    def fail(module, args):
        raise RuntimeError("boom")

    model.backbone.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        registered_attack(name, model)(*batch)
    assert all(m.training == (start_mode == "train") for m in model.modules())


@pytest.mark.parametrize("name", ALL)
def test_parameter_grads_are_untouched(name, model, batch):
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.5)
    registered_attack(name, model)(*batch)
    assert torch.equal(params[0].grad, torch.full_like(params[0], 0.5))
    assert all(p.grad is None for p in params[1:])


@pytest.mark.parametrize("name", EVERY_IMAGE)
def test_works_under_no_grad(name, model, batch):
    images, labels = batch
    with torch.no_grad():
        adversarial = registered_attack(name, model)(images, labels)
    assert (adversarial != images).any()


@pytest.mark.parametrize(
    "cls, kwargs, key",
    [
        (FGSM, {"eps": -0.1}, "eps"),
        (PGD, {"eps": -0.1, "alpha": 0.01, "steps": 1}, "eps"),
        (PGD, {"eps": 0.1, "alpha": -0.01, "steps": 1}, "alpha"),
        (PGD, {"eps": 0.1, "alpha": 0.01, "steps": 0}, "steps"),
        (MIFGSM, {"eps": 0.1, "steps": 0}, "steps"),
        (MIFGSM, {"eps": 0.1, "alpha": -1.0}, "alpha"),
        (MIFGSM, {"eps": 0.1, "decay": -1.0}, "decay"),
    ],
)
def test_invalid_hyperparameters_name_the_attack_and_the_key(cls, kwargs, key, model):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {key} must be"):
        cls(model, **kwargs)


def test_build_attack_maps_the_params(model):
    params = AttackParams(name="pgd", eps="8/255", alpha="2/255", steps=7, random_start=False)
    attack = build_attack(model, params)
    assert isinstance(attack, PGD)
    assert (attack.eps, attack.alpha, attack.steps, attack.random_start) == (
        8 / 255, 2 / 255, 7, False
    )
    assert build_attack(model, params, eps=0.02).eps == 0.02
    mifgsm = build_attack(model, AttackParams(name="mifgsm", eps=0.04, steps=4, decay=0.5))
    assert isinstance(mifgsm, MIFGSM) and mifgsm.alpha == pytest.approx(0.01)
    assert mifgsm.decay == 0.5
    assert isinstance(build_attack(model, AttackParams(name="fgsm")), FGSM)


def test_one_pgd_step_of_size_eps_without_random_start_is_fgsm(model, batch):
    images, labels = batch
    pgd = PGD(model, eps=EPS, alpha=EPS, steps=1, random_start=False)
    assert torch.equal(pgd(images, labels), FGSM(model, eps=EPS)(images, labels))


def test_fgsm_is_the_signed_gradient_step(model, batch):
    images, labels = batch
    grad = input_gradient(model, images, labels)
    expected = (images + EPS * grad.sign()).clamp(0, 1)
    torch.testing.assert_close(FGSM(model, eps=EPS)(images, labels), expected)


def test_pgd_random_start_depends_on_the_seed(model, batch):
    pgd = PGD(model, eps=EPS, alpha=EPS / 4, steps=2)
    torch.manual_seed(0)
    first = pgd(*batch)
    torch.manual_seed(0)
    assert torch.equal(pgd(*batch), first)
    assert not torch.equal(pgd(*batch), first)


def input_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    images = images.clone().requires_grad_(True)
    loss = F.cross_entropy(model.eval()(images), labels, reduction="sum")
    return torch.autograd.grad(loss, images)[0]


def test_mifgsm_momentum_matches_a_hand_computation(model, batch):
    images, labels = batch
    eps, alpha, decay = 0.04, 0.03, 0.7
    # step 1: g1 = grad0 / mean|grad0|;               x1 = clip(x + alpha sign(g1))
    # step 2: g2 = decay g1 + grad1 / mean|grad1|;    x2 = clip(x1 + alpha sign(g2))
    # (clip = into [x - eps, x + eps] and [0, 1]; alpha > eps / 2 so the ball binds at step 2)
    grad0 = input_gradient(model, images, labels)
    g1 = grad0 / grad0.abs().mean(dim=(1, 2, 3), keepdim=True)
    lower, upper = (images - eps).clamp(min=0), (images + eps).clamp(max=1)
    x1 = torch.max(torch.min(images + alpha * g1.sign(), upper), lower)
    grad1 = input_gradient(model, x1, labels)
    g2 = decay * g1 + grad1 / grad1.abs().mean(dim=(1, 2, 3), keepdim=True)
    x2 = torch.max(torch.min(x1 + alpha * g2.sign(), upper), lower)

    attack = MIFGSM(model, eps=eps, alpha=alpha, steps=2, decay=decay)
    torch.testing.assert_close(attack(images, labels), x2)
    # the momentum term matters here: without it the second step differs somewhere
    without_momentum = MIFGSM(model, eps=eps, alpha=alpha, steps=2, decay=0.0)(images, labels)
    assert not torch.equal(without_momentum, x2)


def test_mifgsm_default_step_is_eps_over_steps(model):
    assert MIFGSM(model, eps=0.03, steps=10).alpha == pytest.approx(0.003)


def test_repr_lists_the_hyperparameters(model):
    text = repr(PGD(model, eps=0.1, alpha=0.01, steps=3))
    assert text.startswith("PGD(") and "steps=3" in text and "model=" not in text

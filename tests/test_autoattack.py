"""AutoAttack's attacks against closed forms: on a linear model the optimal L_inf attack in the
[0, 1] box is known exactly; the ensemble's per-image worst case on scripted attacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from egat.attacks import APGD, APGDT, PGD, Attack, AutoAttack, Ensemble, Square
from egat.attacks.autoattack import CLEAN_WRONG, ROBUST
from egat.build import build_attack
from egat.config import AttackParams

EPS = 8 / 255


def linear_model(classes: int, dims: int = 48, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(dims, classes))
    return model.eval()


def optimal_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """min over the eps ball & [0, 1] of min_{j != y} (z_y - z_j), in closed form: for each j the
    margin is linear, so its minimum is at the vertex x*_i = lower_i if d_i > 0 else upper_i."""
    w, b = model[1].weight, model[1].bias
    flat = x.flatten(1)
    lower, upper = (flat - eps).clamp(min=0), (flat + eps).clamp(max=1)
    best = torch.full((len(x),), float("inf"))
    for j in range(w.shape[0]):
        d = w[y] - w[j]  # (B, D)
        vertex = torch.where(d > 0, lower, upper)
        margin = (d * vertex).sum(1) + b[y] - b[j]
        best = torch.where(y == j, best, torch.minimum(best, margin))
    return best


def linear_problem(classes: int, n: int = 24, slack: float = 0.1):
    """A linear model and n images it classifies correctly whose optimal margin under the attack
    is at least ``slack`` away from 0 (so "robust" is decided with room to spare), half each way."""
    model = linear_model(classes)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2000, 3, 4, 4, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
        m = optimal_margins(model, x, y, EPS)
    robust = (m > slack).nonzero().flatten()[: n // 2]
    breakable = (m < -slack).nonzero().flatten()[: n // 2]
    assert len(robust) == len(breakable) == n // 2
    keep = torch.cat([robust, breakable])
    return model, x[keep], y[keep], m[keep] > 0


def fooled(model, x_adv, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


@pytest.mark.parametrize("attack_fn", [
    lambda m: APGD(m, EPS, steps=10),
    lambda m: APGDT(m, EPS, steps=10, targets=4),
    lambda m: Square(m, EPS, queries=1000),
    lambda m: build_attack(m, AttackParams(name="autoattack", eps=EPS, steps=10, queries=1000)),
], ids=["apgd", "apgdt", "square", "autoattack"])
def test_each_attack_finds_the_closed_form_optimum_of_a_linear_model(attack_fn):
    model, x, y, robust = linear_problem(classes=5)
    torch.manual_seed(0)
    x_adv = attack_fn(model)(x, y)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    # exactly the images whose optimal margin is negative are fooled, no more (impossible) and
    # no fewer (the attack found the optimum's side of 0)
    assert torch.equal(fooled(model, x_adv, y), ~robust)


def test_apgd_and_our_pgd_reach_the_same_vertex_where_they_coincide():
    """Two classes: the CE gradient's sign is constant, so PGD without random start (steps x
    alpha >= eps) and APGD (first step 2 eps) both end at the optimal vertex x - eps sign(d)."""
    model, x, y, robust = linear_problem(classes=2)
    pgd = PGD(model, EPS, alpha=EPS / 4, steps=10, random_start=False)(x, y)
    torch.manual_seed(0)
    apgd = APGD(model, EPS, steps=10)(x, y)
    w = model[1].weight
    d = w[y] - w[1 - y]
    vertex = (x - EPS * d.view_as(x).sign()).clamp(0, 1)
    assert torch.allclose(pgd, vertex, atol=1e-6)
    hit = ~robust
    assert torch.equal(fooled(model, pgd, y), hit) and torch.equal(fooled(model, apgd, y), hit)
    assert (apgd[hit] - pgd[hit]).abs().max() < 1e-6  # fooled images: the same adversarial image
    assert torch.equal(apgd[robust], x[robust])  # the others come back unchanged (AutoAttack)


def test_library_attacks_follow_the_callers_seed_and_advance_it_by_one_draw():
    model, x, y, _ = linear_problem(classes=5)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(Square(model, EPS, queries=50)(x, y))
        runs.append(torch.rand(1))
    assert torch.equal(runs[0], runs[2]) and torch.equal(runs[1], runs[3])
    torch.manual_seed(3)
    torch.randint(2**31 - 1, ())  # the one draw: the library's own reseeding did not leak out
    assert torch.equal(torch.rand(1), runs[1])


class Logits(nn.Module):
    """Images (B, 1, 1, C + 1): the first C values are the logits, the last the image's id."""

    def forward(self, x):
        return x.flatten(1)[:, :-1]


class FoolIds(Attack):
    """Fools exactly the images whose id is in ``ids`` (swaps their logits' argmax away)."""

    def __init__(self, model, ids, eps=0.1):
        super().__init__(model, eps)
        self.ids, self.calls = set(ids), []

    def perturb(self, x, y):
        self.calls.append(sorted(int(i) for i in x.flatten(1)[:, -1]))
        out = x.clone()
        for row, image_id in enumerate(self.calls[-1]):
            if image_id in self.ids:
                out[row, 0, 0, y[row]] = -1.0  # the true class's logit drops below the others
        return out


def scripted_images():
    # ids 0..5; id 0 is misclassified clean (logit of class 1 highest, label 0)
    logits = torch.tensor([[0.0, 1.0, 0.0]] + [[1.0, 0.0, 0.0]] * 5)
    ids = torch.arange(6, dtype=torch.float32)[:, None]
    x = torch.cat([logits, ids], 1).view(6, 1, 1, 4)
    return x, torch.zeros(6, dtype=torch.int64)


def test_ensemble_keeps_per_image_the_first_attack_that_fools_it():
    model = Logits()
    a, b, c = FoolIds(model, {1, 2}), FoolIds(model, {2, 3}), FoolIds(model, {4})
    x, y = scripted_images()
    x_adv, fooled_by = Ensemble(model, [a, b, c]).run(x, y)
    assert fooled_by.tolist() == [CLEAN_WRONG, 0, 0, 1, 2, ROBUST]
    # later attacks only see what the earlier ones left correct
    assert a.calls == [[1, 2, 3, 4, 5]] and b.calls == [[3, 4, 5]] and c.calls == [[4, 5]]
    # each fooled image is the adversarial example of the attack that fooled it; others unchanged
    assert torch.equal(x_adv[[0, 5]], x[[0, 5]])
    assert torch.equal(x_adv[2], a.perturb(x[2:3], y[2:3])[0])
    assert (model(x_adv).argmax(1) == y).tolist() == [False] * 5 + [True]


def test_ensemble_stops_once_every_image_is_fooled_and_rejects_mixed_eps():
    model = Logits()
    a, b = FoolIds(model, set(range(6))), FoolIds(model, {5})
    x, y = scripted_images()
    assert Ensemble(model, [a, b]).run(x, y)[1].tolist() == [CLEAN_WRONG, 0, 0, 0, 0, 0]
    assert b.calls == []
    with pytest.raises(ValueError, match="different eps"):
        Ensemble(model, [FoolIds(model, {1}, eps=0.1), FoolIds(model, {1}, eps=0.2)])


def test_autoattack_builds_its_members_from_the_params():
    model = linear_model(5)
    params = AttackParams(name="autoattack", eps=EPS, steps=7, restarts=2, targets=3, queries=11,
                          ensemble=["apgd", "apgdt", "square", "pgd"])
    attack = build_attack(model, params, eps=0.02)
    assert isinstance(attack, AutoAttack)
    apgd, apgdt, square, pgd = attack.attacks
    assert (type(apgd), apgd.steps, apgd.restarts, apgd.eps) == (APGD, 7, 2, 0.02)
    assert (type(apgdt), apgdt.targets) == (APGDT, 3)
    assert (type(square), square.queries, square.restarts) == (Square, 11, 2)
    assert (type(pgd), pgd.steps) == (PGD, 7)


@pytest.mark.parametrize("cls, kwargs, key", [
    (APGD, {"restarts": 0}, "restarts"), (APGD, {"steps": 0}, "steps"),
    (APGDT, {"targets": 0}, "targets"), (Square, {"queries": 0}, "queries"),
    (Square, {"p_init": 0.0}, "p_init"), (Square, {"restarts": 0}, "restarts"),
])
def test_invalid_hyperparameters_name_the_attack_and_the_key(cls, kwargs, key):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {key} must"):
        cls(linear_model(5), EPS, **kwargs)


def test_apgdt_needs_four_classes():
    model, x, y, _ = linear_problem(classes=2)
    with pytest.raises(ValueError, match="APGDT: the targeted DLR loss needs >= 4 classes"):
        APGDT(model, EPS)(x, y)


def test_without_torchattacks_the_attacks_say_how_to_install_it(monkeypatch):
    import sys

    from egat.errors import EgatError

    monkeypatch.setitem(sys.modules, "torchattacks", None)  # `import torchattacks` now fails
    with pytest.raises(EgatError, match=r"install it with: pip install --no-deps 'torchattacks>=3\.5'"):
        build_attack(linear_model(5), AttackParams(name="autoattack"))


def test_the_attack_sweep_runs_apgd_by_default():
    from egat.build import params_from_dict
    from egat.evaluation import attack_sweep

    assert "apgd" in params_from_dict({}).eval.sweep.attacks
    model, x, y, robust = linear_problem(classes=5)
    params = params_from_dict({"eval": {"sweep": {"attacks": ["pgd", "apgd"], "eps": [EPS, 0.25]}}})
    sweep = attack_sweep(model, params, [{"image": x, "label": y}], "cpu")
    assert sweep["apgd"][f"{EPS:g}"] == pytest.approx(100.0 * robust.float().mean().item())
    assert sweep["apgd"]["0.25"] == 0.0


def test_the_nested_sweep_is_the_per_image_worst_case_over_smaller_eps():
    from egat.build import params_from_dict
    from egat.evaluation import attack_sweep

    model, x, y, _ = linear_problem(classes=5)
    forwarded = []  # images the model sees, attacks included
    model.register_forward_pre_hook(lambda module, args: forwarded.append(len(args[0])))
    eps = [0.005, 0.01, 0.02, 0.03, 0.05]
    sweeps, cost = {}, {}
    for nested in (False, True):
        forwarded.clear()
        sweeps[nested] = attack_sweep(model, params_from_dict({"eval": {"sweep": {
            "attacks": ["fgsm", "pgd"], "eps": eps, "steps": 3, "nested": nested}}}),
            [{"image": x, "label": y}], "cpu")
        cost[nested] = sum(forwarded)
    # the images fooled at a small eps are not attacked again at the larger ones
    assert cost[True] < 0.8 * cost[False]
    for name in ("fgsm", "pgd"):
        alone, nested = ([sweeps[k][name][f"{e:g}"] for e in eps] for k in (False, True))
        assert nested[0] == alone[0]  # the smallest eps attacks every clean-correct image
        assert all(n <= a for n, a in zip(nested, alone))
        assert all(b <= a for a, b in zip(nested, nested[1:]))  # monotone by construction
        assert alone[0] > alone[-1]  # the eps range spans real robustness

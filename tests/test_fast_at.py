"""Fast adversarial training: FGSM-RS and free AT against hand computations on a linear model,
minibatch replay, the catastrophic-overfitting guard, and the mixed-precision/compile switches."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from egat.attacks import FGSMRandomStart, FreePerturbation
from egat.build import build_attack, params_from_dict
from egat.config import AttackParams
from egat.errors import ParamsError
from egat.train import Trainer
from egat.train.guard import OverfitGuard
from egat.train.precision import Precision, compile_backbone
from egat.train.sampler import StepBatchSampler
from tests.helpers import prepared, tiny_classifier

EPS = 0.1


class Linear(nn.Module):
    """logits = W x.flatten(): CE's input gradient is W^T (softmax - onehot), by hand."""

    def __init__(self, pixels: int, classes: int = 3, seed: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, pixels, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T


def hand_gradient(model: Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        p = (x.flatten(1) @ model.weight.T).softmax(1)
        p[torch.arange(len(y)), y] -= 1
        return (p @ model.weight).view_as(x)


@pytest.fixture
def linear_batch():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 1, 3, 3, generator=g)
    x[0] = 0.0  # the [0, 1] box binds here
    return Linear(9), x, torch.tensor([0, 1, 2, 0])


def test_fgsm_rs_matches_the_hand_computation(linear_batch):
    model, x, y = linear_batch
    attack = FGSMRandomStart(model, eps=EPS)
    assert attack.alpha == pytest.approx(1.25 * EPS)
    torch.manual_seed(7)
    x_adv = attack(x, y)
    torch.manual_seed(7)
    start = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    start = torch.max(torch.min(start, x + EPS), x - EPS)
    expected = start + 1.25 * EPS * hand_gradient(model, start, y).sign()
    expected = expected.clamp(min=(x - EPS).clamp(min=0), max=(x + EPS).clamp(max=1))
    torch.testing.assert_close(x_adv, expected)
    assert (x_adv - x).abs().max() <= EPS + 1e-7 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_fgsm_rs_from_params_uses_the_alpha_ratio(linear_batch):
    model = linear_batch[0]
    attack = build_attack(model, AttackParams(name="fgsm_rs", eps=0.04, rs_alpha_ratio=1.5))
    assert isinstance(attack, FGSMRandomStart) and attack.alpha == pytest.approx(0.06)


def test_free_perturbation_is_carried_across_replays_and_clipped_to_eps(linear_batch):
    model, x, y = linear_batch
    free = build_attack(model, AttackParams(name="free", eps=EPS, replays=3))
    assert isinstance(free, FreePerturbation) and free.replays == 3
    delta = torch.zeros_like(x)
    for _ in range(free.replays):  # each replay: the training step's own backward updates delta
        x_adv = free(x, y)
        torch.testing.assert_close(x_adv.detach(), (x + delta).clamp(0, 1))
        F.cross_entropy(model(x_adv), y).backward()
        delta = (delta + EPS * hand_gradient(model, (x + delta).clamp(0, 1), y).sign()).clamp(-EPS, EPS)
        torch.testing.assert_close(free.delta, delta)
    assert free.delta.abs().max() <= EPS and model.weight.grad is not None
    torch.testing.assert_close(free(x.flip(0), y).detach(), (x.flip(0) + delta).clamp(0, 1))
    free(torch.rand(2, 1, 3, 3), y[:2])  # another batch shape starts afresh
    assert torch.equal(free.delta, torch.zeros(2, 1, 3, 3))


def test_free_perturbation_does_not_move_without_a_backward(linear_batch):
    model, x, y = linear_batch
    free = FreePerturbation(model, eps=EPS)
    with torch.no_grad():
        out = free(x, y)
    assert not out.requires_grad and torch.equal(free.delta, torch.zeros_like(x))


def test_training_attacks_are_refused_for_evaluation():
    with pytest.raises(ParamsError, match=r"eval\.attack.*'free' is a training-time attack"):
        params_from_dict({"eval": {"attack": {"name": "free"}}})
    with pytest.raises(ParamsError, match=r"attack\.replays"):
        params_from_dict({"attack": {"name": "free", "replays": 0}})


def test_sampler_replays_each_minibatch_m_times_and_resumes_mid_replay():
    full = list(StepBatchSampler(20, 4, seed=1, total_steps=10, replays=3))
    plain = list(StepBatchSampler(20, 4, seed=1, total_steps=4))
    assert len(full) == 10  # optimizer steps; ceil(10 / 3) = 4 distinct minibatches
    assert full == [plain[i // 3] for i in range(10)]
    assert list(StepBatchSampler(20, 4, seed=1, total_steps=10, start_step=4, replays=3)) == full[4:]


class ValSet(torch.utils.data.Dataset):
    def __init__(self, n=10):
        g = torch.Generator().manual_seed(0)
        # class-sorted, as split lists are: 0 0 0 0 1 1 1 2 2 2
        self.x, self.y = torch.rand(n, 3, 8, 8, generator=g), torch.arange(n) * 3 // n
        self.labels = self.y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


def test_guard_measures_a_fixed_batch_deterministically_and_warns_on_collapse(caplog):
    params = params_from_dict({"train": {"steps": 100, "guard": {"every": 30, "examples": 6,
                                                                  "collapse_drop": 20}},
                               "eval": {"attack": {"steps": 2}}})
    guard = OverfitGuard(params, ValSet(), torch.device("cpu"))
    assert guard.images.shape == (6, 3, 8, 8)
    assert sorted(guard.labels.tolist()) == [0, 0, 1, 1, 2, 2]  # stratified, not the first six
    assert [s for s in range(1, 101) if guard.due(s)] == [30, 60, 90, 100]
    model = tiny_classifier()
    before = torch.get_rng_state()
    first, second = guard.accuracy(model), guard.accuracy(model)
    assert first == second and 0 <= first <= 100 and torch.equal(torch.get_rng_state(), before)
    with caplog.at_level(logging.WARNING, logger="egat.train.guard"):
        assert not guard.warn_if_collapsed(45.0, best=60.0, step=30)
        assert guard.warn_if_collapsed(40.0, best=60.0, step=60)
    assert len(caplog.records) == 1 and "catastrophic overfitting at step 60" in caplog.text


def test_bf16_autocast_runs_a_training_step_on_cpu():
    model = tiny_classifier()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    precision = Precision("bf16", torch.device("cpu"))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    before = model.fc.weight.detach().clone()
    with precision.autocast():
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    assert logits.dtype == torch.bfloat16 and precision.scaler is None
    precision.backward(loss)
    precision.step(optimizer)
    assert not torch.equal(before, model.fc.weight) and model.fc.weight.dtype == torch.float32


@pytest.mark.slow  # dynamo tracing: ~5 s
def test_compile_backbone_keeps_state_dict_keys_outputs_and_gradients():
    model, reference = tiny_classifier(), tiny_classifier()
    keys, x = list(model.state_dict()), torch.rand(2, 3, 8, 8)
    compile_backbone(model, backend="aot_eager")  # dynamo + AOT autograd; inductor takes minutes
    out = model(x)
    out.sum().backward()
    reference(x).sum().backward()
    assert list(model.state_dict()) == keys  # checkpoints stay loadable without compile
    torch.testing.assert_close(out, reference(x))
    torch.testing.assert_close(model.backbone[0].weight.grad, reference.backbone[0].weight.grad)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_at") / "data"
    wheel = Path(__file__).resolve().parents[1] / "data/raw/animal_mnist-0.4-py3-none-any.whl"
    if wheel.is_file():  # offline: the repo's cached wheel, where there is one
        (root / "raw").mkdir(parents=True)
        shutil.copy(wheel, root / "raw")
    prepared({"data": {"embedded": {"per_class": 12}}}, root)
    return root


@pytest.mark.slow
def test_fast_egat_trains_with_free_at_guard_and_bf16(data_dir, tmp_path):
    params = params_from_dict({
        "data": {"dir": str(data_dir), "embedded": {"per_class": 12}},
        "train": {"steps": 6, "batch_size": 16, "eval_every": 3, "progress": False,
                  "domains": ["grass"], "precision": "bf16",
                  "guard": {"every": 2, "examples": 16}},
        "attack": {"name": "free", "replays": 3},
        "eval": {"attack": {"steps": 2}},
    })
    result = Trainer(params, tmp_path / "run").fit()
    best = torch.load(result.best_checkpoint, weights_only=True)
    assert 0 <= result.metrics["best_guard_acc"] <= 100
    assert best["guard_acc"] == result.metrics["best_guard_acc"]
    assert best["step"] == result.metrics["best_step"] in (2, 4, 6)


def test_onecycle_lr_is_the_linear_triangle_of_fast_at():
    from egat.config import TrainParams
    from egat.train.trainer import lr_scheduler

    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=1.0)
    assert lr_scheduler(optimizer, TrainParams(lr=1.0, lr_schedule="constant")) is None  # no scheduler
    scheduler = lr_scheduler(optimizer, TrainParams(steps=10, lr=1.0, lr_schedule="onecycle",
                                                    lr_peak=0.4))
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # Up from lr/25 to lr over the first 40% of the steps (steps 0..3), then down to lr/25/1e4.
    start, end = 1 / 25, 1 / 25 / 1e4
    hand = [start + (1 - start) * i / 3 for i in range(4)]
    hand += [1 - (1 - end) * i / 6 for i in range(1, 7)]
    assert seen == pytest.approx(hand, abs=1e-9)


class _Interrupt(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("setting", [
    {"train": {"method": "erm", "lr_schedule": "onecycle"}},  # the scheduler's position
    {"train": {"method": "pgd_at"}, "attack": {"name": "free", "replays": 2}},  # free AT's delta
], ids=["onecycle", "free_at"])
def test_a_resumed_run_ends_like_an_uninterrupted_one(data_dir, tmp_path, setting):
    raw = {
        "data": {"dir": str(data_dir), "embedded": {"per_class": 12}},
        "train": {"steps": 6, "batch_size": 16, "eval_every": 3, "checkpoint_every": 3,
                  "progress": False, "domains": ["grass"]},
    }
    for group, values in setting.items():
        raw[group] = {**raw.get(group, {}), **values}
    params = params_from_dict(raw)
    whole = Trainer(params, tmp_path / "whole").fit()

    def stop_at_3(step, metrics, checkpointed):
        if step == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        Trainer(params, tmp_path / "cut", on_report=stop_at_3).fit()
    resumed = Trainer(params, tmp_path / "cut").fit()
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert a["state"]["step"] == b["state"]["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed.metrics["best_val_acc"] == whole.metrics["best_val_acc"]


@pytest.mark.slow
def free_at_params(data_dir, steps: int):
    """PGD-AT with free AT (2 replays), checkpoints every 4 steps: the multi-rank resume runs."""
    return params_from_dict({
        "data": {"dir": str(data_dir)}, "model": {"name": "small_resnet"},
        "attack": {"name": "free", "replays": 2},
        "train": {"method": "pgd_at", "steps": steps, "batch_size": 16, "eval_every": 2,
                  "checkpoint_every": 4, "val_batches": 1, "progress": False, "num_threads": 1}})


def test_free_at_on_two_ranks_resumes_each_ranks_perturbation(data_dir, tmp_path):
    """Free AT's perturbation follows each rank's own gradients: a 2-rank run stopped after its
    step-4 checkpoint and resumed ends exactly where the uninterrupted run ends (with rank 0's
    perturbation restored on every rank it would not)."""
    from tests.helpers import train_ranks

    params = free_at_params(data_dir, steps=8)
    train_ranks(params, tmp_path / "whole")
    train_ranks(params, tmp_path / "resumed", stop_at=6)
    stopped = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert stopped["state"]["step"] == 4
    deltas = [r["method"]["attack"]["delta"] for r in stopped["ranks"]]
    assert len(deltas) == 2 and not torch.equal(deltas[0], deltas[1])  # one per rank
    train_ranks(params, tmp_path / "resumed")
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert a["state"]["step"] == b["state"]["step"] == 8
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-5, atol=1e-6,
                                   msg=name)
    for ra, rb in zip(a["ranks"], b["ranks"]):
        torch.testing.assert_close(ra["method"]["attack"]["delta"], rb["method"]["attack"]["delta"])


def test_free_at_perturbation_is_resplit_by_example_when_the_world_size_changes():
    """Rank r of W trains on rows r::W of each global batch, so a checkpoint of W ranks' deltas
    holds the perturbation of every example of the global batch: on W' ranks, rank r gets rows
    r::W' of it, as a run of W' ranks would have it."""
    whole = torch.randn(10, 3, 2, 2)  # 10 examples: uneven shards on 3 and 4 ranks
    batch = next(iter(StepBatchSampler(40, 10, 0, 1)))
    for world in (1, 2, 3, 4):
        shards = [next(iter(StepBatchSampler(40, 10, 0, 1, rank=r, world_size=world)))
                  for r in range(world)]
        assert shards == [batch[r::world] for r in range(world)]
    two = [{"delta": whole[r::2]} for r in range(2)]
    (one,) = FreePerturbation.reshard(two, 1)
    assert torch.equal(one["delta"], whole)
    for r, state in enumerate(FreePerturbation.reshard([one], 3)):
        assert torch.equal(state["delta"], whole[r::3])
    for r, state in enumerate(FreePerturbation.reshard(FreePerturbation.reshard(two, 3), 4)):
        assert torch.equal(state["delta"], whole[r::4])
    # A rank that saved no perturbation, or shards that do not tile one batch: all start at zero.
    assert FreePerturbation.reshard([two[0], {}], 1) == [{}]
    assert FreePerturbation.reshard([two[0], {"delta": whole[:1]}], 1) == [{}]


@pytest.mark.slow
def test_a_run_resumed_on_fewer_or_more_ranks_resplits_its_state(data_dir, tmp_path, monkeypatch,
                                                                   caplog):
    """What Ray's elastic training (train.min_workers) does to a checkpoint: 2 ranks stop after
    the step-4 checkpoint, 1 rank resumes from it (free AT's two deltas interleaved into one of
    the global batch), stops after the step-8 one, and 2 ranks finish from there."""
    from tests.helpers import train_ranks

    params = free_at_params(data_dir, steps=12)
    run = tmp_path / "elastic"
    train_ranks(params, run, stop_at=6)
    two = torch.load(run / "last.pt", weights_only=True)
    assert two["state"]["step"] == 4 and len(two["ranks"]) == 2
    loaded = []
    real = FreePerturbation.load_state_dict

    def load(self, state):
        loaded.append({k: v.clone() for k, v in state.items()})  # delta changes in place
        real(self, state)

    monkeypatch.setattr(FreePerturbation, "load_state_dict", load)

    def stop_at_10(step, metrics, checkpointed):
        if step == 10:
            raise _Interrupt

    with caplog.at_level(logging.WARNING, logger="egat.train.trainer"), \
            pytest.raises(_Interrupt):
        Trainer(params, run, on_report=stop_at_10).fit()
    assert "resuming step 4 on 1 worker(s) from a checkpoint of 2" in caplog.text
    (delta,) = [s["delta"] for s in loaded]
    assert delta.shape[0] == 16
    for r in range(2):
        assert torch.equal(delta[r::2], two["ranks"][r]["method"]["attack"]["delta"])
    one = torch.load(run / "last.pt", weights_only=True)
    assert one["state"]["step"] == 8 and len(one["ranks"]) == 1
    train_ranks(params, run)  # rank 1 has no RNG state of its own: seeded afresh
    final = torch.load(run / "last.pt", weights_only=True)
    assert final["state"]["step"] == 12 and len(final["ranks"]) == 2
    assert not torch.equal(final["ranks"][0]["rng"], final["ranks"][1]["rng"])

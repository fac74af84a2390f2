"""The Trainer: seeded, Adam, a step budget, periodic validation, best-validation checkpoint.

One class serves every entry point (CLI, DVC stages, Ray workers, Tune trials). It resumes from
``<run_dir>/last.pt`` when that file exists, so a killed run continues where it stopped. What the
run's files are called and hold lives in :mod:`egat.run`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from egat import io
from egat.build import build_attack, build_explainer, build_method, params_from_dict
from egat.config import Params, TrainParams
from egat.data import DomainDataset, read_splits
from egat.data.splits import cue_free_root
from egat.data.subsets import stratified_subset
from egat.errors import EgatError
from egat.methods import LossOutput, Method
from egat.metrics.accuracy import evaluate_accuracy
from egat.metrics.cue import cue_scores
from egat.metrics.stream import ScoreSums, iterate_batches
from egat.models import Classifier, build_model
from egat.models.mode import model_mode
from egat.resources import suggest_batch_size_on_oom
from egat.run.checkpoint import (
    model_checkpoint, params_fingerprint, rank_state, read_training_state, training_domains,
    training_state,
)
from egat.run.device import resolve_device
from egat.run.layout import BEST, LAST, METRICS, TIMING
from egat.seeding import seeded_scope
from egat.tracking import NullTracker, Tracker
from egat.train.guard import OverfitGuard
from egat.train.precision import Precision, compile_backbone
from egat.train.sampler import StepBatchSampler

log = logging.getLogger(__name__)
# on_report(step, metrics, checkpointed): called on every rank after a validation or a checkpoint.
ReportHook = Callable[[int, dict[str, float], bool], None]


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    metrics: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_dataset(params: Params, splits: dict, domains: list[str], split: str, augment=False,
                  images: str | None = None):
    data = params.data
    return DomainDataset(
        data.root, splits, domains, split, data.image_size, params.guides.variant, augment,
        guides_root=data.guides_root, images=images or params.train.images,
    )


def has_cue_classes(splits: dict) -> bool:
    """Does the data know each image's cue class (the embedded benchmark with a cue)?"""
    return any(c >= 0 for c in (splits.get("cue_class") or {}).values())


def check_selection(params: Params, splits: dict) -> None:
    """``train.select``, ``train.images`` and ``train.val_metrics`` ask only for what the data has."""
    t = params.train
    asked = (("train.select", t.select), ("train.images", t.images),
             *(("train.val_metrics", m) for m in t.val_metrics))
    valid = {"train.select": "val, last", "train.images": "observed",
             "train.val_metrics": "aacc, comp"}
    for key, value in asked:
        if value.startswith("cue_free") and cue_free_root(params.data.root, splits) is None:
            raise EgatError(f"{key}={value} needs cue-free renders, which only the embedded "
                            f"benchmark has; use {valid[key]}")
        if value == "cue_mismatch" and not has_cue_classes(splits):
            raise EgatError(f"{key}={value} needs each image's cue class, which only the embedded "
                            f"benchmark with a cue has; use {valid[key]}")


def selection_score(rule: str, val: dict[str, float], step: int) -> float:
    """The number ``train.select`` maximises over validations (higher = the new best.pt)."""
    return {"val": lambda: val["val/acc"], "last": lambda: float(step),
            "cue_free_val": lambda: val["val/cue_free_acc"]}[rule]()


def validation_loader(params: Params, dataset) -> DataLoader:
    """The validation split, or a stratified subset of ``train.val_batches`` batches of it."""
    subset = stratified_subset(dataset, params.train.val_batches * params.eval.batch_size,
                               params.data.split_seed)
    return DataLoader(subset, batch_size=params.eval.batch_size, num_workers=params.data.num_workers)


def validation_metrics(model: Classifier, params: Params, loader, device: torch.device,
                       cue_free_loader=None) -> dict:  # fmt: skip
    """cAcc on the validation ``loader`` (see :func:`validation_loader`), plus ``train.val_metrics``:
    aAcc under ``eval.attack`` and comprehensiveness of ``eval.explainer`` (as in evaluation); and,
    where ``cue_free_loader`` (the cue-free renders of the same images) is given, cAcc on it and
    with ``cue_free_aacc`` its aAcc; with ``cue_mismatch``, cAcc on the images whose cue points to
    another class (:func:`cue_mismatch_accuracy`); percent.

    The attacks' random starts draw from a forked RNG seeded by ``train.seed``, so validation is
    deterministic and leaves the training RNG stream untouched.
    """
    t = params.train
    extra = {}
    if "cue_mismatch" in t.val_metrics:
        with seeded_scope(t.seed, device):  # a loader pass draws a seed from the global RNG
            extra["val/cue_mismatch_acc"] = cue_mismatch_accuracy(model, loader, device)
    if cue_free_loader is not None:
        extra["val/cue_free_acc"] = evaluate_accuracy(model, cue_free_loader, device)["clean"]
        if "cue_free_aacc" in t.val_metrics:
            with seeded_scope(t.seed, device):
                attack = {"aacc": build_attack(model, params.eval.attack)}
                extra["val/cue_free_aacc"] = evaluate_accuracy(
                    model, cue_free_loader, device, attack)["aacc"]
    if not {"aacc", "comp"} & set(t.val_metrics):
        acc = evaluate_accuracy(model, loader, device)
        return {"val/acc": acc["clean"], **extra}
    with seeded_scope(t.seed, device):
        attacks = {}
        if "aacc" in t.val_metrics:
            attacks["aacc"] = build_attack(model, params.eval.attack)
        acc = evaluate_accuracy(model, loader, device, attacks)
    out = {"val/acc": acc["clean"], **{f"val/{k}": v for k, v in acc.items() if k != "clean"}, **extra}
    if "comp" in t.val_metrics:
        from egat.metrics.faithfulness import faithfulness

        faith = params.eval.faithfulness
        explainer = build_explainer(params.eval.explainer, model, params.explainer)
        out["val/comp"] = faithfulness(
            model, explainer, loader, device, faith.ks, faith.baseline
        )["comp"]
    return out


def cue_mismatch_accuracy(model: Classifier, loader, device: torch.device) -> float:
    """cAcc (%) on the images of ``loader`` whose cue points to another class (NaN: none)."""
    sums = ScoreSums()
    with model_mode(model, "eval"), torch.no_grad():
        for batch in iterate_batches(loader, device):
            pred = model(batch["image"]).argmax(1)
            sums.add("right", cue_scores(pred, batch["label"], batch["cue"])["cacc_cue_mismatch"])
    return 100.0 * sums.mean("right") if sums.counts["right"] else float("nan")


def lr_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainParams
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``train.lr_schedule``'s scheduler, stepped once per optimizer step (None: constant lr)."""
    if train.lr_schedule == "constant":
        return None
    # Linear both ways and no momentum cycling: the triangular schedule of Wong et al. 2020.
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=train.lr, total_steps=train.steps, pct_start=train.lr_peak,
        anneal_strategy="linear", cycle_momentum=False,
    )


@dataclass
class TrainingSession:
    """What one fit trains with, and the run's counters ``state`` (saved in last.pt)."""

    splits: dict
    domains: list[str]
    train_ds: DomainDataset
    val_ds: DomainDataset
    cue_free_val: DataLoader | None  # the cue-free renders of the validation images, where any
    model: Classifier
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    precision: Precision
    guard: OverfitGuard | None
    fingerprint: str
    state: dict[str, Any]
    latest: dict[str, float] = field(default_factory=dict)  # the metrics on_report passes on


class Trainer:
    """Trains one run into ``run_dir``: :meth:`fit` sets up, resumes, then steps, validating and
    checkpointing at their intervals; every phase is one method below, in the order it runs."""

    def __init__(
        self, params: Params, run_dir: str | Path, tracker: Tracker | None = None,
        device: torch.device | None = None, rank: int = 0, world_size: int = 1,
        on_report: ReportHook | None = None,
    ):
        self.params = params
        self.run_dir = Path(run_dir)
        self.tracker = tracker or NullTracker()
        self.device = device or resolve_device(params)
        self.rank, self.world_size = rank, world_size
        self.on_report = on_report  # Ray workers report metrics and checkpoints through it

    @suggest_batch_size_on_oom("train.batch_size", "training")
    def fit(self) -> TrainResult:
        t = self.params.train
        s = self._setup()
        self._resume(s)
        if s.state["step"] >= t.steps and (self.run_dir / BEST).is_file():
            return self._finish(s)
        loader = self._train_loader(s)
        val_loader = validation_loader(self.params, s.val_ds)
        bar = self._progress_bar(s)
        started = time.perf_counter() - s.state["elapsed_s"]
        s.model.train()
        for batch in loader:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            out = self._step(s, batch)
            step = s.state["step"]
            if step % 10 == 0 or step == t.steps:
                self._log_step(s, out, batch, bar)
            if s.guard is not None and s.guard.due(step):
                self._check_guard(s, step)
            evaluated = step % t.eval_every == 0 or step == t.steps
            checkpointed = step % t.checkpoint_every == 0 or step == t.steps
            if evaluated:
                self._validate(s, val_loader, step)
            if checkpointed:
                s.state["elapsed_s"] = time.perf_counter() - started
                self._save_training_state(s)
            if self.on_report is not None and (evaluated or checkpointed):
                self.on_report(step, dict(s.latest, best_val_acc=s.state["best_val_acc"]), checkpointed)
            bar.update(1)
        bar.close()
        s.state["elapsed_s"] = time.perf_counter() - started
        return self._finish(s)

    # --- setup and resume ------------------------------------------------------------------------
    def _setup(self) -> TrainingSession:
        """Seed, then build the data, model, method, optimiser and guard (in this order: the
        model's initial weights and everything after draw from the seeded RNG)."""
        p, t = self.params, self.params.train
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        seed_everything(t.seed)
        splits = read_splits(p.data.splits_file)
        domains = training_domains(p, splits["domains"])
        check_selection(p, splits)
        train_ds = build_dataset(p, splits, domains, "train", augment=p.data.augment)
        val_ds = build_dataset(p, splits, domains, "val")
        # Where the data has cue-free renders, validation also scores them (train.select may use it).
        cue_free_val = (validation_loader(p, build_dataset(p, splits, domains, "val", images="cue_free"))
                        if cue_free_root(p.data.root, splits) is not None else None)
        model = build_model(
            p.model.name, len(splits["classes"]), p.model.pretrained, p.model.dropout,
            channels_last=p.model.channels_last, input_size=p.model.input_size,
        ).to(self.device)
        method = build_method(model, p)
        optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        scheduler = lr_scheduler(optimizer, t)
        if t.compile:
            compile_backbone(model)
        precision = Precision(t.precision, self.device)
        guard = OverfitGuard(p, val_ds, self.device) if t.guard.every else None
        state = {"step": 0, "best_val_acc": -1.0, "best_score": -1.0, "best_step": -1, "elapsed_s": 0.0}
        if guard is not None:
            state["best_guard_acc"] = -1.0
        return TrainingSession(splits, domains, train_ds, val_ds, cue_free_val, model, method,
                               optimizer, scheduler, precision, guard,
                               params_fingerprint(p, domains), state)

    def _resume(self, s: TrainingSession) -> None:
        """Continue from last.pt where it holds this run (the same fingerprint). A last.pt of
        other params or data, or one that train.resume=false discards, is another run's: its
        best.pt goes (last.pt is overwritten at the first checkpoint)."""
        last = self.run_dir / LAST
        ckpt = read_training_state(last) if self.params.train.resume and last.is_file() else None
        if ckpt is not None and ckpt["fingerprint"] == s.fingerprint:
            self._restore(s, ckpt)
        elif ckpt is not None:
            log.warning("%s holds a run with other params or data: starting afresh", last)
            (self.run_dir / BEST).unlink(missing_ok=True)
        elif last.is_file():  # train.resume=false: the old run's files are not this run's
            log.warning("train.resume=false: discarding %s and starting afresh", last)
            (self.run_dir / BEST).unlink(missing_ok=True)

    def _restore(self, s: TrainingSession, ckpt: dict) -> None:
        """Load the training state of last.pt: model, optimiser, schedule, this rank's RNG and
        method state, the counters and the precision's loss scale."""
        s.model.load_state_dict(ckpt["model"])
        s.optimizer.load_state_dict(ckpt["optimizer"])
        if s.scheduler is not None:
            s.scheduler.load_state_dict(ckpt["scheduler"])
        mine = rank_state(ckpt, self.rank, self.world_size, s.method.reshard_states)
        saved, step = len(ckpt.get("ranks") or []), int(ckpt["state"]["step"])
        if saved and saved != self.world_size and self.rank == 0:
            log.warning(
                "resuming step %d on %d worker(s) from a checkpoint of %d: each rank's "
                "shard of the global batch (train.batch_size=%d) and the method state "
                "(free AT's perturbation) are re-split by the new world size", step,
                self.world_size, saved, self.params.train.batch_size)
        self._restore_rng(mine, saved, step)
        s.state.update(ckpt["state"])
        s.method.step = s.state["step"]  # step-scheduled losses (IRM's annealing) continue
        s.method.load_state_dict(mine["method"])
        s.precision.load_state_dict(ckpt["precision"])
        log.warning("resuming %s from step %d", self.run_dir, s.state["step"])

    def _restore_rng(self, mine: dict, saved: int, step: int) -> None:
        """This rank's saved RNG states; a rank the checkpoint of ``saved`` ranks has none for
        is seeded afresh (:func:`fresh_rank_seed`)."""
        if mine["rng"] is None:
            fresh = fresh_rank_seed(self.params.train.seed, step, self.rank)
            torch.manual_seed(fresh)
            log.warning("rank %d has no saved RNG state (the checkpoint has %d ranks): "
                        "seeded afresh with %d", self.rank, saved, fresh)
        else:
            torch.set_rng_state(mine["rng"])
        if mine.get("cuda_rng") and len(mine["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(mine["cuda_rng"])

    def _train_loader(self, s: TrainingSession) -> DataLoader:
        """The training batches from the current step on (this rank's shard of each)."""
        p, t = self.params, self.params.train
        if len(s.train_ds) < t.batch_size:
            raise EgatError(
                f"train split of {s.domains} has {len(s.train_ds)} images, fewer than "
                f"train.batch_size={t.batch_size}; lower the batch size"
            )
        sampler = StepBatchSampler(
            len(s.train_ds), t.batch_size, t.seed, t.steps, s.state["step"], self.rank,
            self.world_size, replays=s.method.batch_replays,
        )
        # Loaders draw their iterators' base seeds from their own generators, not the global RNG:
        # a resumed run (which creates its iterator at step k) then continues the global RNG
        # stream (dropout, attacks, mixup) exactly as the uninterrupted run does.
        return DataLoader(
            s.train_ds, batch_sampler=sampler, num_workers=p.data.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=p.data.num_workers > 0,
            generator=torch.Generator().manual_seed(t.seed * 1_000_003 + s.state["step"]),
        )

    def _progress_bar(self, s: TrainingSession) -> tqdm:
        t = self.params.train
        return tqdm(
            total=t.steps, initial=s.state["step"], disable=not t.progress or self.rank != 0,
            desc=f"train {t.method}", unit="step", dynamic_ncols=True,
        )

    # --- one step ------------------------------------------------------------------------------
    def _step(self, s: TrainingSession, batch: dict[str, torch.Tensor]) -> LossOutput:
        """One optimiser step on ``batch`` (gradients and buffers averaged across ranks)."""
        with s.precision.autocast():
            out = s.method.loss(batch)
        s.optimizer.zero_grad(set_to_none=True)
        s.precision.backward(out.loss)
        self._sync_gradients(s.model)
        s.precision.step(s.optimizer)
        if s.scheduler is not None:
            s.scheduler.step()
        self._sync_buffers(s.model)
        s.state["step"] += 1
        return out

    def _log_step(self, s: TrainingSession, out: LossOutput, batch: dict, bar: tqdm) -> None:
        """The step's loss terms, batch accuracy and learning rate, to the tracker and the bar."""
        acc = (out.logits.argmax(1) == batch["label"]).float().mean().item() * 100
        logged = {f"train/{k}": v.item() for k, v in out.terms.items()}
        logged.update({"train/loss": out.loss.item(), "train/acc": acc,
                       "train/lr": s.optimizer.param_groups[0]["lr"]})
        self.tracker.log_metrics(logged, s.state["step"])
        s.latest.update({"train/loss": out.loss.item(), "train/acc": acc})
        bar.set_postfix(loss=f"{out.loss.item():.3f}", best_val=f"{s.state['best_val_acc']:.1f}")

    def _sync_gradients(self, model: Classifier) -> None:
        """Average gradients across ranks (no-op for one worker), in one flat all-reduce.

        Not DDP: methods call ``model.features``/``model.head`` and attacks take input gradients
        outside DDP's forward, which its reducer does not support.
        """
        if self.world_size == 1:
            return
        grads = [param.grad for param in model.parameters() if param.grad is not None]
        _all_reduce_mean(grads, self.world_size)

    def _sync_buffers(self, model: Classifier) -> None:
        """Average floating-point buffers (BatchNorm running statistics) across ranks.

        Each rank updates them from its shard of the global batch; averaging keeps every rank's
        model identical (eval-mode attacks, validation and resumed runs see the same statistics)
        and matches the running mean one worker would keep over the whole global batch.
        """
        if self.world_size == 1:
            return
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        _all_reduce_mean(buffers, self.world_size)

    # --- validation and checkpoints --------------------------------------------------------------
    def _check_guard(self, s: TrainingSession, step: int) -> None:
        """The overfitting guard's check: warn on a collapse, keep the best guard model as best.pt."""
        acc = s.guard.accuracy(s.model)
        s.guard.warn_if_collapsed(acc, s.state["best_guard_acc"], step)
        self.tracker.log_metrics({"guard/acc": acc}, step)
        s.latest["guard/acc"] = acc
        if acc > s.state["best_guard_acc"]:
            s.state.update(best_guard_acc=acc, best_step=step)
            self._save_best(s, step, guard_acc=acc)

    def _validate(self, s: TrainingSession, val_loader: DataLoader, step: int) -> None:
        """Score the validation split; a new best by ``train.select`` becomes best.pt."""
        p = self.params
        val = validation_metrics(s.model, p, val_loader, self.device, s.cue_free_val)
        val_acc = val["val/acc"]
        self.tracker.log_metrics(val, step)
        s.latest.update(val)
        s.state["best_val_acc"] = max(s.state["best_val_acc"], val_acc)
        score = selection_score(p.train.select, val, step)
        # With the overfitting guard on, best.pt follows the guard's accuracy instead.
        if score > s.state["best_score"] and s.guard is None:
            s.state.update(best_score=score, best_step=step)
            self._save_best(s, step, val_acc=val_acc)
        s.model.train()

    def _save_best(self, s: TrainingSession, step: int, **score: float) -> None:
        if self.rank == 0:
            io.torch_save(model_checkpoint(s.model, self.params, s.splits, step=step, **score),
                          self.run_dir / BEST)

    def _save_training_state(self, s: TrainingSession) -> None:
        """last.pt, with every rank's own RNG and method state (free AT's perturbation differs
        by rank): gathered on every rank, written by rank 0."""
        ranks = gather_objects({
            "method": _to_cpu(s.method.state_dict()), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }, self.world_size)
        if self.rank == 0:
            io.torch_save(training_state(s.model, s.optimizer, s.scheduler, ranks, s.precision,
                                         s.state, s.fingerprint), self.run_dir / LAST)

    def _finish(self, s: TrainingSession) -> TrainResult:
        """train_metrics.json (reproducible byte for byte) and train_timing.json (wall clock)."""
        state = s.state
        steps = max(state["step"], 1)
        metrics = {
            "best_val_acc": state["best_val_acc"],
            "best_step": state["best_step"],
            "steps": state["step"],
        }
        if "best_guard_acc" in state:
            metrics["best_guard_acc"] = state["best_guard_acc"]
        timing = {
            "train_time_s": round(state["elapsed_s"], 3),
            "time_per_step_s": round(state["elapsed_s"] / steps, 4),
        }
        if self.rank == 0:
            io.write_json(self.run_dir / METRICS, metrics)
            io.write_json(self.run_dir / TIMING, timing)
            logged = {f"final/{k}": float(v) for k, v in {**metrics, **timing}.items()}
            self.tracker.log_metrics(logged, steps)
        return TrainResult(self.run_dir, self.run_dir / BEST, {**metrics, **timing})


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` for one worker)."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _to_cpu(state: Any) -> Any:
    """A state dict with its tensors on the CPU (picklable across nodes, loadable on any)."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    return state


def fresh_rank_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of a rank that resumes at ``step`` without a saved RNG state of its own."""
    return (seed * 1_000_003 + step) * 1009 + rank


def _all_reduce_mean(tensors: list[torch.Tensor], world_size: int) -> None:
    """Average ``tensors`` in place across ranks with one all-reduce of their concatenation."""
    import torch.distributed as dist

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

"""The Trainer: seeded, Adam, a step budget, periodic validation, best-validation checkpoint.

One class serves every entry point (CLI, DVC stages, Ray workers, Tune trials). It resumes from
``<run_dir>/last.pt`` when that file exists, so a killed run continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
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
from egat.data.guides import cue_free_guides_root, images_digest
from egat.data.splits import cue_free_root
from egat.data.subsets import stratified_subset
from egat.errors import CheckpointError, EgatError
from egat.methods import Method
from egat.metrics.accuracy import evaluate_accuracy
from egat.models import Classifier, build_model
from egat.resources import suggest_batch_size_on_oom
from egat.seeding import seeded_scope
from egat.tracking import NullTracker, Tracker
from egat.train.guard import OverfitGuard
from egat.train.precision import Precision, compile_backbone
from egat.train.sampler import StepBatchSampler

log = logging.getLogger(__name__)
LAST, BEST, METRICS, TIMING = "last.pt", "best.pt", "train_metrics.json", "train_timing.json"
# Keys that choose where and how a run executes, not what it computes: a run resumes across them.
RUNTIME_KEYS = ("progress", "out_dir", "num_threads", "backend", "max_failures", "storage_path",
                "resources_per_worker", "resume", "label_selector", "min_workers")
MODEL_CHECKPOINT = f"a model checkpoint written by egat train (a run's {BEST})"
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


def resolve_device(params: Params) -> torch.device:
    want = params.train.use_gpu
    if want == "true" and not torch.cuda.is_available():
        raise EgatError("train.use_gpu=true but no CUDA device is visible; use 'auto' or 'false'")
    if want != "false" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def training_domains(params: Params, domains: list[str]) -> list[str]:
    chosen = params.train.domains or domains[:1]
    unknown = [d for d in chosen if d not in domains]
    if unknown:
        raise EgatError(f"train.domains: unknown domain(s) {unknown}; valid: {', '.join(domains)}")
    return chosen


def build_dataset(params: Params, splits: dict, domains: list[str], split: str, augment=False,
                  images: str | None = None):
    data = params.data
    return DomainDataset(
        data.root, splits, domains, split, data.image_size, params.guides.variant, augment,
        guides_root=data.guides_root, images=images or params.train.images,
    )


def check_selection(params: Params, splits: dict) -> None:
    """``train.select`` and ``train.images`` ask only for what the data has."""
    t = params.train
    if cue_free_root(params.data.root, splits) is None:
        for key, value in (("train.select", t.select), ("train.images", t.images)):
            if value.startswith("cue_free"):
                valid = "val, last" if key == "train.select" else "observed"
                raise EgatError(f"{key}={value} needs cue-free renders, which only the embedded "
                                f"benchmark has; use {valid}")


def selection_score(rule: str, val: dict[str, float], step: int) -> float:
    """The number ``train.select`` maximises over validations (higher = the new best.pt)."""
    return {"val": lambda: val["val/acc"], "last": lambda: float(step),
            "cue_free_val": lambda: val["val/cue_free_acc"]}[rule]()


def validation_loader(params: Params, dataset) -> DataLoader:
    """The validation split, or a stratified subset of ``train.val_batches`` batches of it."""
    subset = stratified_subset(dataset, params.train.val_batches * params.eval.batch_size,
                               params.data.split_seed)
    return DataLoader(subset, batch_size=params.eval.batch_size, num_workers=params.data.num_workers)


def params_fingerprint(params: Params, domains: list[str]) -> str:
    """A digest of everything that shapes training, the training domains' images included (the
    same params on changed data, e.g. an image of the user's tree added, removed or edited, is
    another run, not a finished one); a resumed run must match it."""
    raw = params.model_dump(mode="json")
    for volatile in RUNTIME_KEYS:
        raw["train"].pop(volatile, None)
    for group in ("eval", "report", "tune", "study"):
        raw.pop(group, None)
    guides = params.data.guides_root
    if params.train.images == "cue_free":  # the oracle trains on the renders: their digests
        guides = cue_free_guides_root(guides)
    raw["images_sha256"] = {d: images_digest(guides, d) for d in domains}
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()


def checkpoint_payload(model: Classifier, params: Params, splits: dict, **extra) -> dict[str, Any]:
    """What a checkpoint holds: enough to rebuild and evaluate the model with no other file."""
    return {
        "model": model.state_dict(),
        "params": params.model_dump(mode="json"),
        "classes": list(splits["classes"]),
        "domains": list(splits["domains"]),
        **extra,
    }


def validation_metrics(model: Classifier, params: Params, loader, device: torch.device,
                       cue_free_loader=None) -> dict:  # fmt: skip
    """cAcc on the validation ``loader`` (see :func:`validation_loader`), plus ``train.val_metrics``:
    aAcc under ``eval.attack`` and comprehensiveness of ``eval.explainer`` (as in evaluation), and
    cAcc on the cue-free renders of the same images where ``cue_free_loader`` is given; percent.

    The attack's random start draws from a forked RNG seeded by ``train.seed``, so validation is
    deterministic and leaves the training RNG stream untouched.
    """
    t = params.train
    extra = {}
    if cue_free_loader is not None:
        extra["val/cue_free_acc"] = evaluate_accuracy(model, cue_free_loader, device)["clean"]
    if not t.val_metrics:
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


def model_from_checkpoint(path: str | Path) -> tuple[Classifier, Params, dict]:
    path = Path(path)
    if not path.is_file():
        raise EgatError(f"checkpoint {str(path)!r} not found")
    ckpt = io.torch_load(path, MODEL_CHECKPOINT)
    if not isinstance(ckpt, dict) or not {"params", "classes", "model"} <= ckpt.keys():
        raise EgatError(
            f"{str(path)!r} is not a model checkpoint (params, classes, model); pass a run's "
            f"{BEST} ({LAST} holds the training state for resuming)"
        )
    params = params_from_dict(ckpt["params"], source=str(path))
    model = build_model(
        params.model.name, len(ckpt["classes"]), pretrained="none", dropout=params.model.dropout,
        channels_last=params.model.channels_last, input_size=params.model.input_size,
    )
    model.load_state_dict(ckpt["model"])
    return model, params, ckpt


def read_training_state(path: Path) -> dict[str, Any]:
    """A run's last.pt, or an error naming the file and how to start over: a damaged resume
    point never makes a run silently start again from step 0."""
    start_over = "start this run over with train.resume=false (or delete the file)"
    try:
        ckpt = io.torch_load(path, f"the training state {LAST} to resume from; {start_over}")
    except CheckpointError as exc:
        raise CheckpointError(f"cannot resume: {exc}") from None
    if not isinstance(ckpt, dict) or not {"fingerprint", "model", "optimizer", "state"} <= ckpt.keys():
        raise CheckpointError(
            f"cannot resume: {path} is no training state (fingerprint, model, optimizer, state); "
            f"{start_over}"
        )
    return ckpt


class Trainer:
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
        fingerprint = params_fingerprint(p, domains)
        last = self.run_dir / LAST
        ckpt = read_training_state(last) if t.resume and last.is_file() else None
        if ckpt is not None:
            if ckpt["fingerprint"] == fingerprint:
                model.load_state_dict(ckpt["model"])
                optimizer.load_state_dict(ckpt["optimizer"])
                if scheduler is not None:
                    scheduler.load_state_dict(ckpt["scheduler"])
                mine = _rank_state(ckpt, self.rank, self.world_size, method)
                saved, step = len(ckpt.get("ranks") or []), int(ckpt["state"]["step"])
                if saved and saved != self.world_size and self.rank == 0:
                    log.warning(
                        "resuming step %d on %d worker(s) from a checkpoint of %d: each rank's "
                        "shard of the global batch (train.batch_size=%d) and the method state "
                        "(free AT's perturbation) are re-split by the new world size", step,
                        self.world_size, saved, t.batch_size)
                if mine["rng"] is None:
                    fresh = fresh_rank_seed(t.seed, step, self.rank)
                    torch.manual_seed(fresh)
                    log.warning("rank %d has no saved RNG state (the checkpoint has %d ranks): "
                                "seeded afresh with %d", self.rank, saved, fresh)
                else:
                    torch.set_rng_state(mine["rng"])
                if mine.get("cuda_rng") and len(mine["cuda_rng"]) == torch.cuda.device_count():
                    torch.cuda.set_rng_state_all(mine["cuda_rng"])
                state.update(ckpt["state"])
                method.step = state["step"]  # step-scheduled losses (IRM's annealing) continue
                method.load_state_dict(mine["method"])
                precision.load_state_dict(ckpt["precision"])
                log.warning("resuming %s from step %d", self.run_dir, state["step"])
            else:
                log.warning("%s holds a run with other params or data: starting afresh", last)
                (self.run_dir / BEST).unlink(missing_ok=True)
        elif last.is_file():  # train.resume=false: the old run's files are not this run's
            log.warning("train.resume=false: discarding %s and starting afresh", last)
            (self.run_dir / BEST).unlink(missing_ok=True)
        if state["step"] >= t.steps and (self.run_dir / BEST).is_file():
            return self._finish(model, state)

        if len(train_ds) < t.batch_size:
            raise EgatError(
                f"train split of {domains} has {len(train_ds)} images, fewer than "
                f"train.batch_size={t.batch_size}; lower the batch size"
            )
        sampler = StepBatchSampler(
            len(train_ds), t.batch_size, t.seed, t.steps, state["step"], self.rank, self.world_size,
            replays=method.batch_replays,
        )
        # Loaders draw their iterators' base seeds from their own generators, not the global RNG:
        # a resumed run (which creates its iterator at step k) then continues the global RNG
        # stream (dropout, attacks, mixup) exactly as the uninterrupted run does.
        loader = DataLoader(
            train_ds, batch_sampler=sampler, num_workers=p.data.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=p.data.num_workers > 0,
            generator=torch.Generator().manual_seed(t.seed * 1_000_003 + state["step"]),
        )
        val_loader = validation_loader(p, val_ds)
        bar = tqdm(
            total=t.steps, initial=state["step"], disable=not t.progress or self.rank != 0,
            desc=f"train {t.method}", unit="step", dynamic_ncols=True,
        )
        started = time.perf_counter() - state["elapsed_s"]
        latest: dict[str, float] = {}
        model.train()
        for batch in loader:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with precision.autocast():
                out = method.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            precision.backward(out.loss)
            self._sync_gradients(model)
            precision.step(optimizer)
            if scheduler is not None:
                scheduler.step()
            self._sync_buffers(model)
            state["step"] += 1
            step = state["step"]
            if step % 10 == 0 or step == t.steps:
                acc = (out.logits.argmax(1) == batch["label"]).float().mean().item() * 100
                logged = {f"train/{k}": v.item() for k, v in out.terms.items()}
                logged.update({"train/loss": out.loss.item(), "train/acc": acc,
                               "train/lr": optimizer.param_groups[0]["lr"]})
                self.tracker.log_metrics(logged, step)
                latest.update({"train/loss": out.loss.item(), "train/acc": acc})
                bar.set_postfix(loss=f"{out.loss.item():.3f}", best_val=f"{state['best_val_acc']:.1f}")
            if guard is not None and guard.due(step):
                self._check_guard(guard, model, state, step, latest, splits)
            evaluated = step % t.eval_every == 0 or step == t.steps
            checkpointed = step % t.checkpoint_every == 0 or step == t.steps
            if evaluated:
                val = validation_metrics(model, p, val_loader, self.device, cue_free_val)
                val_acc = val["val/acc"]
                self.tracker.log_metrics(val, step)
                latest.update(val)
                state["best_val_acc"] = max(state["best_val_acc"], val_acc)
                score = selection_score(t.select, val, step)
                # With the overfitting guard on, best.pt follows the guard's accuracy instead.
                if score > state["best_score"] and guard is None:
                    state.update(best_score=score, best_step=step)
                    if self.rank == 0:
                        io.torch_save(
                            checkpoint_payload(model, p, splits, step=step, val_acc=val_acc),
                            self.run_dir / BEST,
                        )
                model.train()
            if checkpointed:
                state["elapsed_s"] = time.perf_counter() - started
                # Every rank's own RNG and method state (free AT's perturbation differs by rank).
                ranks = gather_objects({
                    "method": _to_cpu(method.state_dict()), "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all()
                    if self.device.type == "cuda" else None,
                }, self.world_size)
                if self.rank == 0:
                    io.torch_save(
                        {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict() if scheduler is not None else None,
                         "ranks": ranks, "precision": precision.state_dict(),
                         "state": dict(state), "fingerprint": fingerprint},
                        last,
                    )
            if self.on_report is not None and (evaluated or checkpointed):
                self.on_report(step, dict(latest, best_val_acc=state["best_val_acc"]), checkpointed)
            bar.update(1)
        bar.close()
        state["elapsed_s"] = time.perf_counter() - started
        return self._finish(model, state)

    def _check_guard(self, guard, model, state: dict, step: int, latest: dict, splits) -> None:
        """The overfitting guard's check: warn on a collapse, keep the best guard model as best.pt."""
        acc = guard.accuracy(model)
        guard.warn_if_collapsed(acc, state["best_guard_acc"], step)
        self.tracker.log_metrics({"guard/acc": acc}, step)
        latest["guard/acc"] = acc
        if acc > state["best_guard_acc"]:
            state.update(best_guard_acc=acc, best_step=step)
            if self.rank == 0:
                io.torch_save(
                    checkpoint_payload(model, self.params, splits, step=step, guard_acc=acc),
                    self.run_dir / BEST,
                )

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

    def _finish(self, model: Classifier, state: dict) -> TrainResult:
        steps = max(state["step"], 1)
        metrics = {
            "best_val_acc": state["best_val_acc"],
            "best_step": state["best_step"],
            "steps": state["step"],
        }
        if "best_guard_acc" in state:
            metrics["best_guard_acc"] = state["best_guard_acc"]
        # Wall-clock figures live apart so that the metrics file is reproducible byte for byte.
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


def _rank_state(ckpt: dict, rank: int, world_size: int, method: Method) -> dict:
    """Rank ``rank``'s RNG and method state in ``last.pt``, for a run on ``world_size`` ranks.

    The checkpoint holds one state per rank of the run that wrote it. On as many ranks, each gets
    its own. On another number (Ray's elastic training shrank or grew the run, see
    ``train.min_workers``): the method state is re-split by :meth:`Method.reshard_states` (free
    AT's perturbation follows each example of the global batch to its new rank); rank r keeps the
    RNG state of the old rank r, and a rank the checkpoint has none for gets ``rng`` None (the
    caller seeds it afresh); the RNG states of ranks that are gone are dropped. A checkpoint
    written before the per-rank states holds rank 0's only, at the top level: every rank resumes
    from that."""
    ranks = ckpt.get("ranks")
    if not ranks:
        return {"method": ckpt["method"], "rng": ckpt["rng"], "cuda_rng": ckpt.get("cuda_rng")}
    if len(ranks) == world_size:
        return ranks[rank]
    methods = method.reshard_states([r["method"] for r in ranks], world_size)
    own = ranks[rank] if rank < len(ranks) else {"rng": None, "cuda_rng": None}
    return {"method": methods[rank], "rng": own["rng"], "cuda_rng": own.get("cuda_rng")}


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

"""What a run's checkpoints hold, and reading them back.

* ``best.pt`` (:func:`model_checkpoint`): the model with its params, classes and domains, enough
  to rebuild and evaluate it with no other file (:func:`model_from_checkpoint`);
* ``last.pt`` (:func:`training_state`): everything a killed run resumes from (model, optimiser,
  scheduler, every rank's RNG and method state, precision, counters) and the run's
  :func:`params_fingerprint`, which a resumed run must match (:func:`read_training_state`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from egat import io
from egat.build import params_from_dict
from egat.config import RUNTIME_KEYS, Params
from egat.data.guides import cue_free_guides_root, images_digest
from egat.errors import CheckpointError, EgatError
from egat.models import Classifier, build_model
from egat.run.layout import BEST, LAST

MODEL_CHECKPOINT = f"a model checkpoint written by egat train (a run's {BEST})"


def training_domains(params: Params, domains: list[str]) -> list[str]:
    """The domains a run trains on: ``train.domains``, or the first of the data's ``domains``."""
    chosen = params.train.domains or domains[:1]
    unknown = [d for d in chosen if d not in domains]
    if unknown:
        raise EgatError(f"train.domains: unknown domain(s) {unknown}; valid: {', '.join(domains)}")
    return chosen


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


def model_checkpoint(model: Classifier, params: Params, splits: dict, **extra) -> dict[str, Any]:
    """What ``best.pt`` holds: enough to rebuild and evaluate the model with no other file."""
    return {
        "model": model.state_dict(),
        "params": params.model_dump(mode="json"),
        "classes": list(splits["classes"]),
        "domains": list(splits["domains"]),
        **extra,
    }


def model_from_checkpoint(path: str | Path) -> tuple[Classifier, Params, dict]:
    """(the model, its params, the checkpoint) of a ``best.pt``."""
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


def training_state(model, optimizer, scheduler, ranks: list[dict], precision, state: dict,
                   fingerprint: str) -> dict[str, Any]:
    """What ``last.pt`` holds: ``ranks`` is every rank's RNG and method state, in rank order;
    ``state`` the run's counters (step, best scores, elapsed time)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "ranks": ranks, "precision": precision.state_dict(),
            "state": dict(state), "fingerprint": fingerprint}


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


def rank_state(ckpt: dict, rank: int, world_size: int,
               reshard: Callable[[list[dict], int], list[dict]]) -> dict:
    """Rank ``rank``'s RNG and method state in ``last.pt``, for a run on ``world_size`` ranks.

    The checkpoint holds one state per rank of the run that wrote it. On as many ranks, each gets
    its own. On another number (Ray's elastic training shrank or grew the run, see
    ``train.min_workers``): the method state is re-split by ``reshard`` (the method's
    :meth:`~egat.methods.Method.reshard_states`: free AT's perturbation follows each example of
    the global batch to its new rank); rank r keeps the RNG state of the old rank r, and a rank
    the checkpoint has none for gets ``rng`` None (the caller seeds it afresh); the RNG states of
    ranks that are gone are dropped. A checkpoint written before the per-rank states holds rank
    0's only, at the top level: every rank resumes from that."""
    ranks = ckpt.get("ranks")
    if not ranks:
        return {"method": ckpt["method"], "rng": ckpt["rng"], "cuda_rng": ckpt.get("cuda_rng")}
    if len(ranks) == world_size:
        return ranks[rank]
    methods = reshard([r["method"] for r in ranks], world_size)
    own = ranks[rank] if rank < len(ranks) else {"rng": None, "cuda_rng": None}
    return {"method": methods[rank], "rng": own["rng"], "cuda_rng": own.get("cuda_rng")}

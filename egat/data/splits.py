"""Seeded, stratified, stable train/val/test splits, stored as one JSON file per dataset.

Each image's rank in its (domain, class) group is the sha256 of (seed, its relative path), so the
split depends only on the set of paths and the seed, never on listing order; adding or removing a file
keeps the others' order, so only files next to a cut point of that one group can change split.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from egat.data.folder import FolderIndex
from egat.errors import DataError

SPLIT_NAMES = ("train", "val", "test")
_RERUN_PREPARE = "rerun `dvc repro prepare` (or `egat prepare`)"
_REQUIRED_KEYS = ("seed", "fractions", "domains", "classes", "has_masks", "images_root", "splits")


def make_splits(index: FolderIndex, fractions=(0.6, 0.2, 0.2), seed: int = 0) -> dict[str, Any]:
    """Split every (domain, class) group by ``fractions``; lists are sorted relative paths.

    ``images_root``/``masks_root`` are absolute here; :func:`write_splits` stores them relative to
    the splits file's folder when they lie inside it.
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"data.split={list(fractions)}: need three positive fractions summing to 1")
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for path, label, d in zip(index.paths, index.labels, index.domain_ids):
        groups[(d, label)].append(path)
    splits = {domain: {name: [] for name in SPLIT_NAMES} for domain in index.domains}
    for (d, _), paths in sorted(groups.items()):
        ordered = sorted(paths, key=lambda p: hashlib.sha256(f"{seed}/{p}".encode()).hexdigest())
        n = len(ordered)
        cut_train = round(n * fractions[0])
        cut_val = round(n * (fractions[0] + fractions[1]))
        parts = (ordered[:cut_train], ordered[cut_train:cut_val], ordered[cut_val:])
        for name, part in zip(SPLIT_NAMES, parts):
            splits[index.domains[d]][name].extend(part)
    for per_split in splits.values():
        for part in per_split.values():
            part.sort()
    return {
        "seed": seed,
        "fractions": list(fractions),
        "domains": list(index.domains),
        "classes": list(index.classes),
        "has_masks": index.has_masks,
        "images_root": str(index.root.resolve()),
        "masks_root": str(index.masks_root.resolve()) if index.has_masks else None,
        "splits": splits,
    }


def write_splits(path: Path, splits: dict[str, Any]) -> None:
    """Write atomically; roots inside the file's folder are stored relative so the data can move."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = dict(splits)
    for key in ("images_root", "masks_root", "cue_free_root"):
        if stored.get(key):
            stored[key] = _relative_if_inside(Path(stored[key]), path.parent.resolve())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(stored, indent=1))
    os.replace(tmp, path)


def read_splits(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: run `dvc repro prepare` (or `egat prepare`) first")
    try:
        splits = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); {_RERUN_PREPARE}") from None
    missing = [k for k in _REQUIRED_KEYS if k not in splits]
    if missing:
        raise DataError(f"{path}: missing keys {', '.join(missing)}; {_RERUN_PREPARE}")
    return splits


def images_root(data_root: Path, splits: dict[str, Any]) -> Path:
    return Path(data_root) / splits["images_root"]  # an absolute stored root wins the join


def masks_root(data_root: Path, splits: dict[str, Any]) -> Path | None:
    return Path(data_root) / splits["masks_root"] if splits.get("masks_root") else None


def cue_free_root(data_root: Path, splits: dict[str, Any]) -> Path | None:
    """The cue-free counterfactual renders (same relative paths as the images), where the data has them."""
    return Path(data_root) / splits["cue_free_root"] if splits.get("cue_free_root") else None


def domain_paths(splits: dict[str, Any], domain: str) -> list[str]:
    """All images of a domain in split-file order (train, val, test): the order of its guide file."""
    return [p for name in SPLIT_NAMES for p in splits["splits"][domain][name]]


def _relative_if_inside(path: Path, folder: Path) -> str:
    resolved = path.resolve()
    return resolved.relative_to(folder).as_posix() if resolved.is_relative_to(folder) else str(resolved)

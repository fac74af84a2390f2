"""DomainBed-style image trees ``<root>/<domain>/<class>/*``: index them, check them, decode them."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image

from egat.errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp"}
MASKS_DIR = "masks"  # a parallel tree <root>/../masks/<domain>/<class>/<image stem>.png
_MAX_LISTED = 10


@dataclass(frozen=True)
class FolderIndex:
    root: Path  # the images tree
    masks_root: Path | None  # the parallel masks tree, when there is one
    domains: list[str]
    classes: list[str]
    paths: list[str]  # POSIX paths relative to root, "<domain>/<class>/<file>", sorted
    labels: list[int]  # index into classes
    domain_ids: list[int]  # index into domains
    masks: list[str | None]  # mask path relative to masks_root, None where missing

    @property
    def has_masks(self) -> bool:
        return self.masks_root is not None and all(m is not None for m in self.masks)


def decode_rgb(data: bytes, size: int | None, source: str) -> np.ndarray:
    """Encoded image bytes -> (size, size, 3) uint8 RGB, area-resized (the one resize of the project);
    ``size=None`` keeps the stored size."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DataError(f"{source}: OpenCV cannot decode this image; rerun `egat prepare`")
    return cv2.cvtColor(_resize(bgr, size), cv2.COLOR_BGR2RGB)


def decode_mask(data: bytes, size: int | None, source: str) -> np.ndarray:
    """Encoded mask bytes -> (size, size) uint8 in {0, 255} (object where the resized mask is >= 50%)."""
    gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise DataError(f"{source}: OpenCV cannot decode this mask")
    return np.where(_resize(gray, size) >= 128, 255, 0).astype(np.uint8)


def _resize(image: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or image.shape[:2] == (size, size):
        return image
    # Area averaging is the right filter for shrinking; INTER_AREA is near-nearest when enlarging.
    shrinking = min(image.shape[:2]) >= size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def mask_relpath(image_relpath: str) -> str:
    """Masks are lossless PNGs named after their image: a/b/x.jpg -> a/b/x.png."""
    return Path(image_relpath).with_suffix(".png").as_posix()


def scan_folder(root: Path, on_corrupt: Literal["error", "skip"] = "error") -> FolderIndex:
    """Index ``root``; every image is decoded once so that corrupt files are found now, not mid-training.

    Raises DataError for a missing root, domains with differing class sets, empty class folders, and
    (with ``on_corrupt="error"``) unreadable or non-image files; ``"skip"`` warns and leaves those out.
    """
    if on_corrupt not in ("error", "skip"):
        raise DataError(f"data.on_corrupt={on_corrupt!r} is not valid; use error or skip")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} not found; expected a <root>/<domain>/<class>/<image> tree")
    domains = _subdirs(root)
    if not domains:
        raise DataError(f"{root}: no domain folders; expected a <root>/<domain>/<class>/<image> tree")
    classes = _common_classes(root, domains)

    candidates: list[tuple[str, int, int]] = []
    bad: list[str] = []
    for d, domain in enumerate(domains):
        for label, cls in enumerate(classes):
            for entry in _visible(root / domain / cls):
                rel = f"{domain}/{cls}/{entry.name}"
                if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                    candidates.append((rel, label, d))
                else:
                    bad.append(rel)
    readable = _decodable([root / rel for rel, _, _ in candidates])
    bad += [rel for (rel, _, _), ok in zip(candidates, readable) if not ok]
    kept = sorted(c for c, ok in zip(candidates, readable) if ok)
    _report_bad(root, sorted(bad), on_corrupt)
    _check_no_empty_class(root, domains, classes, kept)

    masks_root = root.parent / MASKS_DIR
    masks: list[str | None] = [None] * len(kept)
    if masks_root.is_dir() and masks_root.resolve() != root.resolve():
        masks = [m if (masks_root / m).is_file() else None for m in (mask_relpath(rel) for rel, _, _ in kept)]
        missing = sum(m is None for m in masks)
        if missing:
            warnings.warn(f"{masks_root}: {missing} of {len(kept)} images lack a mask; golden guides are off")
    else:
        masks_root = None
    return FolderIndex(
        root=root,
        masks_root=masks_root,
        domains=domains,
        classes=classes,
        paths=[rel for rel, _, _ in kept],
        labels=[label for _, label, _ in kept],
        domain_ids=[d for _, _, d in kept],
        masks=masks,
    )


def _visible(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _subdirs(folder: Path) -> list[str]:
    return [e.name for e in _visible(folder) if e.is_dir()]


def _common_classes(root: Path, domains: list[str]) -> list[str]:
    per_domain = {d: set(_subdirs(root / d)) for d in domains}
    union = set().union(*per_domain.values())
    differing = {d: sorted(union - s) for d, s in per_domain.items() if s != union}
    if differing:
        def found(cls: str) -> str:
            return ", ".join(f"{d}/{cls}" for d in domains if cls in per_domain[d])

        detail = "; ".join(
            f"{d} lacks {', '.join(f'{c} (found: {found(c)})' for c in missing)}"
            for d, missing in differing.items()
        )
        raise DataError(
            f"{root}: domains have different class folders ({detail}); every domain needs the same "
            f"classes: {', '.join(sorted(union))}"
        )
    return sorted(union)


def _decodable(paths: list[Path]) -> list[bool]:
    # OpenCV decodes a truncated JPEG without an error (grey fill), so Pillow, which refuses
    # truncated files, checks completeness first; then OpenCV, which training decodes with.
    # Reduced-size decodes still read every byte; both release the GIL, so threads scale.
    def ok(path: Path) -> bool:
        try:
            with Image.open(path) as image:
                image.draft("L", (image.width // 2, image.height // 2))
                image.load()
        except Exception:  # truncated, not an image, a decompression bomb
            return False
        return cv2.imread(str(path), cv2.IMREAD_REDUCED_GRAYSCALE_2) is not None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(ok, paths, chunksize=64))


def _report_bad(root: Path, bad: list[str], on_corrupt: str) -> None:
    if not bad:
        return
    listed = ", ".join(bad[:_MAX_LISTED])
    if len(bad) > _MAX_LISTED:
        listed += f" and {len(bad) - _MAX_LISTED} more"
    what = f"{root}: {len(bad)} unreadable, corrupt or non-image files ({listed})"
    if on_corrupt == "error":
        raise DataError(f"{what}; remove them or set data.on_corrupt=skip to leave them out")
    warnings.warn(f"{what}; skipped (data.on_corrupt=skip)")


def _check_no_empty_class(root: Path, domains: list[str], classes: list[str], kept: list[tuple]) -> None:
    present = {(d, label) for _, label, d in kept}
    empty = [f"{domains[d]}/{c}" for d in range(len(domains)) for label, c in enumerate(classes)
             if (d, label) not in present]  # fmt: skip
    if empty:
        raise DataError(f"{root}: class folders without readable images: {', '.join(empty)}")

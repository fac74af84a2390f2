"""The training/evaluation dataset: images of some domains and one split, with their guide maps."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from egat.data.folder import decode_rgb
from egat.data.guides import (
    cue_free_guides_root,
    default_guides_root,
    digest_images,
    guide_path,
    load_guides,
    split_images_dir,
)
from egat.data.splits import SPLIT_NAMES, domain_paths
from egat.errors import DataError

GuideVariant = Literal["grayscale", "noisy", "golden"]
ImageSet = Literal["observed", "cue_free"]
IN_MEMORY_LIMIT_BYTES = 256 * 2**20  # decode once and keep when the split's pixels fit in this
_RERUN_GUIDES = "rerun the guides stage (`dvc repro guides` or `egat guides`)"


def dataset_info(splits: dict[str, Any]) -> tuple[list[str], list[str], bool]:
    """(domains, classes, has_masks) of a splits dict."""
    return list(splits["domains"]), list(splits["classes"]), bool(splits["has_masks"])


class DomainDataset(Dataset):
    """Items: ``image`` (3,S,S) float32 [0,1], ``label``/``domain``/``index`` int64, ``guide``
    (1,S,S) float32 [0,1] (grayscale, or the mask for `golden`; `noisy` gets its noise later in
    :func:`egat.data.guides.guide_at`), ``mask`` (1,S,S) float32 {0,1} when the data has masks,
    and ``cue`` int64 (the class the image's spurious cue points to; -1 where none is known).

    ``images="cue_free"`` serves the counterfactual renders of the same images (docs/data.md).

    ``index`` is the image's id across the whole dataset: its row in its domain's guide file plus the
    sizes of the domains before it in ``splits["domains"]``.
    """

    def __init__(self, data_root: Path, splits: dict[str, Any], domains: list[str],
                 split: Literal["train", "val", "test"], image_size: int,
                 guide_variant: GuideVariant = "grayscale", augment: bool = False,
                 guides_root: Path | None = None, images: ImageSet = "observed"):  # fmt: skip
        if split not in SPLIT_NAMES:
            raise DataError(f"split={split!r} is not valid; use one of {', '.join(SPLIT_NAMES)}")
        if guide_variant not in ("grayscale", "noisy", "golden"):
            raise DataError(f"guides.variant={guide_variant!r} is not valid; use grayscale, noisy or golden")
        unknown = [d for d in domains if d not in splits["domains"]]
        if unknown or not domains:
            valid = ", ".join(splits["domains"])
            raise DataError(f"domains {unknown or domains} are not domains of the dataset; valid: {valid}")
        self.has_masks = bool(splits["has_masks"])
        if guide_variant == "golden" and not self.has_masks:
            raise DataError("guides.variant=golden needs object masks, which this dataset does not have; "
                            "use grayscale or noisy")  # fmt: skip
        self.image_size = image_size
        self.guide_variant = guide_variant
        self.classes = list(splits["classes"])
        self._image_dir = split_images_dir(data_root, splits, images)
        guides_root = guides_root or default_guides_root(data_root)
        if images == "cue_free":
            guides_root = cue_free_guides_root(guides_root)
        class_ids = {c: i for i, c in enumerate(self.classes)}

        offsets = np.cumsum([0] + [len(domain_paths(splits, d)) for d in splits["domains"]])
        paths, indices, domain_ids, grays, masks, encoded = [], [], [], [], [], []
        for domain in domains:
            d = splits["domains"].index(domain)
            guides, rows = _checked_guides(guides_root, splits, domain, split, image_size)
            split_paths = splits["splits"][domain][split]
            expected_sha = guides["file_sha256"][rows].tolist()
            source = guide_path(guides_root, domain)
            encoded += _verified_bytes(self._image_dir, split_paths, expected_sha, source)
            paths += split_paths
            indices.append(offsets[d] + rows)
            domain_ids += [d] * len(rows)
            grays.append(guides["grayscale"][rows])
            if self.has_masks:
                masks.append(guides["mask"][rows])

        self.paths = paths
        self.labels = torch.tensor([class_ids[p.split("/")[1]] for p in paths], dtype=torch.int64)
        cue_of = splits.get("cue_class") or {}
        self.cues = torch.tensor([cue_of.get(p, -1) for p in paths], dtype=torch.int64)
        self.domains = torch.tensor(domain_ids, dtype=torch.int64)
        self.indices = torch.from_numpy(np.concatenate(indices)).long()
        self._gray = np.concatenate(grays)
        self._mask = np.concatenate(masks) if masks else None
        # Small data is decoded once: the train loop reads every image at every step.
        self._images = None
        if paths and len(paths) * 3 * image_size**2 <= IN_MEMORY_LIMIT_BYTES:
            self._images = np.stack([decode_rgb(b, image_size, p) for b, p in zip(encoded, paths)])
        self._augment = _Augment(image_size) if augment else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._images is not None:
            rgb = self._images[i]
        else:
            path = self._image_dir / self.paths[i]
            rgb = decode_rgb(path.read_bytes(), self.image_size, str(path))
        image = _unit_float(rgb).permute(2, 0, 1)
        mask = _unit_float(self._mask[i])[None] if self._mask is not None else None
        gray = _unit_float(self._gray[i])[None] if self.guide_variant != "golden" else None
        if self._augment is not None:
            image, gray, mask = self._augment(image, gray, mask)
        guide = mask if gray is None else gray
        item = {
            "image": image,
            "label": self.labels[i],
            "domain": self.domains[i],
            "index": self.indices[i],
            "cue": self.cues[i],
            "guide": guide,
        }
        if mask is not None:
            item["mask"] = mask
        return item


class _Augment:
    """Random resized crop (scale 0.7-1) + horizontal flip, identical for image, guide and mask
    (the mask resampled nearest), then light colour jitter on the image only (no hue shift: the
    background tint is part of what the benchmarks test)."""

    def __init__(self, size: int):
        # torchvision only when augmenting (egat/models/zoo.py says what the import costs)
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        self.tv_tensors = tv_tensors
        self.geometric = v2.Compose([
            v2.RandomResizedCrop((size, size), scale=(0.7, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ])  # fmt: skip
        self.colour = v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)

    def __call__(self, image, gray, mask):
        # Only the maps present are passed, so that one sampled crop/flip applies to all of them.
        tv = self.tv_tensors
        maps = [tv.Image(image)]
        maps += [tv.Image(gray)] if gray is not None else []
        maps += [tv.Mask(mask)] if mask is not None else []
        out = [m.as_subclass(torch.Tensor) for m in self.geometric(tuple(maps))]
        image = self.colour(out.pop(0)).clamp_(0, 1)
        gray = out.pop(0).clamp_(0, 1) if gray is not None else None
        mask = out.pop(0) if mask is not None else None
        return image, gray, mask


def _checked_guides(guides_root: Path, splits: dict, domain: str, split: str, image_size: int):
    """The domain's guide arrays and the rows of this split, after checking they fit the splits."""
    path = guide_path(guides_root, domain)
    guides = load_guides(guides_root, domain)
    expected = domain_paths(splits, domain)
    if guides["paths"].tolist() != expected:
        raise DataError(f"{path}: guides were computed from other images than the splits; {_RERUN_GUIDES}")
    guide_size = int(guides["image_size"])
    if guide_size != image_size:
        raise DataError(f"{path}: guides are {guide_size} px, data.image_size={image_size}; {_RERUN_GUIDES}")
    if splits["has_masks"] and "mask" not in guides:
        raise DataError(f"{path}: no masks in the guide file although the data has masks; {_RERUN_GUIDES}")
    if digest_images(guides["file_sha256"].tolist()) != str(guides["images_sha256"]):
        raise DataError(f"{path}: the guide file is inconsistent (images_sha256); {_RERUN_GUIDES}")
    start = sum(len(splits["splits"][domain][name]) for name in SPLIT_NAMES[: SPLIT_NAMES.index(split)])
    return guides, np.arange(start, start + len(splits["splits"][domain][split]))


def _verified_bytes(image_dir: Path, paths: list[str], expected_sha: list[str], source: Path) -> list[bytes]:
    """Read the split's image files and check them against the digests the guides were made from."""
    encoded, changed = [], []
    for rel, expected in zip(paths, expected_sha):
        try:
            data = (image_dir / rel).read_bytes()
        except OSError as exc:
            raise DataError(f"{image_dir / rel}: unreadable ({exc.strerror}); rerun `egat prepare`") from None
        if hashlib.sha256(data).hexdigest() != expected:
            changed.append(rel)
        encoded.append(data)
    if changed:
        raise DataError(
            f"{source}: guides were computed from other images: {len(changed)} files changed since "
            f"(e.g. {', '.join(changed[:3])}); {_RERUN_GUIDES}"
        )
    return encoded


def _unit_float(pixels: np.ndarray) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).float().div_(255)

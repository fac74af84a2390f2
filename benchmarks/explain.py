"""Grad-CAM: our closed form and autograd paths vs captum's LayerGradCam vs pytorch-grad-cam
(the `grad-cam` package), same model (eval mode), layer (the backbone's output) and batch.

Maps are compared after one normalisation: resized to the input with cv2 (as pytorch-grad-cam does)
and scaled to exactly [0, 1] per image (min-max), since each library adds its own epsilon to the
max (pytorch-grad-cam 1e-7 on the raw CAM's scale) and rescales after resizing.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from benchmarks.timing import Row, missing_extra, round_robin
from egat.explain import normalise_maps
from egat.explain.gradcam import GradCAM

CAPTUM_SPEEDUP, PGC_SPEEDUP, MAP_TOL = 3.0, 5.0, 1e-5


def gradcam_rows(model, x: torch.Tensor, y: torch.Tensor, repeats: int, warmup: int) -> list[Row]:
    from captum.attr import LayerGradCam

    closed, autograd = GradCAM(model, closed_form=True), GradCAM(model, closed_form=False)
    captum = LayerGradCam(model, model.backbone)
    fns = {
        "ours closed form": lambda: closed.attribute(x, y),
        "ours autograd": lambda: autograd.attribute(x, y),
        "captum LayerGradCam": lambda: normalise_maps(
            captum.attribute(x, target=y, relu_attributions=True)[:, 0]).detach(),
    }
    missing = None
    try:
        from pytorch_grad_cam import GradCAM as PGCGradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        pgc = PGCGradCAM(model=model, target_layers=[model.backbone])
        targets = [ClassifierOutputTarget(int(c)) for c in y]
        fns["pytorch-grad-cam"] = lambda: pgc(input_tensor=x, targets=targets)
    except ImportError as exc:
        missing = missing_extra("gradcam", "pytorch-grad-cam", "grad-cam", exc)
    # The floor: both ours (closed form) and captum cost about one forward pass.
    fns["model forward alone"] = lambda: model(x).detach()
    med = round_robin(fns, repeats, warmup)
    maps = {name: fn() for name, fn in fns.items()}

    def common(m) -> np.ndarray:
        m = m if isinstance(m, np.ndarray) else m.detach().float().numpy()
        if m.shape[-2:] != x.shape[-2:]:  # pytorch-grad-cam's maps come at the input size
            m = np.stack([cv2.resize(a, x.shape[-1:-3:-1]) for a in m])
        low, high = m.min((1, 2), keepdims=True), m.max((1, 2), keepdims=True)
        return (m - low) / np.maximum(high - low, 1e-12)

    ref = common(maps["ours closed form"])
    rows = [Row("gradcam", "ours closed form", med["ours closed form"] * 1e3, "ms",
                note=f"batch {len(x)}")]
    targets_by_name = {"captum LayerGradCam": CAPTUM_SPEEDUP, "pytorch-grad-cam": PGC_SPEEDUP}
    for name in fns:
        if name == "ours closed form":
            continue
        if name == "model forward alone":
            rows.append(Row("gradcam", name, med[name] * 1e3, "ms", "ours closed form",
                            med[name] / med["ours closed form"], note="no map: the cost floor"))
            continue
        speedup = med[name] / med["ours closed form"]
        diff = float(np.abs(common(maps[name]) - ref).max())
        goal = targets_by_name.get(name)
        rows.append(Row(
            "gradcam", name, med[name] * 1e3, "ms", "ours closed form", speedup, diff,
            target=f"ours >= {goal:g}x faster, maps within {MAP_TOL:g}" if goal else
            f"maps within {MAP_TOL:g}",
            met=(speedup >= goal if goal else True) and diff <= MAP_TOL,
        ))
    if missing:
        rows.append(missing)
    return rows

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

from benchmarks.timing import Row, all_of, missing_extra, round_robin
from egat.explain import normalise_maps
from egat.explain.gradcam import GradCAM

# The physical floor: a Grad-CAM map needs the forward pass, and our closed form adds only the
# logits' weight rows times the features, so its cost is at most 1.1x that forward pass. (Speed-ups
# over captum / pytorch-grad-cam are shown but not targets: captum's extra work at this layer is
# one backward through GAP + linear, a cost the model's size sets, not the implementation.)
FLOOR_RATIO, MAP_TOL = 1.1, 1e-5


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
    fns["model forward alone"] = lambda: model(x).detach()
    timings = round_robin(fns, repeats, warmup)
    maps = {name: fn() for name, fn in fns.items()}

    def common(m) -> np.ndarray:
        m = m if isinstance(m, np.ndarray) else m.detach().float().numpy()
        if m.shape[-2:] != x.shape[-2:]:  # pytorch-grad-cam's maps come at the input size
            m = np.stack([cv2.resize(a, x.shape[-1:-3:-1]) for a in m])
        low, high = m.min((1, 2), keepdims=True), m.max((1, 2), keepdims=True)
        return (m - low) / np.maximum(high - low, 1e-12)

    ref = common(maps["ours closed form"])
    floor = timings.ratio("ours closed form", "model forward alone")
    rows = [Row("gradcam", "ours closed form", timings.median("ours closed form") * 1e3, "ms",
                "model forward alone", target=f"<= {FLOOR_RATIO:g}x the forward pass",
                met=floor.at_most(FLOOR_RATIO), note=f"batch {len(x)}").with_spread(floor),
            Row("gradcam", "model forward alone", timings.median("model forward alone") * 1e3,
                "ms", note="no map: the cost floor")]
    for name in fns:
        if name in ("ours closed form", "model forward alone"):
            continue
        diff = float(np.abs(common(maps[name]) - ref).max())
        rows.append(Row(
            "gradcam", name, timings.median(name) * 1e3, "ms", "ours closed form", diff=diff,
            target=f"maps within {MAP_TOL:g}", met=all_of(diff <= MAP_TOL),
            note="ratio: its time / ours" if name != "ours autograd" else "",
        ).with_spread(timings.ratio(name, "ours closed form")))
    if missing:
        rows.append(missing)
    return rows

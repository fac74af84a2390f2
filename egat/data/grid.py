"""A PNG overview of a prepared dataset: one row per domain, one sample per class, masks below."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from egat.data.folder import decode_mask, decode_rgb, mask_relpath
from egat.data.splits import domain_paths, images_root, masks_root


def save_sample_grid(data_root: Path, splits: dict[str, Any], out_png: Path, per_domain: int = 10,
                     image_size: int | None = None) -> None:  # fmt: skip
    """Plot the first image of each of the first ``per_domain`` classes in every domain (atomic write).

    ``image_size`` resizes the images for display (None: as stored, which shows the true pixels).
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    image_dir = images_root(data_root, splits)
    mask_dir = masks_root(data_root, splits) if splits["has_masks"] else None
    classes = splits["classes"][:per_domain]
    rows_per_domain = 2 if mask_dir is not None else 1
    n_rows = rows_per_domain * len(splits["domains"])
    fig = Figure(figsize=(1.1 * len(classes) + 0.6, 1.15 * n_rows))
    axes = fig.subplots(n_rows, len(classes), squeeze=False)
    for d, domain in enumerate(splits["domains"]):
        first_of_class = {}
        for rel in domain_paths(splits, domain):
            first_of_class.setdefault(rel.split("/")[1], rel)
        for c, cls in enumerate(classes):
            rel = first_of_class[cls]
            top = axes[d * rows_per_domain, c]
            top.imshow(decode_rgb((image_dir / rel).read_bytes(), image_size, rel), interpolation="nearest")
            if d == 0:
                top.set_title(cls, fontsize=8)
            if mask_dir is not None:
                mask = decode_mask((mask_dir / mask_relpath(rel)).read_bytes(), image_size, rel)
                below = axes[d * rows_per_domain + 1, c]
                below.imshow(mask, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axes[d * rows_per_domain, 0].set_ylabel(domain, fontsize=9)
        if mask_dir is not None:
            axes[d * rows_per_domain + 1, 0].set_ylabel("mask", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.3)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=80)
    os.replace(tmp, out_png)

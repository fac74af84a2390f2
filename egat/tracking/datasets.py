"""What a run trained and was tested on, as MLflow dataset inputs (``mlflow.log_input``): one
dataset per (domain, split), named ``<data.name>/<domain>/<split>``, with the digest of exactly
those image files; MLflow's runs table shows them in its Dataset column.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from egat.config import DataParams

# MLflow's context names for the splits (input tag mlflow.data.context).
CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}
DIGEST_CHARS = 16  # MLflow stores a dataset digest in 36 characters


@dataclass(frozen=True)
class SplitInput:
    dataset: object  # mlflow.data.meta_dataset.MetaDataset
    context: str
    tags: dict[str, str]


def split_inputs(data: DataParams, domains: list[str], split_names: list[str]) -> list[SplitInput]:
    """The datasets of ``split_names`` of ``domains``. The digest is over the images' sha256s as
    the guide files record them (in split-file order: train, val, test); the dataset checks
    those against the image bytes whenever it loads a split."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.meta_dataset import MetaDataset

    from egat.data.guides import digest_images, guide_path
    from egat.data.splits import SPLIT_NAMES, images_root, read_splits

    splits = read_splits(data.splits_file)
    # A "local" source by type: resolving a path finds two local source classes and warns.
    uri = str(images_root(data.root, splits).resolve())
    source = get_dataset_source_from_json(json.dumps({"uri": uri}), "local")
    inputs = []
    for domain in domains:
        with np.load(guide_path(data.guides_root, domain), allow_pickle=False) as npz:
            shas = npz["file_sha256"].tolist()  # reads this array only, not the maps
        start = 0
        for split in SPLIT_NAMES:
            count = len(splits["splits"][domain][split])
            if split in split_names:
                digest = digest_images(shas[start:start + count])[:DIGEST_CHARS]
                dataset = MetaDataset(source, name=f"{data.name}/{domain}/{split}", digest=digest)
                tags = {"dataset": data.name, "domain": domain, "split": split,
                        "images": str(count)}
                inputs.append(SplitInput(dataset, CONTEXTS[split], tags))
            start += count
    return inputs

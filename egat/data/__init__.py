"""Datasets: the embedded benchmark, folder trees, splits, guide maps and the torch Dataset."""

from egat.data.dataset import DomainDataset, dataset_info
from egat.data.embedded import ANIMAL_CLASSES, build_embedded
from egat.data.folder import FolderIndex, scan_folder
from egat.data.grid import save_sample_grid
from egat.data.guides import compute_guides, grayscale, guide_at, guide_path, load_guides
from egat.data.safe_pickle import load_numpy_pickle
from egat.data.splits import images_root, make_splits, masks_root, read_splits, write_splits

__all__ = [
    "ANIMAL_CLASSES",
    "DomainDataset",
    "FolderIndex",
    "build_embedded",
    "compute_guides",
    "dataset_info",
    "grayscale",
    "guide_at",
    "guide_path",
    "images_root",
    "load_guides",
    "load_numpy_pickle",
    "make_splits",
    "masks_root",
    "read_splits",
    "save_sample_grid",
    "scan_folder",
    "write_splits",
]

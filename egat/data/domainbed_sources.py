"""The real DomainBed datasets, downloaded and arranged as ``<out_root>/<domain>/<class>/<image>``.

Follows DomainBed's domainbed/scripts/download.py (download_vlcs, download_terra_incognita). Downloads
are cached in ``raw_dir``; the tree is built in a temp folder next to ``out_root`` and renamed into
place when complete, so ``out_root`` either does not exist or holds the whole dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator
from urllib.parse import urlsplit

from egat.config import SourceParams
from egat.data.archive import ARCHIVE_SUFFIXES, extract
from egat.data.download import download
from egat.errors import DataError

# Domain -> the folder names it may have in an archive (matched case-insensitively).
VLCS_DOMAINS = {
    "Caltech101": ("caltech101", "caltech"),
    "LabelMe": ("labelme",),
    "SUN09": ("sun09", "sun"),
    "VOC2007": ("voc2007", "voc", "pascal"),
}
VLCS_CLASSES = ("bird", "car", "chair", "dog", "person")
TERRA_LOCATIONS = ("38", "43", "46", "100")
TERRA_CLASSES = (
    "bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel",
)
# The data.sources entries each dataset downloads, in the order its prepare function takes them.
SOURCE_KEYS = {
    "vlcs": ("vlcs",),
    "terra_incognita": ("terra_incognita_images", "terra_incognita_annotations"),
}
_MAX_LISTED = 5


def prepare_source(
    name: str, sources: dict[str, SourceParams], raw_dir: str | Path, out_root: str | Path
) -> Path:
    """Download and arrange dataset ``name`` (vlcs | terra_incognita) unless ``out_root`` already exists.

    An existing ``out_root`` is complete (it only ever appears whole): delete it to prepare it again.
    """
    if name not in SOURCE_KEYS:
        raise DataError(f"no download for dataset {name!r}; valid: {', '.join(SOURCE_KEYS)}")
    missing = [key for key in SOURCE_KEYS[name] if key not in sources]
    if missing:
        raise DataError(f"data.sources has no entry {', '.join(missing)} (a url and a sha256) for {name}")
    out_root = Path(out_root)
    if out_root.is_dir():
        return out_root
    prepare = {"vlcs": prepare_vlcs, "terra_incognita": prepare_terra_incognita}[name]
    return prepare(*(sources[key] for key in SOURCE_KEYS[name]), Path(raw_dir), out_root)


def prepare_vlcs(source: SourceParams, raw_dir: str | Path, out_root: str | Path) -> Path:
    """DomainBed's VLCS.tar.gz -> ``out_root/{Caltech101,LabelMe,SUN09,VOC2007}/{bird,...,person}/*``."""
    with _staged(Path(out_root)) as (scratch, out):
        archive = _download(source, Path(raw_dir), "VLCS.tar.gz")
        extracted = extract(archive, scratch / "extracted")
        for domain, domain_dir in _find_vlcs_domains(extracted, archive).items():
            classes = _match_folders(domain_dir, {c: (c,) for c in VLCS_CLASSES})
            missing = [c for c in VLCS_CLASSES if c not in classes]
            if missing:
                raise DataError(
                    f"{archive}: {domain_dir.relative_to(extracted)} lacks the VLCS classes "
                    f"{', '.join(missing)}; it holds {', '.join(_folder_names(domain_dir)) or 'no folders'}"
                )
            (out / domain).mkdir()
            for cls, class_dir in classes.items():
                os.rename(class_dir, out / domain / cls)
    return Path(out_root)


def prepare_terra_incognita(
    images: SourceParams, annotations: SourceParams, raw_dir: str | Path, out_root: str | Path
) -> Path:
    """Caltech Camera Traps ECCV'18 images + annotations JSON -> ``out_root/location_<L>/<class>/*``.

    Keeps DomainBed's locations 38, 43, 46, 100 and its ten classes; an image annotated with two kept
    classes goes to both folders. Images are hardlinked (copied where links are not possible).
    """
    raw_dir = Path(raw_dir)
    with _staged(Path(out_root)) as (scratch, out):
        images_archive = _download(images, raw_dir, "eccv_18_all_images_sm.tar.gz")
        labels_file = _download(annotations, raw_dir, "caltech_camera_traps.json.zip")
        selection = _terra_selection(_load_annotations(labels_file, scratch), labels_file)
        image_root = _single_folder(extract(images_archive, scratch / "images"))
        _link_images(selection, image_root, out, images_archive)
        for location in TERRA_LOCATIONS:
            absent = [c for c in TERRA_CLASSES if not (out / f"location_{location}" / c).is_dir()]
            if absent:
                warnings.warn(f"{labels_file}: location {location} has no images of {', '.join(absent)}")
    return Path(out_root)


def _download(source: SourceParams, raw_dir: Path, default_name: str) -> Path:
    """Download into ``raw_dir`` under the URL's file name, or ``default_name`` when it has none we know."""
    name = PurePosixPath(urlsplit(source.url).path).name
    if not name.lower().endswith(ARCHIVE_SUFFIXES + (".json",)):
        name = default_name
    return download(source.url, raw_dir / name, source.sha256 or None)


@contextmanager
def _staged(out_root: Path) -> Iterator[tuple[Path, Path]]:
    """Yield (scratch folder, the tree to fill); the tree becomes ``out_root`` only if the block succeeds."""
    if out_root.exists():
        raise DataError(f"{out_root} already exists; delete it to prepare the dataset again")
    out_root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_root.name}.", suffix=".partial", dir=out_root.parent))
    try:
        out = work / "out"
        out.mkdir()
        yield work, out
        os.rename(out, out_root)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _folder_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def _match_folders(folder: Path, wanted: dict[str, tuple[str, ...]]) -> dict[str, Path]:
    """{canonical name: subfolder of ``folder`` spelled as one of its aliases, in any case}."""
    by_name = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    found = {}
    for canonical, aliases in wanted.items():
        match = next((by_name[a] for a in aliases if a in by_name), None)
        if match is not None:
            found[canonical] = match
    return found


def _find_vlcs_domains(extracted: Path, archive: Path) -> dict[str, Path]:
    """The first folder (top-down) that holds all four VLCS domains, whatever its depth in the archive."""
    for folder, _, _ in os.walk(extracted):
        domains = _match_folders(Path(folder), VLCS_DOMAINS)
        if len(domains) == len(VLCS_DOMAINS):
            return domains
    raise DataError(
        f"{archive}: no folder holds the VLCS domains {', '.join(VLCS_DOMAINS)} (any case; also "
        "caltech, sun, voc, pascal); its top level holds "
        f"{', '.join(_folder_names(extracted)) or 'no folders'}"
    )


def _load_annotations(path: Path, scratch: Path) -> dict:
    """The COCO Camera Traps JSON, given as is or as the only .json inside an archive."""
    if not path.name.lower().endswith(".json"):
        found = sorted(extract(path, scratch / "annotations").rglob("*.json"))
        if len(found) != 1:
            raise DataError(f"{path}: expected one .json annotations file inside, found {len(found)}")
        path = found[0]
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise DataError(f"{path}: not a COCO Camera Traps file: no {', '.join(missing)} key")
    return data


def _terra_selection(data: dict, source: Path) -> list[tuple[str, str, str]]:
    """(location, class, file_name) of every kept image and class, in the annotation file's order."""
    try:
        names = {c["id"]: c["name"] for c in data["categories"]}
        kept_classes: dict[object, dict[str, None]] = defaultdict(dict)  # image id -> ordered set of classes
        for ann in data["annotations"]:
            name = names[ann["category_id"]]
            if name in TERRA_CLASSES:
                kept_classes[ann["image_id"]][name] = None
        selection = [
            (str(image["location"]), name, image["file_name"])
            for image in data["images"]
            if str(image["location"]) in TERRA_LOCATIONS  # some versions store locations as numbers
            for name in kept_classes.get(image["id"], ())
        ]
    except (KeyError, TypeError) as exc:
        raise DataError(f"{source}: a record lacks the key or has the wrong type: {exc}") from None
    present = {location for location, _, _ in selection}
    absent = [location for location in TERRA_LOCATIONS if location not in present]
    if absent:
        raise DataError(
            f"{source}: no images of the kept classes at locations {', '.join(absent)}; "
            "expected the Caltech Camera Traps annotations (caltech_images_*.json)"
        )
    return selection


def _single_folder(folder: Path) -> Path:
    """Descend through folders that hold nothing but one folder (an archive's top-level directory)."""
    while len(entries := list(folder.iterdir())) == 1 and entries[0].is_dir():
        folder = entries[0]
    return folder


def _link_images(selection: list[tuple[str, str, str]], image_root: Path, out: Path, archive: Path) -> None:
    root = image_root.resolve()
    missing = []
    for location, name, file_name in selection:
        src = image_root / file_name
        if not src.resolve().is_relative_to(root):
            raise DataError(f"annotations name an image outside {archive}: {file_name!r}")
        if not src.is_file():
            missing.append(file_name)
            continue
        dst = out / f"location_{location}" / name / PurePosixPath(file_name).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # a filesystem without hardlinks
            shutil.copy2(src, dst)
    if missing:
        raise DataError(
            f"{archive}: {len(missing)} of the {len(selection)} selected images are missing "
            f"(e.g. {', '.join(missing[:_MAX_LISTED])}); do the images archive and the annotations match?"
        )

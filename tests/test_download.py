"""Downloads, safe extraction and the DomainBed sources, against a loopback HTTP server (no network)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import socket
import tarfile
import threading
import warnings
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from egat.config import SourceParams
from egat.data.archive import extract
from egat.data.domainbed_sources import TERRA_CLASSES, VLCS_CLASSES, VLCS_DOMAINS, prepare_source
from egat.data.download import download, redact
from egat.errors import DataError


class RangeHandler(BaseHTTPRequestHandler):
    """Serves server.root; honours "Range: bytes=N-" when server.ranges; sends only server.drop_after bytes
    of the body (then closes) when that is set; logs (path, Range, Authorization) of every request."""

    def do_GET(self):
        server = self.server
        server.log.append((self.path, self.headers.get("Range"), self.headers.get("Authorization")))
        path = server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match.group(1)) if match and server.ranges else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        kind = "text/html" if path.suffix == ".html" else "application/octet-stream"
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:][: server.drop_after])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.root, httpd.log, httpd.ranges, httpd.drop_after = root, [], True, None
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _serve(server, name: str, data: bytes) -> str:
    (server.root / name).write_bytes(data)
    return f"{server.url}/{name}"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _payload(n: int = 300_000) -> bytes:
    return np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()


def _image(value: int, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, np.full((8, 8, 3), value, np.uint8))
    assert ok
    return buf.tobytes()


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(files: dict[str, bytes], method=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# download ---------------------------------------------------------------------------------------------


def test_download_verifies_and_renames_into_place(server, tmp_path):
    data = _payload()
    dest = tmp_path / "raw" / "file.bin"
    assert download(_serve(server, "file.bin", data), dest, _sha(data)) == dest
    assert dest.read_bytes() == data
    assert _leftovers(dest.parent) == ["file.bin"]
    download(f"{server.url}/file.bin", dest, _sha(data))  # present and verified: no second request
    assert len(server.log) == 1


def test_download_resumes_after_a_dropped_connection(server, tmp_path):
    data = _payload()
    url, dest = _serve(server, "file.bin", data), tmp_path / "file.bin"
    server.drop_after = 100_000
    with pytest.raises(DataError, match=r"interrupted.*100000 of 300000 bytes.*run again to resume"):
        download(url, dest, _sha(data))
    assert not dest.exists() and (tmp_path / "file.bin.part").stat().st_size == 100_000
    server.drop_after = None
    download(url, dest, _sha(data))
    assert dest.read_bytes() == data and not (tmp_path / "file.bin.part").exists()
    assert [rng for _, rng, _ in server.log] == [None, "bytes=100000-"]


def test_download_starts_over_when_the_server_cannot_resume(server, tmp_path):
    data = _payload()
    (tmp_path / "file.bin.part").write_bytes(b"stale bytes of some other file")
    server.ranges = False  # answers 200 with the whole file
    download(_serve(server, "file.bin", data), tmp_path / "file.bin", _sha(data))
    assert (tmp_path / "file.bin").read_bytes() == data
    assert server.log[0][1] == "bytes=30-"


def test_download_restarts_when_the_part_is_too_long(server, tmp_path):
    data = _payload(1000)
    (tmp_path / "file.bin.part").write_bytes(bytes(2000))
    download(_serve(server, "file.bin", data), tmp_path / "file.bin", _sha(data))
    assert (tmp_path / "file.bin").read_bytes() == data
    assert [rng for _, rng, _ in server.log] == ["bytes=2000-", None]


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    data = _payload(1000)
    wrong = "0" * 64
    with pytest.raises(DataError) as exc:
        download(_serve(server, "file.bin", data), tmp_path / "file.bin", wrong)
    assert "file.bin" in str(exc.value) and wrong in str(exc.value) and _sha(data) in str(exc.value)
    assert _leftovers(tmp_path) == ["served"]


def test_unverified_download_warns_with_its_hash(server, tmp_path):
    data = _payload(1000)
    with pytest.warns(UserWarning, match=_sha(data)):
        download(_serve(server, "file.bin", data), tmp_path / "file.bin", "")


def test_http_error_names_the_url_without_credentials(server, tmp_path):
    url = server.url.replace("http://", "http://alice:s3cret@") + "/missing.tar.gz?sig=tok3n&id=7"
    with pytest.raises(DataError, match=r"HTTP 404") as exc:
        download(url, tmp_path / "missing.tar.gz", None)
    message = str(exc.value)
    assert "missing.tar.gz" in message and "id=7" in message
    assert "s3cret" not in message and "tok3n" not in message
    # The credentials still reach the server, as a Basic auth header.
    assert server.log[0][2] == "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert redact("https://u:p@host/a?token=x&b=1") == "https://***@host/a?token=***&b=1"
    assert redact("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"


def test_connection_refused_is_a_data_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match=rf"cannot connect to http://127.0.0.1:{port}/x.zip"):
        download(f"http://127.0.0.1:{port}/x.zip", tmp_path / "x.zip", None)


def test_html_instead_of_the_file_is_refused(server, tmp_path):
    with pytest.raises(DataError, match="HTML page"):
        download(_serve(server, "page.html", b"<html>sign in</html>"), tmp_path / "VLCS.tar.gz", None)
    assert _leftovers(tmp_path) == ["served"]


# extraction -------------------------------------------------------------------------------------------


def test_extract_tar_gz_and_zip(tmp_path):
    files = {"top/a.txt": b"a", "top/sub/b.txt": b"b"}
    for name, data in {"x.tar.gz": _tar_gz(files), "x.zip": _zip(files)}.items():
        (tmp_path / name).write_bytes(data)
        out = extract(tmp_path / name, tmp_path / f"out_{name}")
        assert (out / "top/sub/b.txt").read_bytes() == b"b"
    assert _leftovers(tmp_path) == ["out_x.tar.gz", "out_x.zip", "x.tar.gz", "x.zip"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_extracted_folder_gets_the_users_umask(tmp_path, umask):
    import os
    import stat

    (tmp_path / "x.zip").write_bytes(_zip({"a.txt": b"a"}))
    old = os.umask(umask)
    try:
        out = extract(tmp_path / "x.zip", tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700


def test_truncated_tar_gz_leaves_no_partial_output(tmp_path):
    data = _tar_gz({f"top/{i}.bin": _payload(50_000) for i in range(4)})
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.tar\.gz.*truncated or corrupt"):
        extract(archive, tmp_path / "out")
    assert _leftovers(tmp_path) == ["cut.tar.gz"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_zip_is_a_data_error(tmp_path, damage):
    data = bytearray(_zip({"a.bin": _payload(5000)}, zipfile.ZIP_STORED))
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[1000:1010] = bytes(10)  # inside a.bin's stored bytes: the CRC check fails
    archive = tmp_path / "bad.zip"
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"bad\.zip.*truncated or corrupt"):
        extract(archive, tmp_path / "out")
    assert _leftovers(tmp_path) == ["bad.zip"]


def _crafted_tar(path: Path, bad: tarfile.TarInfo) -> None:
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("fine.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        bad.size = 4 if bad.isfile() else 0
        tar.addfile(bad, io.BytesIO(b"evil") if bad.isfile() else None)


def _tar_member(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize(
    "bad, reason",
    [
        (_tar_member("../evil"), "'..'"),
        (_tar_member("sub/../../evil"), "'..'"),
        (_tar_member("/abs/path"), "absolute"),
        (_tar_member("link", tarfile.SYMTYPE, "../evil"), "a link"),
        (_tar_member("link", tarfile.SYMTYPE, "/etc/passwd"), "a link"),
        (_tar_member("hard", tarfile.LNKTYPE, "../evil"), "a link"),
        (_tar_member("dev", tarfile.CHRTYPE), "not a plain file"),
    ],
)
def test_unsafe_tar_members_are_refused(tmp_path, bad, reason):
    base = tmp_path / "base"
    base.mkdir()
    archive = base / "crafted.tar"
    _crafted_tar(archive, bad)
    with pytest.raises(DataError, match=re.escape(reason)):
        extract(archive, base / "target")
    assert _leftovers(base) == ["crafted.tar"]
    assert _leftovers(tmp_path) == ["base"]


@pytest.mark.parametrize(
    "name, reason", [("../evil", "'..'"), ("/abs/path", "absolute"), ("C:/x", "absolute")]
)
def test_unsafe_zip_names_are_refused(tmp_path, name, reason):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo(name), b"evil")
    (tmp_path / "crafted.zip").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=re.escape(reason)):
        extract(tmp_path / "crafted.zip", tmp_path / "target")
    assert _leftovers(tmp_path) == ["crafted.zip"]


def test_zip_symlink_is_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)  # S_IFLNK: the member's data is the link target
        zf.writestr(info, "/etc/passwd")
    (tmp_path / "crafted.zip").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match="a link"):
        extract(tmp_path / "crafted.zip", tmp_path / "target")
    assert _leftovers(tmp_path) == ["crafted.zip"]


# DomainBed sources ------------------------------------------------------------------------------------


def test_prepare_vlcs_from_the_domainbed_layout(server, tmp_path):
    files = {
        f"VLCS/{domain}/{cls}/{i}.png": _image(10 * i + j)
        for j, domain in enumerate(VLCS_DOMAINS)
        for cls in VLCS_CLASSES
        for i in range(2)
    }
    data = _tar_gz(files)
    url = _serve(server, "VLCS.tar.gz", data)
    out_root = tmp_path / "vlcs" / "images"
    sources = {"vlcs": SourceParams(url=url, sha256=_sha(data))}
    result = prepare_source("vlcs", sources, tmp_path / "raw", out_root)
    assert result == out_root
    assert sorted(p.name for p in out_root.iterdir()) == sorted(VLCS_DOMAINS)
    for domain in VLCS_DOMAINS:
        assert sorted(p.name for p in (out_root / domain).iterdir()) == list(VLCS_CLASSES)
        assert cv2.imread(str(out_root / domain / "dog" / "1.png")) is not None
    assert _leftovers(out_root.parent) == ["images"]  # no scratch left
    assert _leftovers(tmp_path / "raw") == ["VLCS.tar.gz"]
    # Prepared already: nothing is downloaded again.
    prepare_source("vlcs", sources, tmp_path / "raw", out_root)
    assert len(server.log) == 1


def test_prepare_vlcs_maps_other_folder_spellings(server, tmp_path):
    spelled = {"Caltech101": "CALTECH", "LabelMe": "labelme", "SUN09": "SUN", "VOC2007": "PASCAL"}
    files = {f"data/{spelled[d]}/{c.upper()}/0.png": _image(1) for d in VLCS_DOMAINS for c in VLCS_CLASSES}
    data = _tar_gz(files)
    out_root = tmp_path / "images"
    sources = {"vlcs": SourceParams(url=_serve(server, "VLCS.tar.gz", data), sha256=_sha(data))}
    prepare_source("vlcs", sources, tmp_path / "raw", out_root)
    assert {p.relative_to(out_root).as_posix() for p in out_root.glob("*/*")} == {
        f"{d}/{c}" for d in VLCS_DOMAINS for c in VLCS_CLASSES
    }


def test_prepare_vlcs_with_a_missing_class_leaves_no_output(server, tmp_path):
    files = {f"VLCS/{d}/{c}/0.png": _image(1) for d in VLCS_DOMAINS for c in VLCS_CLASSES if c != "chair"}
    data = _tar_gz(files)
    sources = {"vlcs": SourceParams(url=_serve(server, "VLCS.tar.gz", data), sha256=_sha(data))}
    with pytest.raises(DataError, match="lacks the VLCS classes chair"):
        prepare_source("vlcs", sources, tmp_path / "raw", tmp_path / "out" / "images")
    assert _leftovers(tmp_path / "out") == []


def _camera_traps(kept_locations=("38", "43", "46", 100)):
    """A tiny ECCV'18 images archive and annotations JSON, with a location and a class to drop and an
    image with two kept classes; returns (archive bytes, annotations dict, expected relative paths)."""
    categories = [{"id": i, "name": name} for i, name in enumerate(TERRA_CLASSES + ("deer",))]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, annotations, files, expected = [], [], {}, set()
    for location in (*kept_locations, "99"):
        for name in (*TERRA_CLASSES, "deer"):
            image_id = f"{location}-{name}"
            file_name = f"{image_id}.jpg"
            images.append({"id": image_id, "file_name": file_name, "location": location})
            annotations.append({"id": f"a{image_id}", "image_id": image_id, "category_id": cat_id[name]})
            files[f"eccv_18_all_images_sm/{file_name}"] = _image(len(files) % 250, ".jpg")
            if str(location) != "99" and name != "deer":
                expected.add(f"location_{location}/{name}/{file_name}")
    annotations.append({"id": "extra", "image_id": "38-bird", "category_id": cat_id["cat"]})
    expected.add("location_38/cat/38-bird.jpg")
    data = {"images": images, "annotations": annotations, "categories": categories}
    return _tar_gz(files), data, expected


def test_prepare_terra_incognita_keeps_domainbed_locations_and_classes(server, tmp_path):
    archive, labels, expected = _camera_traps()
    labels_zip = _zip({"caltech_images_20210113.json": json.dumps(labels).encode()})
    sources = {
        "terra_incognita_images": SourceParams(
            url=_serve(server, "eccv_18_all_images_sm.tar.gz", archive), sha256=_sha(archive)
        ),
        "terra_incognita_annotations": SourceParams(
            url=_serve(server, "caltech_camera_traps.json.zip", labels_zip), sha256=_sha(labels_zip)
        ),
    }
    out_root = tmp_path / "terra" / "images"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every location has every kept class: no warning
        prepare_source("terra_incognita", sources, tmp_path / "raw", out_root)
    assert sorted(p.name for p in out_root.iterdir()) == [
        "location_100", "location_38", "location_43", "location_46"
    ]
    for location in out_root.iterdir():
        assert sorted(p.name for p in location.iterdir()) == sorted(TERRA_CLASSES)
    assert {p.relative_to(out_root).as_posix() for p in out_root.rglob("*.jpg")} == expected
    assert cv2.imread(str(out_root / "location_100" / "empty" / "100-empty.jpg")) is not None
    assert _leftovers(out_root.parent) == ["images"]


def test_prepare_terra_incognita_with_missing_images_leaves_no_output(server, tmp_path):
    archive, labels, _ = _camera_traps()
    labels["images"].append({"id": "ghost", "file_name": "ghost.jpg", "location": "43"})
    labels["annotations"].append({"id": "g", "image_id": "ghost", "category_id": 0})
    sources = {
        "terra_incognita_images": SourceParams(
            url=_serve(server, "images.tar.gz", archive), sha256=_sha(archive)
        ),
        "terra_incognita_annotations": SourceParams(
            url=_serve(server, "labels.json", json.dumps(labels).encode())  # a plain JSON works too
        ),
    }
    missing = pytest.raises(DataError, match=r"1 of the .* ghost\.jpg")
    with pytest.warns(UserWarning, match="not verified"), missing:
        prepare_source("terra_incognita", sources, tmp_path / "raw", tmp_path / "out" / "images")
    assert _leftovers(tmp_path / "out") == []


def test_prepare_source_names_what_is_valid(tmp_path):
    with pytest.raises(DataError, match="valid: vlcs, terra_incognita"):
        prepare_source("pacs", {}, tmp_path, tmp_path / "out")
    with pytest.raises(DataError, match="terra_incognita_annotations"):
        prepare_source("terra_incognita", {"terra_incognita_images": SourceParams(url="http://x/y.tar.gz")},
                       tmp_path, tmp_path / "out")

"""Resumable, verified HTTP downloads: stream to ``<dest>.part``, check the sha256, then rename into place.

A dropped connection leaves the ``.part`` file behind; the next call asks the server for the rest
(HTTP Range) and starts over when the server cannot resume. Only a complete, verified file ever gets
the final name, so a file found under that name is never half-written.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from tqdm import tqdm

from egat.errors import DataError
from egat.urls import redact

CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


def download(url: str, dest: str | Path, sha256: str | None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` unless a file with the right ``sha256`` is there; return ``dest``.

    ``sha256=None`` (or "") skips verification with a warning that prints the hash to pin. Raises
    DataError for HTTP and connection errors (the ``.part`` file is kept for resuming) and for a hash
    mismatch (the download is deleted).
    """
    dest = Path(dest)
    sha256 = (sha256 or "").strip().lower()
    if dest.is_file():
        if not sha256 or sha256_of(dest) == sha256:
            return dest
        warnings.warn(f"{dest}: sha256 is not the expected {sha256}; downloading it again")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _fetch(url, part, timeout)
    actual = sha256_of(part)
    if not sha256:
        warnings.warn(
            f"{dest}: not verified (no sha256 configured for {redact(url)}); its sha256 is {actual}: "
            "put it in params.yaml (data.sources.<name>.sha256) to pin this file"
        )
    elif actual != sha256:
        part.unlink()
        raise DataError(
            f"{dest}: sha256 mismatch: expected {sha256}, got {actual} (downloaded from {redact(url)}); "
            "the download was deleted. If the file changed upstream on purpose, put the new sha256 in "
            "params.yaml (data.sources.<name>.sha256)"
        )
    os.replace(part, dest)
    return dest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, part: Path, timeout: float) -> None:
    """Append the rest of ``url`` to ``part`` (all of it when the server cannot resume)."""
    shown = redact(url)
    offset = part.stat().st_size if part.exists() else 0
    try:
        with urllib.request.urlopen(_request(url, offset), timeout=timeout) as response:
            offset, total = _resume_state(response, offset, part, shown)
            if response.headers.get_content_type() == "text/html":
                raise DataError(
                    f"{shown} answered with an HTML page, not the file (a sign-in, quota or virus-scan "
                    f"page?); open the URL in a browser, save the file as {part.with_suffix('')}, "
                    "and run again"
                )
            with open(part, "ab" if offset else "wb") as out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=part.with_suffix("").name, disable=None,
            ) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the error response's connection
        if exc.code == 416 and offset:  # the .part is not a prefix of this file (or is all of it): restart
            part.unlink()
            return _fetch(url, part, timeout)
        raise DataError(
            f"{shown}: HTTP {exc.code} {exc.reason}; check the URL in params.yaml (data.sources), "
            f"or download the file by hand to {part.with_suffix('')}"
        ) from None
    except urllib.error.URLError as exc:
        raise DataError(
            f"cannot connect to {shown} ({exc.reason}); check your network or proxy, "
            f"or download the file by hand to {part.with_suffix('')}"
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        raise DataError(
            f"download of {shown} interrupted ({str(exc) or type(exc).__name__}); run again to resume"
        ) from None
    # http.client ends a body cut short by the server without an error: compare with the announced size.
    size = part.stat().st_size
    if total is not None and size < total:
        raise DataError(
            f"download of {shown} interrupted: the connection closed after {size} of {total} bytes; "
            f"run again to resume from {part}"
        )


def _request(url: str, offset: int) -> urllib.request.Request:
    """A GET for ``url`` from byte ``offset``; user:password in the URL become a Basic auth header."""
    parts = urlsplit(url)
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    request = urllib.request.Request(bare, headers={"User-Agent": "egat"})
    if parts.username is not None:
        user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        token = base64.b64encode(user_pass.encode()).decode()
        # Unredirected: the credentials go to this host only, never to a host it redirects to.
        request.add_unredirected_header("Authorization", f"Basic {token}")
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    return request


def _resume_state(
    response: http.client.HTTPResponse, offset: int, part: Path, shown: str
) -> tuple[int, int | None]:
    """(where the body starts in the file, the full file size or None): 0 when the server sent it all."""
    if response.status != 206:
        length = response.headers.get("Content-Length", "")
        return 0, int(length) if length.isdigit() else None
    header = response.headers.get("Content-Range", "")
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if not match or int(match.group(1)) != offset:
        part.unlink(missing_ok=True)
        raise DataError(
            f"{shown}: asked to resume at byte {offset}, the server sent Content-Range {header!r}; "
            f"{part} was deleted: run again to download afresh"
        )
    return offset, None if match.group(2) == "*" else int(match.group(2))

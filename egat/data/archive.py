"""Safe extraction of .tar, .tar.gz/.tgz and .zip archives.

Only plain files and folders are extracted, and only to relative paths without '..': absolute paths,
links of any kind and device files are refused, since a downloaded archive is untrusted input. Members
go to a temp folder next to the target that is renamed into place once everything is out, so the
target never holds a partial extraction.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

from egat.errors import DataError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
ZIP_SUFFIXES = (".zip",)
ARCHIVE_SUFFIXES = TAR_SUFFIXES + ZIP_SUFFIXES
# tarfile's own "data" filter (Python >= 3.10.12 / 3.11.4) backs up the checks below.
_TAR_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def extract(archive: str | Path, target: str | Path) -> Path:
    """Extract ``archive`` into the new folder ``target`` and return it.

    Raises DataError for an unknown archive type, an existing target, an unsafe member (nothing of the
    archive is left behind) and a truncated or corrupt archive (the partial extraction is removed).
    """
    archive, target = Path(archive), Path(target)
    name = archive.name.lower()
    if name.endswith(TAR_SUFFIXES):
        extract_into = _extract_tar
    elif name.endswith(ZIP_SUFFIXES):
        extract_into = _extract_zip
    else:
        raise DataError(
            f"{archive}: not a known archive type; expected a name ending in {', '.join(ARCHIVE_SUFFIXES)}"
        )
    if target.exists():
        raise DataError(f"{target} already exists; delete it to extract {archive} again")
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp (mode 0700): the folder that becomes the target gets the user's umask
    scratch = target.parent / f".{target.name}.{secrets.token_hex(6)}.partial"
    scratch.mkdir()
    try:
        extract_into(archive, scratch)
        os.rename(scratch, target)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise DataError(
            f"{archive}: cannot extract ({exc}); the archive is truncated or corrupt: "
            "delete it and run again to download it afresh"
        ) from None
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return target


def check_member_name(name: str, archive: Path) -> None:
    """Refuse a member path that is absolute or climbs out with '..' (in POSIX or Windows spelling)."""
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        raise DataError(f"{archive}: refusing member {name!r}: absolute path")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise DataError(f"{archive}: refusing member {name!r}: '..' in the path")


def _extract_tar(archive: Path, into: Path) -> None:
    with tarfile.open(archive, "r:*") as tar:
        tar.extractall(into, members=_checked_tar_members(tar, archive), **_TAR_FILTER)
        # Read to the end so that gzip checks its CRC and length trailer: a cut-off .tar.gz fails here.
        while tar.fileobj.read(1 << 20):
            pass


def _checked_tar_members(tar: tarfile.TarFile, archive: Path) -> Iterator[tarfile.TarInfo]:
    for member in tar:  # one pass over the stream: each member is checked just before it is extracted
        check_member_name(member.name, archive)
        if member.issym() or member.islnk():
            raise DataError(f"{archive}: refusing member {member.name!r}: a link (to {member.linkname!r})")
        if not (member.isfile() or member.isdir()):
            raise DataError(f"{archive}: refusing member {member.name!r}: not a plain file or folder")
        yield member


def _extract_zip(archive: Path, into: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for info in members:
            check_member_name(info.filename, archive)
            mode = info.external_attr >> 16  # Unix mode bits, when the zip was made on Unix
            if stat.S_ISLNK(mode):
                raise DataError(f"{archive}: refusing member {info.filename!r}: a link")
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise DataError(f"{archive}: refusing member {info.filename!r}: not a plain file or folder")
        for info in members:
            zf.extract(info, into)  # reads every byte, so a bad CRC raises BadZipFile

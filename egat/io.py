"""Atomic file writes: write to a temp file in the target folder, then rename over the target.

DVC and MLflow may pick up any file they find, so nothing is ever left half-written.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from egat.errors import CheckpointError


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success rename it over ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def torch_save(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def torch_load(path: str | Path, expected: str = "a file written by torch.save") -> Any:
    """Load a checkpoint of tensors and plain containers only (never arbitrary pickles).

    Raises CheckpointError, one line naming the file, what is wrong with it and ``expected``
    (what the caller wanted it to be), for a missing, unreadable, empty, truncated or corrupt file
    and for one that pickles other objects (which ``weights_only=True`` refuses).
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as exc:
        problem = f"cannot read this file ({exc.strerror or exc})"
        raise CheckpointError(f"{path}: {problem}; expected {expected}") from None
    with handle:
        try:
            with warnings.catch_warnings():
                # torch warns (several lines) about the pickle protocol of files it then refuses
                warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
                return torch.load(handle, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            refused = _unsafe_globals(path)
            problem = (
                f"refused: it pickles objects of type {', '.join(refused)} (checkpoints may hold "
                "only tensors and plain containers)" if refused
                else "not a file written by torch.save (corrupt, or another format)"
            )
        except Exception as exc:  # damaged files raise RuntimeError, OSError, EOFError, ValueError, ...
            empty = path.stat().st_size == 0
            problem = "an empty file" if empty else f"truncated or corrupt ({_first_line(exc)})"
    raise CheckpointError(f"{path}: {problem}; expected {expected}")


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a torch.save file pickles beyond weights_only's allow-list ([] when the file
    is no torch.save zip archive at all)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: the caller says "corrupt"
        return []


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0].split(". ")[0] if text else type(exc).__name__
    return first if len(first) <= 120 else first[:117] + "..."

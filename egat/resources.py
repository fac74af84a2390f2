"""Out-of-memory errors as one line that names the batch-size param to lower."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

from egat.errors import EgatError

F = TypeVar("F", bound=Callable)


def suggest_batch_size_on_oom(key: str, what: str) -> Callable[[F], F]:
    """Turn ``torch.OutOfMemoryError`` (CUDA, or MPS/XPU) raised by the decorated function into an
    EgatError that names ``key`` (e.g. ``train.batch_size``), its value and how to lower it.

    The value is read from the ``params`` the function gets: its first ``Params`` argument, or
    ``self.params`` of a method.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except torch.OutOfMemoryError as exc:
                value = _lookup(key, [*args, *kwargs.values()])
                smaller = value // 2 if isinstance(value, int) and value > 1 else "<smaller>"
                first_line = (str(exc).strip().splitlines() or ["out of memory"])[0]
                raise EgatError(
                    f"out of GPU memory in {what} ({first_line}); lower {key} (now {value}), "
                    f"e.g. `--set {key}={smaller}` or `dvc exp run -S {key}={smaller}`"
                ) from exc

        return wrapper  # type: ignore[return-value]

    return decorate


def _lookup(key: str, candidates: list) -> object:
    from egat.config import Params

    for arg in candidates:
        params = arg if isinstance(arg, Params) else getattr(arg, "params", None)
        if isinstance(params, Params):
            value: object = params
            for part in key.split("."):
                value = getattr(value, part)
            return value
    return "?"

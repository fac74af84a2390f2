"""Load pickled numpy arrays from untrusted bytes without running arbitrary code.

A pickle can name any importable callable (``os.system``...). This unpickler resolves only the few
globals that numpy's own array/dtype/scalar pickles use and refuses everything else.
"""

from __future__ import annotations

import _codecs
import pickle
from typing import IO, Any

import numpy as np

from egat.errors import DataError

try:
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

# numpy 1.x pickles name numpy.core.*, numpy 2.x numpy._core.*; both resolve to the same objects.
_ALLOWED = {
    ("multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("multiarray", "scalar"): _multiarray.scalar,
    ("numeric", "_frombuffer"): _numeric._frombuffer,  # protocol-5 array pickles
}
_NUMPY_CORE_MODULES = ("numpy.core", "numpy._core")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, fileobj: IO[bytes], source: str):
        super().__init__(fileobj)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _codecs.encode  # how protocols 0-2 store the raw bytes of an array
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "numpy.dtypes" and name.endswith("DType"):
            return getattr(np.dtypes, name)  # dtype classes, e.g. numpy.dtypes.Int64DType
        core, _, sub = module.rpartition(".")
        if core in _NUMPY_CORE_MODULES and (sub, name) in _ALLOWED:
            return _ALLOWED[(sub, name)]
        raise DataError(
            f"{self._source}: refusing to unpickle global {module}.{name}; "
            "only numpy arrays, dtypes and scalars are allowed"
        )


def load_numpy_pickle(fileobj: IO[bytes], source: str = "pickle") -> Any:
    """Unpickle, admitting only numpy arrays, dtypes and scalars (``source`` names it in errors)."""
    try:
        return _NumpyOnlyUnpickler(fileobj, source).load()
    except DataError:
        raise
    except Exception as exc:  # truncated or malformed bytes
        raise DataError(f"{source}: not a readable numpy pickle ({type(exc).__name__}: {exc})") from None

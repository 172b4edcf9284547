"""Reading pickles that hold only plain data (the CIFAR python format), without running code from the file.

`pickle.load` calls whatever callable a pickle names, so a planted file in a shared data folder could run
any command (issue 12). `load_plain` uses an unpickler whose `find_class` resolves exactly the globals a
pickle of dicts / lists / tuples / str / bytes / int / float / bool / None and numpy arrays needs, and
refuses every other one before anything is called:

* numpy arrays: `numpy.ndarray`, `numpy.dtype`, the array reconstructor `numpy.core.multiarray._reconstruct`
  (protocols 0-4), `numpy.core.numeric._frombuffer` (protocol 5) and `numpy.core.multiarray.scalar` (numpy
  scalars), under both the numpy 1 (`numpy.core`) and numpy 2 (`numpy._core`) module names;
* `_codecs.encode`, which Python 3 writes for `bytes` at protocols 0-2, wrapped so that it only turns a
  latin-1 str back into bytes (the only use pickle makes of it).

The plain types themselves have pickle opcodes of their own and need no global at all.
"""
from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fisherbench.data.download import DatasetNotFoundError


class UnsafePickleError(DatasetNotFoundError):
    """A pickle names a callable outside the allow-list (or is not a pickle of plain data at all)."""


def _numpy_core(module: str) -> Any:
    try:  # numpy 2 (numpy.core is a deprecated alias of numpy._core there)
        return importlib.import_module(f"numpy._core.{module}")
    except ImportError:  # numpy 1
        return importlib.import_module(f"numpy.core.{module}")


def _latin1_encode(obj: Any, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as pickle uses it for bytes at protocols <= 2: `encode(str, "latin1")` only."""
    if not isinstance(obj, str) or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode({type(obj).__name__}, {encoding!r}) is not a bytes literal")
    return obj.encode("latin1")


def _allowed() -> dict[tuple[str, str], Callable]:
    multiarray, numeric = _numpy_core("multiarray"), _numpy_core("numeric")
    allowed: dict[tuple[str, str], Callable] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class PlainDataUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals in `_allowed()`; anything else raises `UnsafePickleError`
    before it is imported or called."""

    _ALLOWED: dict[tuple[str, str], Callable] = {}

    def find_class(self, module: str, name: str) -> Any:
        if not PlainDataUnpickler._ALLOWED:
            PlainDataUnpickler._ALLOWED = _allowed()
        try:
            return PlainDataUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{module}.{name}") from None


def load_plain(path: Path | str, *, encoding: str = "latin1", what: str = "data file", fix: str = "") -> Any:
    """Unpickle `path` allowing only plain data and numpy arrays.

    Raises `UnsafePickleError` when the file names any other global (nothing from it has run), and
    `DatasetNotFoundError` when it is not a complete pickle (truncated, empty, not a pickle); both messages
    name the file and say what to do (`fix`). `encoding` decodes Python 2 str objects (CIFAR was pickled
    by Python 2; latin1 keeps its bytes, as torchvision reads it).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetNotFoundError(f"cannot read {what} {path}: {e.strerror or e}. {fix}".strip()) from None
    try:
        return PlainDataUnpickler(io.BytesIO(raw), encoding=encoding).load()
    except UnsafePickleError as e:
        raise UnsafePickleError(
            f"refused to unpickle {what} {path}: it calls {e}, and a {what} holds only dicts, lists, strings, "
            f"numbers and numpy arrays. The file may have been tampered with (nothing in it was run). Delete it "
            f"and get the data again from its source. {fix}".strip()) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, UnicodeDecodeError) as e:
        # everything the unpickler raises on a truncated or garbled stream (EOFError on a cut file,
        # UnpicklingError on a bad opcode, ValueError/TypeError from numpy's setstate on a short buffer, ...)
        raise DatasetNotFoundError(
            f"{what} {path} ({len(raw)} bytes) is truncated or not a valid pickle ({type(e).__name__}: {e}). "
            f"{fix}".strip()) from None

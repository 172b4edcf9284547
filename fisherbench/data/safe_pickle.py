"""Reading pickles that hold only plain data (the CIFAR python format), without running code from the file.

`pickle.load` calls whatever callable a pickle names, so a planted file in a shared data folder could run
any command (issue 12). `load_plain` uses an unpickler whose `find_class` resolves exactly the globals a
pickle of dicts / lists / tuples / str / bytes / int / float / bool / None and numpy arrays needs, and
refuses every other one before anything is called. Not even the numpy globals it allows are numpy's own:

* a dtype is never built from the file's state. numpy's `dtype.__setstate__` trusts its argument: a state
  naming fields of dtype `object` makes an array whose bytes come from the file be read as object pointers
  (memory corruption, a segfault at best; issue 19). `numpy.dtype` resolves to `_DtypeRequest`, which only
  records the type string; its state must be exactly what numpy writes for a plain dtype of that string;
* arrays are rebuilt here from (shape, dtype, raw bytes) with `np.frombuffer`, never by numpy's
  `ndarray.__setstate__` / `_reconstruct` / `_frombuffer` / `scalar` (whose state the file chooses);
* the dtypes an array or scalar may have are an allow-list of plain numeric and byte-string types
  (`ALLOWED_DTYPE`): booleans, integers, floats, complex numbers, fixed-width bytes and unicode. Object,
  structured (fields), sub-array, void, datetime and every other dtype is refused;
* `_codecs.encode`, which Python 3 writes for `bytes` at protocols 0-2, only turns a latin-1 str back into
  bytes (the only use pickle makes of it), and `bytes` only makes `b""` (what those protocols write for it).

The placeholders the unpickler builds (`_ArrayRequest`) are replaced by real arrays once the whole file is
read. The plain types themselves have pickle opcodes of their own and need no global at all.
"""
from __future__ import annotations

import io
import math
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from fisherbench.data.download import DatasetNotFoundError

# the dtype strings numpy writes for plain scalar types: b1 (bool), i/u 1-8 bytes, f2/f4/f8, c8/c16, and
# fixed-width byte (S) and unicode (U) strings; nothing with fields, sub-arrays, objects or pointers
ALLOWED_DTYPE = re.compile(r"^(b1|[iu][1248]|f[248]|c(8|16)|[SU][0-9]{1,6})$")
MAX_NDIM = 32


class UnsafePickleError(DatasetNotFoundError):
    """A pickle names a callable outside the allow-list, or asks for a dtype or array outside the plain ones."""


def _latin1_encode(obj: Any, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as pickle uses it for bytes at protocols <= 2: `encode(str, "latin1")` only."""
    if not isinstance(obj, str) or not isinstance(encoding, str) \
            or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode({type(obj).__name__}, {encoding!r}) is not a bytes literal")
    return obj.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """`bytes()`, which pickle writes for an empty bytes object at protocols <= 2; no other call of `bytes`."""
    if args:
        raise pickle.UnpicklingError(f"bytes{_short(args)} is not an empty bytes literal")
    return b""


def _as_bytes(raw: Any, what: str) -> bytes:
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw)
    if isinstance(raw, str):  # a Python 2 str decoded with encoding="latin1" (how CIFAR's arrays arrive)
        return raw.encode("latin1")
    if isinstance(raw, pickle.PickleBuffer):
        return bytes(raw.raw())
    raise UnsafePickleError(f"{what} whose data is a {type(raw).__name__}, not bytes (an object array?)")


class _DtypeRequest:
    """What the file asked `numpy.dtype(...)` for: checked against the allow-list, no numpy dtype built from
    the file's state. `dtype` is the plain numpy dtype it stands for."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = False) -> None:
        if not isinstance(spec, str) or not ALLOWED_DTYPE.match(spec):
            raise UnsafePickleError(f"numpy.dtype({spec!r}) (only plain numeric and byte-string dtypes are "
                                    "allowed: no object, structured, void or datetime dtype)")
        if align not in (False, 0) or type(align) not in (bool, int) or type(copy) not in (bool, int):
            raise UnsafePickleError(f"numpy.dtype({spec!r}, align={align!r}, copy={copy!r})")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state: Any) -> None:
        """Accept only the state numpy itself writes for this plain dtype in some byte order."""
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        if order not in ("<", ">", "|", "="):
            raise UnsafePickleError(f"a dtype state {_short(state)} (not a plain dtype's)")
        plain = self.dtype if order in ("|", "=") else self.dtype.newbyteorder(order)
        expected = plain.__reduce__()[2]
        if not isinstance(state, tuple) or len(state) != len(expected) \
                or any(type(a) is not type(b) or a != b for a, b in zip(state, expected)):
            raise UnsafePickleError(f"a {self.dtype.str[1:]} dtype with the state {_short(state)}; numpy writes "
                                    f"{expected} for it (a forged dtype state can make numpy read file bytes as "
                                    "memory addresses)")
        self.dtype = plain

    def __reduce__(self):  # never pickled or copied back out
        raise TypeError("a dtype request is not data")


def _dtype_of(obj: Any, what: str) -> np.dtype:
    if not isinstance(obj, _DtypeRequest):
        raise UnsafePickleError(f"{what} whose dtype is a {type(obj).__name__}, not a plain numpy dtype")
    return obj.dtype


def _shape_of(shape: Any, what: str) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or len(shape) > MAX_NDIM \
            or any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in shape):
        raise UnsafePickleError(f"{what} with the shape {_short(shape)}")
    return tuple(shape)


def _build_array(raw: Any, dtype: np.dtype, shape: tuple[int, ...], fortran: bool, what: str) -> np.ndarray:
    """A new array of `shape` and `dtype` holding exactly the bytes `raw`."""
    data = _as_bytes(raw, what)
    count = math.prod(shape)
    if count * dtype.itemsize != len(data):
        raise pickle.UnpicklingError(f"{what} of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} "
                                     f"bytes, the file holds {len(data)}")
    flat = np.frombuffer(data, dtype=dtype, count=count) if count else np.empty(0, dtype)
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


class _ArrayRequest:
    """`_reconstruct(ndarray, ...)` (protocols 0-4): the array is built from its pickled state by `resolve`."""

    def __init__(self) -> None:
        self.array: Optional[np.ndarray] = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickleError(f"an array state {_short(state)}")
        if len(state) == 5:
            version, *state = state
            if version != 1:
                raise UnsafePickleError(f"an array state of version {version!r}")
        shape, dtype, fortran, raw = state
        if type(fortran) not in (bool, int):
            raise UnsafePickleError(f"an array state with order flag {_short(fortran)}")
        self.array = _build_array(raw, _dtype_of(dtype, "an array"), _shape_of(shape, "an array"), bool(fortran),
                                  "an array")

    def __reduce__(self):
        raise TypeError("an array request is not data")


_NDARRAY = object()  # what `numpy.ndarray` resolves to: only an argument of `_reconstruct`


def _reconstruct(cls: Any, shape: Any = (0,), typecode: Any = b"b") -> _ArrayRequest:
    if cls is not _NDARRAY:
        raise UnsafePickleError(f"numpy's _reconstruct of a {type(cls).__name__} (only numpy.ndarray)")
    return _ArrayRequest()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
    """numpy's protocol-5 array reconstructor, with the dtype and shape checked."""
    if order not in ("C", "F"):
        raise UnsafePickleError(f"an array of order {_short(order)}")
    return _build_array(buf, _dtype_of(dtype, "an array"), _shape_of(shape, "an array"), order == "F", "an array")


def _scalar(dtype: Any, raw: Any = None) -> np.generic:
    """A numpy scalar (`numpy.float32(1.5)`...): one element of a plain dtype from its bytes."""
    return _build_array(raw, _dtype_of(dtype, "a numpy scalar"), (), False, "a numpy scalar")[()]


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 120 else text[:117] + "..."


def _allowed() -> dict[tuple[str, str], Callable]:
    allowed: dict[tuple[str, str], Callable] = {
        ("numpy", "ndarray"): _NDARRAY,  # type: ignore[dict-item]
        ("numpy", "dtype"): _DtypeRequest,
        ("_codecs", "encode"): _latin1_encode,
        ("__builtin__", "bytes"): _empty_bytes,  # how protocols 0-2 write b"" (module name as in Python 2)
        ("builtins", "bytes"): _empty_bytes,
    }
    for core in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 module names
        allowed[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = _scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = _frombuffer
    return allowed


class PlainDataUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals in `_allowed()` (this module's checked stand-ins);
    anything else raises `UnsafePickleError` before it is imported or called."""

    _ALLOWED = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return PlainDataUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{module}.{name}") from None


def _resolve(obj: Any, done: dict[int, Any]) -> Any:
    """`obj` with every `_ArrayRequest` replaced by its array (shared references stay shared)."""
    key = id(obj)
    if key in done:
        return done[key]
    if isinstance(obj, _ArrayRequest):
        if obj.array is None:
            raise UnsafePickleError("numpy's _reconstruct without the array's state")
        out: Any = obj.array
    elif isinstance(obj, _DtypeRequest):
        out = obj.dtype
    elif isinstance(obj, list):
        out = done[key] = obj  # in place: a list may contain itself
        obj[:] = [_resolve(v, done) for v in obj]
    elif isinstance(obj, dict):
        out = done[key] = obj
        items = [(_resolve(k, done), _resolve(v, done)) for k, v in obj.items()]
        obj.clear()
        obj.update(items)
    elif isinstance(obj, tuple):
        out = tuple(_resolve(v, done) for v in obj)
    elif isinstance(obj, (set, frozenset)):
        out = type(obj)(_resolve(v, done) for v in obj)
    else:
        out = obj
    done[key] = out
    return out


def load_plain(path: Path | str, *, encoding: str = "latin1", what: str = "data file", fix: str = "") -> Any:
    """Unpickle `path` allowing only plain data and numpy arrays of plain dtypes.

    Raises `UnsafePickleError` when the file names any other global or asks for a dtype or array outside
    the plain ones (nothing from it has run), and `DatasetNotFoundError` when it is not a complete pickle
    (truncated, empty, not a pickle); both messages name the file and say what to do (`fix`). `encoding`
    decodes Python 2 str objects (CIFAR was pickled by Python 2; latin1 keeps its bytes, as torchvision
    reads it).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetNotFoundError(f"cannot read {what} {path}: {e.strerror or e}. {fix}".strip()) from None
    try:
        return _resolve(PlainDataUnpickler(io.BytesIO(raw), encoding=encoding).load(), {})
    except UnsafePickleError as e:
        raise UnsafePickleError(
            f"refused to unpickle {what} {path}: it calls {e}, and a {what} holds only dicts, lists, strings, "
            f"numbers and numpy arrays of plain numeric or byte types. The file may have been tampered with "
            f"(nothing in it was run). Delete it and get the data again from its source. {fix}".strip()) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, UnicodeDecodeError, RecursionError) as e:
        # everything the unpickler raises on a truncated or garbled stream (EOFError on a cut file,
        # UnpicklingError on a bad opcode or a short array buffer, ...)
        raise DatasetNotFoundError(
            f"{what} {path} ({len(raw)} bytes) is truncated or not a valid pickle ({type(e).__name__}: {e}). "
            f"{fix}".strip()) from None

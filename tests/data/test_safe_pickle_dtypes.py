"""The restricted CIFAR unpickler cannot build an object-bearing or structured dtype (issue 19, item 3).

numpy's own `dtype.__setstate__` trusts its argument: a `V16` dtype given fields of dtype `object` and flags 0
makes `np.frombuffer(b"A" * 160, dtype=dt)` read file bytes as object pointers. Pickled into a CIFAR file,
`train.py ... data.verify=false` died of a segfault. Each load here runs in a subprocess, so a segfault shows
as a signal exit (rc -11) instead of killing pytest; the test asserts the clean refusal instead.
"""
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fisherbench.data.download import OFFLINE_ENV
from fisherbench.data.safe_pickle import UnsafePickleError, load_plain
from tests.data_fakes import make_cifar


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")


def _evil_dtype(fields=None):
    """The issue's dtype: V16 whose state names an object field at offset 0 (flags 0: no refcount checks)."""
    dt = np.dtype("V16")
    fields = fields or {"a": (np.dtype("O"), 0), "b": (np.dtype("int64"), 8)}
    dt.__setstate__((3, "|", None, ("a", "b"), fields, 16, 1, 0))
    return dt


def _payloads():
    """(name, pickle bytes) of the issue's payload: the dtype alone in batches.meta, an array of it through
    `_reconstruct` (protocol 2) and through `_frombuffer` (protocol 5), plus a forged state on an allowed
    type string (S16) that names plain int64 fields."""
    dt = _evil_dtype()
    meta = {"label_names": ["a", "b"], "num_cases_per_batch": 10, "dtype": dt}
    arr = np.frombuffer(b"A" * 160, dtype=dt)
    out = [("meta dtype p2", pickle.dumps(meta, protocol=2)),
           ("meta dtype p5", pickle.dumps(meta, protocol=5)),
           ("_reconstruct", pickle.dumps({"label_names": arr}, protocol=2)),
           ("_frombuffer", pickle.dumps({"label_names": arr}, protocol=5))]
    plain_fields = _evil_dtype({"a": (np.dtype("int64"), 0), "b": (np.dtype("int64"), 8)})
    blob = pickle.dumps({"label_names": np.zeros(2, dtype=plain_fields)}, protocol=2)
    assert b"X\x03\x00\x00\x00V16" in blob
    out.append(("forged state of S16", blob.replace(b"X\x03\x00\x00\x00V16", b"X\x03\x00\x00\x00S16")))
    return out


LOAD = textwrap.dedent("""
    import sys
    from fisherbench.data.safe_pickle import UnsafePickleError, load_plain
    for path in sys.argv[1:]:
        try:
            obj = load_plain(path, what="CIFAR-10 file")
            for v in obj.values() if isinstance(obj, dict) else [obj]:
                repr(v)  # touching an object array of forged pointers is what crashes
            print("LOADED", path)
        except UnsafePickleError as e:
            print("REFUSED", e)
""")


def test_the_dtype_payload_is_refused_never_a_segfault(tmp_path):
    paths = []
    for i, (_name, blob) in enumerate(_payloads()):
        path = tmp_path / f"payload{i}" / "batches.meta"
        path.parent.mkdir()
        path.write_bytes(blob)
        paths.append(path)
    # one process for all payloads (imports are slow on a shared machine); a segfault on any is rc -11
    p = subprocess.run([sys.executable, "-c", LOAD, *map(str, paths)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    lines = p.stdout.splitlines()
    assert len(lines) == len(paths) and "LOADED" not in p.stdout, p.stdout
    for line, path, (name, _) in zip(lines, paths, _payloads()):
        assert line.startswith("REFUSED refused to unpickle") and str(path) in line, (name, line)
        assert "nothing in it was run" in line


@pytest.mark.slow
def test_the_dtype_payload_in_a_cifar_folder_is_a_clear_error_through_train(tmp_path):
    make_cifar(tmp_path, "cifar10", per_file=4)
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(dict(_payloads())["meta dtype p2"])
    p = subprocess.run([sys.executable, "-m", "fisherbench", "train", "data=cifar10", f"data.root={tmp_path}",
                        "data.verify=false", "data.download=false", "data.batch_size=4", "model=small_cnn",
                        "model.width=4", "model.hidden=16", "optimizer=adam", "logger=none", "budget=steps",
                        "budget.steps=1", f"results_dir={tmp_path / 'runs'}"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "refused to unpickle" in p.stderr and "numpy.dtype('V16')" in p.stderr
    assert "Traceback" not in p.stderr
    assert not list((tmp_path / "runs").glob(".*.lock"))  # the lock was released


@pytest.mark.parametrize("dtype", ["O", "V8", "M8[s]", "m8[s]", [("a", "<i4"), ("b", "<f8")],
                                   [("a", "<i4", (2,))]])
def test_object_structured_void_datetime_and_subarray_dtypes_are_refused(tmp_path, dtype):
    path = tmp_path / "a.pkl"
    arr = np.zeros(3, dtype=dtype) if dtype != "O" else np.array([1, "a", None], dtype=object)
    for protocol in (2, 5):
        path.write_bytes(pickle.dumps({"x": arr}, protocol=protocol))
        with pytest.raises(UnsafePickleError, match="refused to unpickle"):
            load_plain(path)


def test_a_shape_that_does_not_match_the_bytes_is_refused(tmp_path):
    from fisherbench.data.download import DatasetNotFoundError

    path = tmp_path / "a.pkl"
    blob = pickle.dumps(np.arange(4, dtype="<i8"), protocol=2)
    assert blob.count(b"K\x04\x85") == 1  # the shape (4,)
    path.write_bytes(blob.replace(b"K\x04\x85", b"K\x08\x85"))  # claims 8 elements over 32 bytes
    with pytest.raises(DatasetNotFoundError, match="needs 64 bytes, the file holds 32"):
        load_plain(path)


def test_every_plain_dtype_and_byte_order_round_trips(tmp_path):
    path = tmp_path / "a.pkl"
    arrays = [np.arange(6).astype(t).reshape(2, 3) for t in
              ("b1", "i1", "<i2", ">i4", "<i8", "u1", ">u2", "<u4", "<u8", "<f2", ">f4", "<f8", "<c8", ">c16")]
    arrays += [np.array([b"ab", b"c"]), np.array(["x", "yz"]), np.asfortranarray(np.ones((2, 3))),
               np.zeros((0, 4), np.float32)]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path.write_bytes(pickle.dumps(arrays, protocol=protocol))
        loaded = load_plain(path)
        for a, b in zip(loaded, arrays):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)

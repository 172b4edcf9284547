"""The plain-data unpickler (issue 12): CIFAR pickles read with data.verify=false cannot run code, numpy
array pickles of every protocol still load, and truncated or malformed files give a clear message."""
import os
import pickle

import numpy as np
import pytest

import fisherbench.data.cifar as cifar
from fisherbench.data.download import OFFLINE_ENV, DatasetNotFoundError
from fisherbench.data.registry import build_data
from fisherbench.data.safe_pickle import UnsafePickleError, load_plain
from tests.data_fakes import make_cifar


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")


class SystemCall:
    """Unpickling this runs `os.system(command)` (the classic planted-pickle payload)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class OpenFile:
    """Unpickling this calls `builtins.open(path, "w")`, which creates the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def payloads(marker):
    return {
        "os.system": SystemCall(f"touch '{marker}'"),
        "builtins.open": OpenFile(marker),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.open"])
@pytest.mark.parametrize("where", ["whole file", "inside the data dict", "meta file"])
def test_a_planted_cifar_pickle_is_refused_and_nothing_runs(tmp_path, kind, where):
    root = tmp_path / "data"
    make_cifar(root, "cifar10", per_file=4)
    marker = tmp_path / "marker"
    payload = payloads(marker)[kind]
    folder = root / "cifar-10-batches-py"
    target = folder / ("batches.meta" if where == "meta file" else "data_batch_3")
    if where == "inside the data dict":
        with open(target, "rb") as f:
            entry = pickle.load(f)  # our own file, written by make_cifar
        entry["filenames"][1] = payload
        obj = entry
    else:
        obj = payload
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        target.write_bytes(pickle.dumps(obj, protocol=protocol))
        with pytest.raises(UnsafePickleError) as e:
            build_data({"name": "cifar10", "root": str(root), "verify": False, "download": False, "batch_size": 4})
        msg = str(e.value)
        assert str(target) in msg and "refused to unpickle" in msg and "nothing in it was run" in msg
        assert ("system" in msg) if kind == "os.system" else ("open" in msg)
        assert not marker.exists()
    # the same file through plain pickle would have run the payload: the test's payload is live
    pickle.loads(target.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_arrays_and_plain_types_load_under_every_protocol(tmp_path, protocol):
    value = {
        "data": np.arange(24, dtype=np.uint8).reshape(2, 12),
        "floats": np.linspace(0, 1, 5, dtype=np.float32).reshape(5, 1)[::2],  # non-contiguous view
        "scalar": np.int64(7),
        "labels": [1, 2, 3],
        "tuple": (1.5, True, None),
        "name": "batch 1",
        "raw": b"\x00\xffbytes",
        "nested": {"big": 2**70, "neg": -3},
    }
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(value, protocol=protocol))
    loaded = load_plain(path)
    assert loaded.keys() == value.keys()
    for key in ("data", "floats"):
        assert loaded[key].dtype == value[key].dtype and np.array_equal(loaded[key], value[key])
    assert loaded["scalar"] == 7 and loaded["scalar"].dtype == np.int64
    for key in ("labels", "tuple", "name", "raw", "nested"):
        assert loaded[key] == value[key]


@pytest.mark.parametrize("module,name", [
    ("numpy", "load"), ("numpy.lib.npyio", "load"), ("builtins", "eval"), ("builtins", "getattr"),
    ("subprocess", "Popen"), ("torch", "load"), ("collections", "OrderedDict"), ("copyreg", "_reconstructor"),
])
def test_every_other_global_is_refused(tmp_path, module, name):
    path = tmp_path / "g.pkl"
    path.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R.")  # GLOBAL module name; call it
    with pytest.raises(UnsafePickleError, match=f"{module}.{name}"):
        load_plain(path)


def test_codecs_encode_is_only_a_latin1_bytes_literal(tmp_path):
    ok, bad = tmp_path / "ok.pkl", tmp_path / "bad.pkl"
    ok.write_bytes(pickle.dumps(b"\x00\xff", protocol=2))  # Python 3 writes _codecs.encode(str, 'latin1')
    assert load_plain(ok) == b"\x00\xff"
    bad.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(DatasetNotFoundError, match="not a valid pickle"):
        load_plain(bad)


def test_truncated_cifar_pickles_give_a_clear_message(tmp_path):
    make_cifar(tmp_path, "cifar10", per_file=4)
    target = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    full = target.read_bytes()
    for keep in (0, 1, 40, len(full) // 2, len(full) - 1):
        target.write_bytes(full[:keep])
        with pytest.raises(DatasetNotFoundError) as e:
            build_data({"name": "cifar10", "root": str(tmp_path), "verify": False, "download": False,
                        "batch_size": 4})
        msg = str(e.value)
        assert str(target) in msg and "truncated or not a valid pickle" in msg
        assert "prepare-data cifar10" in msg


def test_malformed_cifar_content_gives_a_clear_message(tmp_path):
    make_cifar(tmp_path, "cifar10", per_file=4)
    target = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    cases = {
        "lacks the key": {"labels": [0]},
        "uint8 array of shape": {"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4},
        "3 labels for 4 images": {"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 3},
        "not the dict": [1, 2, 3],
    }
    for expected, content in cases.items():
        target.write_bytes(pickle.dumps(content))
        with pytest.raises(DatasetNotFoundError, match=expected):
            build_data({"name": "cifar10", "root": str(tmp_path), "verify": False, "download": False,
                        "batch_size": 4})


def test_truncated_pickle_through_the_runner_is_a_configuration_error(run_train, tmp_path):
    from fisherbench.core.errors import UserError

    make_cifar(tmp_path, "cifar10", per_file=4)
    target = tmp_path / "cifar-10-batches-py" / "test_batch"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(UserError, match="truncated or not a valid pickle"):
        run_train("data=cifar10", f"data.root={tmp_path}", "data.verify=false", "data.download=false",
                  "data.batch_size=4", "budget=steps", "budget.steps=1",
                  base=["model=small_cnn", "model.width=4", "model.hidden=16", "optimizer=adam", "logger=none"])


def test_cifar_reader_goes_through_the_plain_unpickler(tmp_path, monkeypatch):
    make_cifar(tmp_path, "cifar10", per_file=4)
    calls = []
    real = cifar.load_plain
    monkeypatch.setattr(cifar, "load_plain", lambda path, **kw: calls.append(path) or real(path, **kw))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("plain pickle.load used"))
    cifar.read_cifar(tmp_path, cifar.CIFAR_SPECS["cifar10"])
    assert len(calls) == 7  # 5 training batches, the test batch and the meta file

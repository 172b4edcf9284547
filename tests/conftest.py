"""Test-wide settings: no network, W&B offline, small thread count, fast deterministic defaults."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("FISHERBENCH_OFFLINE", "1")  # fisherbench/data/download.py refuses to download
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")  # figures into files; the library never chooses a backend
os.environ.setdefault("FISHERBENCH_DATA", os.path.join(os.path.dirname(__file__), "_no_data_here"))
# subprocesses (`python -m fisherbench ...` from a temporary folder) import the checkout under test, whether or
# not it is installed: the environment says where, nothing edits sys.path
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join([_REPO, *filter(None, [os.environ.get("PYTHONPATH")])])

import ipaddress  # noqa: E402
import socket  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# the test models are tiny: one thread is faster than two (thread hand-off dominates), also in subprocesses
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def _is_local(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX path or abstract name
        return True
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Refuse any connection off this machine, so a test that reaches a download path proves it stays offline."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self, address):
        if not _is_local(address):
            raise OSError(f"tests must not use the network (tried to connect to {address!r})")
        return real_connect(self, address)

    def connect_ex(self, address):
        if not _is_local(address):
            raise OSError(f"tests must not use the network (tried to connect to {address!r})")
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
    # a deterministic run switches global torch flags; do not leak them into other tests (touch cuDNN flags
    # only when changed: the first access loads the cuDNN libraries, ~5 s)
    if torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


TINY = ["model=small_cnn", "model.width=4", "model.hidden=16", "data=synthetic_image", "data.shape=[3,8,8]",
        "data.num_train=64", "data.num_test=32", "data.batch_size=16", "optimizer=adam", "logger=none"]


@pytest.fixture
def run_train(tmp_path):
    """Run one config in-process: `run_train("budget=steps", "budget.steps=3")` -> RunResult.

    Starts from a tiny CNN on tiny synthetic images writing to a per-test results dir; later overrides win.
    """
    from fisherbench.engine.compose import compose_config
    from fisherbench.engine.lifecycle import run

    def _run(*overrides: str, base=TINY):
        cfg = compose_config([*base, f"results_dir={tmp_path / 'runs'}", *overrides])
        return run(cfg)

    return _run


SLOW_TIMEOUT_S = 1800  # pyproject.toml's default (300 s) is for the default suite


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` get SLOW_TIMEOUT_S unless they set their own timeout; `-m gpu` on a machine without
    CUDA: the GPU tests are skipped with a reason, not failed."""
    for item in items:
        if "slow" in item.keywords and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _plugins_do_not_leak():
    """Plug-ins a test registers from its own config folder are forgotten after it: other tests enumerate the
    registries (every optimizer has a YAML, every model trains, ...)."""
    from fisherbench.core import plugins

    loaded = dict(plugins.LOADED)
    yield
    if plugins.LOADED == loaded:
        return
    from fisherbench import data, models, optim
    from fisherbench.engine import compose

    for (group, name) in set(plugins.LOADED) - set(loaded):
        registry = {"optimizer": optim.OPTIMIZERS, "model": models.MODELS, "data": data.DATASETS}[group]
        registry._entries.pop(name, None)  # no public removal: the suite never unregisters
    plugins.LOADED.clear()
    plugins.LOADED.update(loaded)
    compose.USER_OPTIONS.clear()
    compose._scanned.clear()

"""Own model and own dataset (YAML or entry point), and plug-ins from an installed package's entry points."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fisherbench.core import plugins
from fisherbench.core.store import iter_run_dirs
from fisherbench.engine.compose import compose_config
from fisherbench.engine.lifecycle import run

REPO = Path(__file__).resolve().parents[2]

COMPONENTS = '''
import torch
from torch import nn

from fisherbench.data.plugins import tensor_bundle


class {prefix}MLP(nn.Module):
    """A two-layer perceptron."""

    def __init__(self, num_classes, input_shape, hidden=16):
        super().__init__()
        n = 1
        for s in input_shape:
            n *= s
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


def {prefix}blobs(options, context):
    """Three Gaussian blobs in 4 dimensions."""
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(3, 4, generator=g)
    y = torch.randint(0, 3, (96,), generator=g)
    x = centers[y] + torch.randn(96, 4, generator=g) * getattr(options, "spread", 0.5)
    return tensor_bundle("{prefix}blobs", (x[:64], y[:64]), (x[64:], y[64:]), options, context)


{prefix}blobs.fisherbench_capabilities = {{"task": "classification", "input_kind": "image"}}


class {prefix}SGD(torch.optim.SGD):
    """torch SGD, from a package."""
'''


def test_own_model_and_dataset_from_yaml_train_in_process(tmp_path, monkeypatch):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "h6_yaml_components.py").write_text(COMPONENTS.format(prefix="Y"))
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "data").mkdir()
    (conf / "model" / "ymlp.yaml").write_text("_target_: h6_yaml_components.YMLP\nhidden: 8\n"
                                              "_capabilities_: {family: mlp}\n")
    (conf / "data" / "yblobs.yaml").write_text("_target_: h6_yaml_components.Yblobs\nbatch_size: 16\nspread: 0.5\n"
                                               "_capabilities_: {task: classification, offline: true}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    monkeypatch.setenv(plugins.CONFIG_PATH_ENV, str(conf))
    cfg = compose_config(["model=ymlp", "data=yblobs", "optimizer=adam", "experiment=debug", "data.spread=0.25",
                          f"results_dir={tmp_path / 'runs'}", "logger.progress=never"])
    assert cfg.model.hidden == 8 and cfg.data.spread == 0.25
    result = run(cfg)
    assert result.status == "completed", result
    (rd,) = list(iter_run_dirs(tmp_path / "runs"))
    s, meta = rd.summary(), rd.meta()
    assert (s["model"], s["data"]) == ("ymlp", "yblobs")
    assert meta["plugins"]["model"]["target"] == "h6_yaml_components.YMLP"
    assert meta["plugins"]["data"]["source_file"] == str(tmp_path / "code" / "h6_yaml_components.py")
    assert meta["dataset"]["num_train"] == 64 and meta["dataset"]["fingerprint"].startswith("Yblobs:n=64/32:sha256=")
    with pytest.raises(Exception, match="hiden"):
        compose_config(["model=ymlp", "data=yblobs", "model.hiden=3"])


def fabricated_package(site: Path) -> None:
    """An installed distribution as importlib.metadata finds it: a module and a dist-info with entry points."""
    site.mkdir()
    (site / "h6_ep_components.py").write_text(COMPONENTS.format(prefix="E"))
    info = site / "h6_ep_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: h6-ep-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [fisherbench.optimizers]
        epsgd = h6_ep_components:ESGD
        [fisherbench.models]
        epmlp = h6_ep_components:EMLP
        [fisherbench.datasets]
        epblobs = h6_ep_components:Eblobs
    """))


def _run(args, site: Path, cwd: Path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ["PYTHONPATH"]])}
    env.pop(plugins.CONFIG_PATH_ENV, None)
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_help_lists_entry_point_plugins_with_their_package(tmp_path):
    fabricated_package(tmp_path / "site")
    p = _run(["--help"], tmp_path / "site", tmp_path)
    assert p.returncode == 0, p.stderr
    lines = {line.split()[1]: line for line in p.stdout.splitlines() if "(from entry point" in line}
    assert set(lines) == {"epsgd", "epmlp", "epblobs"}, p.stdout
    assert "h6_ep_components.ESGD" in lines["epsgd"] and "of package h6-ep-pkg 0.1" in lines["epsgd"]
    assert "fisherbench.datasets" in lines["epblobs"]


@pytest.mark.slow  # one training process
def test_entry_point_model_data_and_optimizer_train(tmp_path):
    fabricated_package(tmp_path / "site")
    p = _run(["model=epmlp", "data=epblobs", "optimizer=epsgd", "optimizer.momentum=0.9", "experiment=debug",
              "data.batch_size=16", f"results_dir={tmp_path / 'runs'}"], tmp_path / "site", tmp_path)
    assert p.returncode == 0, p.stderr
    (rd,) = list(iter_run_dirs(tmp_path / "runs"))
    assert (rd.summary()["model"], rd.summary()["optimizer"]) == ("epmlp", "epsgd")

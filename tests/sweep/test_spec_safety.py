"""Specs of a user's own: `extends` finds the built-in specs, every spec error is a message (exit 2), and no
override line of a spec can make Hydra run code (`_target_`, `hydra.*` outside the launcher allow-list)."""
from __future__ import annotations

import pickle

import pytest

from fisherbench.sweep import cli
from fisherbench.sweep.spec import SPEC_LAUNCHER_KEYS, SpecError, load_spec

OWN_SPEC = """
extends: [_fixed]
title: mine
preset: quick
families: {cnn: {}}
rows:
  small CNN: {family: cnn}
arms:
  main:
    Adam: [optimizer=adam]
"""


def test_own_spec_extends_a_builtin_part(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(OWN_SPEC)
    spec = load_spec(str(path))
    assert "fixed" in spec.arms and "SGD-momentum" in spec.arms["fixed"]  # came from the built-in _fixed.yaml
    assert [c.column for c in spec.cells(["main", "fixed"])][:2] == ["Adam", "AdaFisher (paper eqs.)"]


def test_own_spec_extends_a_builtin_table_and_a_local_part(tmp_path):
    (tmp_path / "_mine.yaml").write_text("seeds: [7]\n")
    path = tmp_path / "t2.yaml"
    path.write_text("extends: [table2_cifar10, _mine]\ntitle: my table 2\n")
    spec = load_spec(str(path))
    assert spec.seeds == [7] and spec.title == "my table 2" and "ResNet-18" in spec.rows


@pytest.mark.parametrize("text, message", [
    ("extends: [_nonexistent]\n" + OWN_SPEC.split("\n", 2)[2], "names no spec"),
    ("extends: _fixed\nrows: [a, b]\narms: {main: {A: [optimizer=adam]}}\n", "`rows` must be a mapping"),
    ("seeds: [a]\nrows: {r: {}}\narms: {main: {A: [optimizer=adam]}}\n", "malformed"),
    ("rows: {r: {}}\narms: {main: {A: optimizer=adam}}\n", "must be a list of overrides"),
    ("rows: {r: {}}\narms: {main: {A: [optimizer=adam]}}\ncells: {r: [x]}\n", "must be a mapping"),
    ("rows: {r: {}}\narms: {main: {A: [[nested]]}}\n", "must be a `key=value` string"),
    (":\n  - [", "not valid YAML"),
])
def test_every_spec_error_is_exit_2_with_a_message(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match="bad.yaml"):
        load_spec(str(path))
    assert cli.main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_extends_cycle_is_a_message(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: [b]\n")
    (tmp_path / "b.yaml").write_text("extends: [a]\n")
    with pytest.raises(SpecError, match="cycle"):
        load_spec(str(tmp_path / "a.yaml"))


class _Marker:
    """A pickle that creates a file when it is loaded (what `numpy.load(..., allow_pickle=True)` would do)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("lines", [
    # the reported attack: Hydra instantiates hydra.callbacks entries in every train.py it starts
    ["+hydra.callbacks.x._target_=numpy.load", "+hydra.callbacks.x.file={payload}",
     "+hydra.callbacks.x.allow_pickle=true"],
    # a `_target_` under a run's own keys, or in a value
    ["+optimizer.x._target_=numpy.load"],
    ["+model.extra={{_target_: numpy.load, file: {payload}, allow_pickle: true}}"],
    # Hydra's own settings: environment of the job, shell commands of the SLURM launcher
    ["hydra.job.env_set.LD_PRELOAD=/tmp/evil.so"],
    ["+hydra.launcher.setup=[touch /tmp/evil]"],
    ["hydra/launcher=submitit_local"],
])
@pytest.mark.parametrize("where", ["overrides", "row", "cell"])
def test_a_spec_cannot_run_code(tmp_path, capsys, monkeypatch, lines, where):
    marker, payload = tmp_path / "marker", tmp_path / "payload.npy"
    payload.write_bytes(pickle.dumps(_Marker(marker)))
    lines = [line.format(payload=payload) for line in lines]
    quoted = "[" + ", ".join(f"'{line}'" for line in lines) + "]"
    spec = {"overrides": f"overrides: {quoted}\nrows: {{r: {{}}}}\n",
            "row": f"rows: {{r: {{overrides: {quoted}}}}}\n",
            "cell": f"rows: {{r: {{}}}}\ncells: {{r: {{A: {quoted}}}}}\n"}[where]
    path = tmp_path / "evil.yaml"
    path.write_text("preset: debug\n" + spec + "arms: {main: {A: [optimizer=adam]}}\n")
    monkeypatch.chdir(tmp_path)
    rc = cli.main([str(path), "--results-dir", str(tmp_path / "runs"), "--gpus", "none"])  # a real launch
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "_target_" in err or "Hydra's own settings" in err
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_launcher_resources_are_allowed_at_the_top_and_go_to_the_launcher(tmp_path):
    path = tmp_path / "slurm.yaml"
    path.write_text("overrides: [hydra.launcher.timeout_min=1440, hydra.launcher.gpus_per_node=1, seed=3]\n"
                    "rows: {r: {}}\narms: {main: {A: [optimizer=adam]}}\n")
    spec = load_spec(str(path))
    assert spec.launcher == ["hydra.launcher.timeout_min=1440", "hydra.launcher.gpus_per_node=1"]
    assert spec.overrides == ["seed=3"]  # never a run's override (train.py has no launcher)
    assert {"timeout_min", "gpus_per_node", "max_num_timeout"} <= set(SPEC_LAUNCHER_KEYS)
    assert "setup" not in SPEC_LAUNCHER_KEYS and "additional_parameters" not in SPEC_LAUNCHER_KEYS
    path.write_text("rows: {r: {overrides: [hydra.launcher.timeout_min=5]}}\narms: {main: {A: [optimizer=adam]}}\n")
    with pytest.raises(SpecError, match="top-level `overrides` only"):
        load_spec(str(path))


def test_every_shipped_spec_passes_the_filter():
    from fisherbench.sweep.spec import available_specs

    for name in available_specs():
        load_spec(name)

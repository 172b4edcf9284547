"""`threads=auto` (the default): a run on a busy machine uses the idle cores, says so, and records the count;
sweeps size their workers with the same function."""
from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from fisherbench.core import env
from fisherbench.core.config import validate as validate_config
from fisherbench.engine.compose import compose_config


@pytest.fixture
def machine(monkeypatch):
    """A 4-core machine whose load average the test sets; no OMP_NUM_THREADS; nothing resolved yet."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(env, "_auto_threads", None)
    monkeypatch.setattr(env, "usable_cores", lambda: 4)
    load = {"value": 0.0}
    monkeypatch.setattr(os, "getloadavg", lambda: (load["value"], 0.0, 0.0))

    def set_load(value):
        load["value"] = value
        monkeypatch.setattr(env, "_auto_threads", None)

    return set_load


@pytest.mark.parametrize("load, threads", [(0.0, 4), (0.4, 4), (1.0, 3), (2.0, 2), (3.6, 1), (9.0, 1)])
def test_auto_uses_the_cores_other_processes_leave_idle(machine, load, threads):
    machine(load)
    assert env.resolve_threads("auto") == threads


def test_auto_says_so_once_when_it_lowers_the_count(machine, capsys):
    machine(2.0)
    assert env.resolve_threads("auto") == 2
    assert env.resolve_threads("auto") == 2
    err = capsys.readouterr().err
    assert err.count("threads=auto: 2 threads for 4 cores (load average 2.0") == 1 and "threads=N" in err
    machine(0.0)
    env.resolve_threads("auto")
    assert capsys.readouterr().err == ""  # nothing to say on an idle machine


def test_an_explicit_omp_num_threads_wins(machine, monkeypatch):
    machine(3.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert env.resolve_threads("auto") is None  # torch already reads OMP_NUM_THREADS


def test_explicit_counts_and_null(machine):
    machine(3.0)
    assert env.resolve_threads(2) == 2 and env.resolve_threads(None) is None


def test_runtime_settings_record_the_resolved_count(machine):
    machine(2.0)
    cfg = compose_config([])
    assert cfg.threads == "auto"  # the default
    assert env.runtime_settings(cfg)["threads"] == 2  # what meta.json `runtime.threads` records


def test_sweep_workers_share_the_same_idle_cores(machine):
    from fisherbench.sweep.local import cpu_threads

    machine(2.0)
    assert cpu_threads(1) == 2 and cpu_threads(2) == 1 and cpu_threads(4) == 1


@pytest.mark.parametrize("value, ok", [("auto", True), (None, True), (3, True), (0, False), ("many", False),
                                       (True, False), (-1, False)])
def test_threads_values(value, ok):
    cfg = compose_config([])
    OmegaConf.update(cfg, "threads", value, merge=False)
    if ok:
        validate_config(cfg)
    else:
        with pytest.raises(Exception, match="threads must be auto"):
            validate_config(cfg)

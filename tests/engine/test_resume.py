"""Runs that survive: crash + resume bitwise, signals, OOM and exceptions as results, corrupted checkpoints,
concurrent processes, and 2-process data-parallel training (gloo on CPU)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fisherbench.engine.faults as faults_mod
from fisherbench.core import checkpoint as ckpt
from fisherbench.core.errors import UserError
from fisherbench.core.store import RunDir, iter_run_dirs
from fisherbench.engine.compose import compose_config
from fisherbench.engine.lifecycle import run

REPO = Path(__file__).resolve().parents[2]
TINY = ["model=small_cnn", "model.width=4", "model.hidden=16", "data=synthetic_image", "data.shape=[3,8,8]",
        "data.num_train=64", "data.num_test=32", "data.batch_size=16", "logger=none", "deterministic=true",
        "budget=epochs", "budget.epochs=3"]
# optimizers whose resume must be bitwise exact (AdaFisher: every variant)
RESUMABLE = ["adamw", "fadam", "kfac", "adafisher", "adafisherw", "adafisher_official", "adafisher_paper",
             "adafisher_constf"]
# AdaFisher/K-FAC settings that make their periodic curvature work happen inside this short run
PERIODIC = {"adafisher": ["optimizer.update_interval=3"], "kfac": ["optimizer.curvature_interval=3"]}


class SimulatedCrash(BaseException):
    """Raised instead of os._exit in-process: nothing after the crash point runs (no checkpoint, no summary)."""


def _extra(optimizer: str) -> list[str]:
    family = "adafisher" if optimizer.startswith("adafisher") else optimizer
    return PERIODIC.get(family, [])


def _run(tmp_path, name, *overrides):
    return run(compose_config([*TINY, f"results_dir={tmp_path / name}", *overrides]))


def _params(run_dir: Path) -> str:
    return RunDir(run_dir).summary()["final_params_sha256"]


def _rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("train_s", "data_s", "wall_s")} for r in RunDir(run_dir).metrics()]


@pytest.mark.parametrize("optimizer", RESUMABLE)
def test_crash_and_resume_is_bitwise_identical(tmp_path, monkeypatch, optimizer):
    """Crash mid-epoch 2 (after the epoch-1 checkpoint), resume: same parameters, same metric rows."""
    overrides = [f"optimizer={optimizer}", *_extra(optimizer)]
    clean = _run(tmp_path, "clean", *overrides)
    assert clean.status == "completed", clean.summary.get("error")

    def crash(code):
        raise SimulatedCrash(code)

    monkeypatch.setattr(faults_mod.os, "_exit", crash)
    monkeypatch.setenv("FISHERBENCH_FAULT_AT_STEP", "7")  # 4 steps per epoch: dies in the 2nd epoch
    with pytest.raises(SimulatedCrash):
        _run(tmp_path, "crashed", *overrides)
    monkeypatch.delenv("FISHERBENCH_FAULT_AT_STEP")
    (crashed_dir,) = list(iter_run_dirs(tmp_path / "crashed"))
    assert crashed_dir.summary() is None and crashed_dir.checkpoint_path.exists()
    resumed = _run(tmp_path, "crashed", *overrides)
    assert resumed.status == "completed"
    assert resumed.summary["final_params_sha256"] == clean.summary["final_params_sha256"]
    assert _rows(resumed.run_dir) == _rows(clean.run_dir)
    assert RunDir(resumed.run_dir).meta()["resume_count"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", RESUMABLE)
def test_kill9_and_resume_in_a_real_process(tmp_path, optimizer):
    args = [sys.executable, str(REPO / "train.py"), *TINY, f"optimizer={optimizer}", *_extra(optimizer)]
    killed = subprocess.run([*args, f"results_dir={tmp_path / 'a'}"], capture_output=True, text=True,
                            env={**os.environ, "FISHERBENCH_FAULT_AT_STEP": "6"})
    assert killed.returncode == 86, killed.stderr
    for root in ("a", "b"):
        done = subprocess.run([*args, f"results_dir={tmp_path / root}"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    (a,), (b,) = list(iter_run_dirs(tmp_path / "a")), list(iter_run_dirs(tmp_path / "b"))
    assert _params(a.path) == _params(b.path)


def test_sigterm_checkpoints_and_stops_as_preempted_then_resumes(tmp_path):
    args = [sys.executable, str(REPO / "train.py"), *TINY, "optimizer=adamw"]
    env = {**os.environ, "FISHERBENCH_SIGNAL_AT_STEP": "6:SIGTERM"}
    stopped = subprocess.run([*args, f"results_dir={tmp_path / 'a'}"], capture_output=True, text=True, env=env)
    assert stopped.returncode == 4, stopped.stderr
    (a,) = list(iter_run_dirs(tmp_path / "a"))
    s = a.summary()
    assert s["status"] == "preempted" and s["steps"] == 6 and "signal" in s["stop_reason"]
    payload = torch.load(a.checkpoint_path, weights_only=True)
    assert payload["state"]["step"] == 6 and payload["state"]["batch"] == 2  # mid-epoch position
    again = subprocess.run([*args, f"results_dir={tmp_path / 'a'}"], capture_output=True, text=True)
    assert again.returncode == 0 and "resuming run" in again.stderr
    clean = _run(tmp_path, "b", "optimizer=adamw")
    assert a.summary()["status"] == "completed"
    assert _params(a.path) == clean.summary["final_params_sha256"]
    assert _rows(a.path) == _rows(clean.run_dir)


def _oom_at(step: int, training: bool):
    """Wrap models.create_model so the model raises a real torch.OutOfMemoryError from a forward hook."""
    from fisherbench import models

    real = models.create_model
    calls = {"n": 0}

    def create(*args, **kwargs):
        model = real(*args, **kwargs)

        def hook(module, inputs, output):
            if module.training == training:
                calls["n"] += 1
                if calls["n"] >= step:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")

        model.register_forward_hook(hook)
        return model

    return create


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_out_of_memory_is_recorded_as_oom(tmp_path, monkeypatch, training):
    from fisherbench import models

    monkeypatch.setattr(models, "create_model", _oom_at(3, training))
    r = _run(tmp_path, "runs", "optimizer=adamw")
    s = r.summary
    assert s["status"] == "oom"
    assert s["peak_memory_bytes"] and s["peak_memory_bytes"] > 0
    assert "OutOfMemoryError" in (r.run_dir / "error.txt").read_text()
    assert not RunDir(r.run_dir).is_final()  # an OOM run is retried by a later launch (e.g. smaller batch)


def test_exception_is_recorded_as_failed_with_traceback(tmp_path, monkeypatch):
    from fisherbench import models

    real = models.create_model

    def broken(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_hook(lambda m, i, o: (_ for _ in ()).throw(RuntimeError("boom in forward")))
        return model

    monkeypatch.setattr(models, "create_model", broken)
    r = _run(tmp_path, "runs", "optimizer=adamw")
    assert r.summary["status"] == "failed" and "boom in forward" in r.summary["error"]
    trace = (r.run_dir / "error.txt").read_text()
    assert "Traceback" in trace and "boom in forward" in trace


def _crash_after(tmp_path, monkeypatch, name, step, *overrides):
    monkeypatch.setattr(faults_mod.os, "_exit", lambda code: (_ for _ in ()).throw(SimulatedCrash(code)))
    monkeypatch.setenv("FISHERBENCH_FAULT_AT_STEP", str(step))
    with pytest.raises(SimulatedCrash):
        _run(tmp_path, name, *overrides)
    monkeypatch.delenv("FISHERBENCH_FAULT_AT_STEP")
    (d,) = list(iter_run_dirs(tmp_path / name))
    return d


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch, capsys):
    clean = _run(tmp_path, "clean", "optimizer=adamw")
    d = _crash_after(tmp_path, monkeypatch, "runs", 10, "optimizer=adamw")  # checkpoints after epochs 1 and 2
    assert ckpt.prev_path(d.checkpoint_path).exists()
    data = d.checkpoint_path.read_bytes()
    d.checkpoint_path.write_bytes(data[: len(data) // 2])  # torn write
    resumed = _run(tmp_path, "runs", "optimizer=adamw")
    err = capsys.readouterr().err
    assert "ignoring checkpoint" in err and "previous checkpoint" in err
    assert resumed.summary["final_params_sha256"] == clean.summary["final_params_sha256"]


def test_all_checkpoints_corrupted_restarts_from_scratch(tmp_path, monkeypatch, capsys):
    clean = _run(tmp_path, "clean", "optimizer=adamw")
    d = _crash_after(tmp_path, monkeypatch, "runs", 10, "optimizer=adamw")
    for p in (d.checkpoint_path, ckpt.prev_path(d.checkpoint_path)):
        p.write_bytes(b"not a checkpoint")
    resumed = _run(tmp_path, "runs", "optimizer=adamw")
    err = capsys.readouterr().err
    assert "ignoring checkpoint" in err and "starting the run from the beginning" in err
    assert resumed.summary["final_params_sha256"] == clean.summary["final_params_sha256"]
    assert _rows(resumed.run_dir) == _rows(clean.run_dir)  # the stale rows of the first attempt are gone


def test_checkpoint_of_another_config_is_refused(tmp_path, monkeypatch):
    other = _crash_after(tmp_path, monkeypatch, "other", 6, "optimizer=adamw", "seed=5")
    target = _crash_after(tmp_path, monkeypatch, "runs", 6, "optimizer=adamw")
    shutil.copy(other.checkpoint_path, target.checkpoint_path)
    with pytest.raises(UserError, match="belongs to run"):
        _run(tmp_path, "runs", "optimizer=adamw")


def test_concurrent_processes_never_run_the_same_run_twice(tmp_path):
    args = [sys.executable, str(REPO / "train.py"), *TINY[:-1], "budget.epochs=6", "optimizer=adamw",
            f"results_dir={tmp_path / 'runs'}"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    ran = [o for o in outs if "[fisherbench] completed" in o[0]]
    waited = [o for o in outs if "running elsewhere" in o[1] or "skipped" in o[0]]
    assert len(ran) == 1 and len(waited) == 2, outs
    (d,) = list(iter_run_dirs(tmp_path / "runs"))
    assert d.summary()["status"] == "completed"
    assert [r["step"] for r in d.metrics()] == [4, 8, 12, 16, 20, 24]  # one writer: no duplicated rows


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    """Global batch 16 as 2 ranks x 8: without BatchNorm the averaged gradient equals the single-process one."""
    common = [*TINY[:-1], "budget.epochs=2", "model.batch_norm=false", "optimizer=adamw", "deterministic=false",
              "checkpoint.keep_final=true"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "train.py"), *common, f"results_dir={tmp_path / 'ddp'}"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = _run(tmp_path, "single", *common[len(TINY) - 1:])
    (d,) = list(iter_run_dirs(tmp_path / "ddp"))
    s = d.summary()
    assert s["world_size"] == 2 and len(set(s["rank_params_sha256"])) == 1  # replicas identical
    assert d.run_id != single.run_dir.name  # a data-parallel run is a different run
    a = torch.load(d.checkpoint_path, weights_only=True)["model"]
    b = torch.load(RunDir(single.run_dir).checkpoint_path, weights_only=True)["model"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    rows_ddp, rows_single = RunDir(d.path).metrics(), RunDir(single.run_dir).metrics()
    assert [r["step"] for r in rows_ddp] == [r["step"] for r in rows_single] == [4, 8]
    # evaluation covers the whole test split across ranks
    assert rows_ddp[-1]["test/acc1"] == pytest.approx(rows_single[-1]["test/acc1"], abs=1 / 32 + 1e-9)

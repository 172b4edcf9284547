"""A hostile-but-fair store: planted pickles, vanished locks, corrupt files, hostile values, signals, full disks.

Each test is one case of the store-hardening table in docs/results-store.md ("What is guaranteed").
"""
import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fisherbench.core import checkpoint as ckpt
from fisherbench.core.errors import UserError
from fisherbench.core.status import Status
from fisherbench.core.store import CorruptRunError, LockLostError, RunDir, RunLock, iter_run_dirs, lock_is_held
from fisherbench.engine.compose import compose_config
from fisherbench.engine.lifecycle import run

REPO = Path(__file__).resolve().parents[2]
TINY = ["model=small_cnn", "model.width=4", "model.hidden=16", "data=synthetic_image", "data.shape=[3,8,8]",
        "data.num_train=64", "data.num_test=32", "data.batch_size=16", "logger=none", "optimizer=adam",
        "budget=epochs", "budget.epochs=2"]


def _cfg(tmp_path, *overrides, name="runs"):
    return compose_config([*TINY, f"results_dir={tmp_path / name}", *overrides])


def _train(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env={**os.environ, **(env or {})}, timeout=300)


class _Planted:
    """Unpickling this creates the marker file: what an attacker's pickle would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# ------------------------------------------------------------------------------------ planted pickles
def test_planted_pickle_checkpoint_never_runs_and_the_run_starts_fresh(tmp_path, capsys):
    first = run(_cfg(tmp_path, "checkpoint.keep_final=true"))
    rd = RunDir(first.run_dir)
    marker = tmp_path / "pwned"
    payload = {"run_id": rd.run_id, "format_version": ckpt.FORMAT_VERSION, "evil": _Planted(str(marker))}
    for path in (rd.checkpoint_path, ckpt.prev_path(rd.checkpoint_path)):  # both: no fallback is left
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    rd.summary_path.unlink()  # make the run look interrupted so that the next launch resumes it
    again = run(_cfg(tmp_path))
    assert not marker.exists()  # nothing executed
    err = capsys.readouterr().err
    assert "ignoring checkpoint" in err and "starting the run from the beginning" in err
    assert again.status == "completed"
    assert again.summary["final_params_sha256"] == first.summary["final_params_sha256"]  # same run, from scratch


def test_planted_pickle_in_a_torch_zip_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({"run_id": "x", "format_version": ckpt.FORMAT_VERSION, "model": {}, "optimizer": {}, "state": {},
                "ledger": {}, "rng": {}, "evil": _Planted(str(marker))}, path)
    payload, notes = ckpt.load_latest(path, "x")
    assert payload is None and not marker.exists()
    assert "objects other than tensors" in notes[0]


def test_checkpoint_payload_round_trips_weights_only(tmp_path):
    import random

    import numpy as np

    rng = ckpt.rng_state()
    expected = (random.random(), float(np.random.rand()), torch.rand(3))  # what every RNG draws next
    path = tmp_path / "c.pt"
    ckpt.save(path, {"run_id": "r", "model": {"w": torch.ones(2)}, "optimizer": {}, "state": {"step": 3},
                     "ledger": {"train_s": 1.0}, "rng": rng})
    payload, notes = ckpt.load_latest(path, "r")
    assert payload is not None and not notes and payload["state"] == {"step": 3}
    random.random(), np.random.rand(), torch.rand(3)  # move every RNG on
    ckpt.set_rng_state(payload["rng"])
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_saving_a_non_plain_object_is_a_bug_caught_at_save(tmp_path):
    with pytest.raises(TypeError, match="not a tensor or plain data"):
        ckpt.save(tmp_path / "c.pt", {"run_id": "r", "model": {}, "optimizer": {"obj": _Planted("x")}, "state": {},
                                      "ledger": {}, "rng": {}})
    assert not (tmp_path / "c.pt").exists()


# ------------------------------------------------------------------------------------------------ locks
def test_lock_verify_detects_deleted_and_replaced_lock_files(tmp_path):
    a = RunLock(tmp_path, "rid")
    assert a.acquire()
    assert not RunLock(tmp_path, "rid").acquire()  # held
    assert lock_is_held(tmp_path, "rid")
    a.path.unlink()  # someone deletes the lock mid-run
    b = RunLock(tmp_path, "rid")
    assert b.acquire()  # a second process can take the name now ...
    with pytest.raises(LockLostError, match="deleted|replaced"):
        a.verify()  # ... and the first one notices before its next write
    b.verify()
    a.release()  # must not remove b's lock file
    assert b.path.exists() and lock_is_held(tmp_path, "rid")
    b.release()
    assert not b.path.exists() and not lock_is_held(tmp_path, "rid")  # no lock files left behind


def test_a_run_whose_lock_vanishes_stops_without_writing(tmp_path):
    cfg = _cfg(tmp_path, "budget.epochs=3")
    lock_path = {}

    def delete_lock_at_first_eval(trainer):
        original = trainer.on_eval

        def on_eval(row):
            if original:
                original(row)
            if row["eval"] == 0:
                next(Path(cfg.results_dir).glob(".*.lock")).unlink()
                lock_path["deleted"] = True
        trainer.on_eval = on_eval

    with pytest.raises(LockLostError):
        run(cfg, on_trainer=delete_lock_at_first_eval)
    assert lock_path["deleted"]
    (rd,) = list(iter_run_dirs(cfg.results_dir))
    assert rd.summary() is None  # the process that lost its lock recorded nothing more
    assert [r["eval"] for r in rd.metrics()] == [0]
    resumed = run(_cfg(tmp_path, "budget.epochs=3"))  # a later launch owns the run and finishes it
    assert resumed.status == "completed" and [r["eval"] for r in RunDir(resumed.run_dir).metrics()] == [0, 1, 2]


def test_metric_rows_are_deduplicated_by_evaluation_index(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.create({"seed": 0}, {})
    for i in (0, 1, 1, 2, 0):
        rd.append_metrics({"eval": i, "x": i})
    with open(rd.metrics_path, "a") as f:
        f.write('[1, 2]\n{"eval": "3"}\n{"eval": 4, "x":')  # foreign rows and a torn last line
    assert [r["eval"] for r in rd.metrics()] == [0, 1, 2]


def test_config_errors_leave_no_lock_files(tmp_path):
    with pytest.raises(UserError):
        run(_cfg(tmp_path, "optimizer.lr=-1"))
    assert not list((tmp_path / "runs").glob(".*.lock"))


# ---------------------------------------------------------------------------------------- corrupt files
@pytest.mark.parametrize("content,problem", [("[1, 2]", "not an object"), ("{", "not valid JSON"),
                                             ('{"run_id": "x", "status": "great"}', "unknown run status"),
                                             ('{"run_id": 3, "status": "completed"}', "'run_id' is a int")])
def test_corrupt_summary_is_reported_never_trusted(tmp_path, content, problem):
    first = run(_cfg(tmp_path))
    rd = RunDir(first.run_dir)
    rd.summary_path.write_text(content)
    assert rd.status() is Status.CORRUPT and problem in rd.problem()
    with pytest.raises(CorruptRunError):
        rd.summary()
    with pytest.raises(UserError, match="is corrupt"):
        run(_cfg(tmp_path))
    assert rd.summary_path.read_text() == content  # nothing was changed
    assert run(_cfg(tmp_path, "overwrite=true")).status == "completed"


def test_corrupt_summary_exits_2_with_the_path(tmp_path):
    first = run(_cfg(tmp_path))
    RunDir(first.run_dir).summary_path.write_text("[1, 2]")
    p = _train(*TINY, f"results_dir={tmp_path / 'runs'}")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and str(first.run_dir) in p.stderr and "corrupt" in p.stderr


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "a: [1, 2\n", "just text\n"])
def test_malformed_config_yaml_is_corrupt(tmp_path, text):
    rd = RunDir(tmp_path / "r")
    rd.create({"seed": 0}, {})
    rd.config_path.write_text(text)
    with pytest.raises(CorruptRunError, match="config.yaml"):
        rd.config()
    assert "config.yaml" in rd.problem()


# ---------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("args,message", [
    (["device=banana"], "device='banana' is not a device"),
    (["device=meta"], "runs on cpu or cuda"),
    (["eval.max_batches=0"], "eval.max_batches must be >= 1"),
    (["results_dir="], "results_dir is empty"),
])
def test_bad_values_exit_2_without_traceback(tmp_path, args, message):
    extra = [] if any(a.startswith("results_dir") for a in args) else [f"results_dir={tmp_path / 'runs'}"]
    p = _train(*TINY, *extra, *args, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr
    assert not list(tmp_path.rglob("config.yaml"))  # nothing written anywhere (cwd included)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_run_directory_exits_2(tmp_path):
    first = run(_cfg(tmp_path))
    RunDir(first.run_dir).summary_path.unlink()
    os.chmod(first.run_dir, stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(UserError, match="not writable"):
            run(_cfg(tmp_path))
    finally:
        os.chmod(first.run_dir, stat.S_IRWXU)


def test_read_only_run_directory_is_refused_even_as_root(tmp_path, monkeypatch):
    first = run(_cfg(tmp_path))
    RunDir(first.run_dir).summary_path.unlink()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == first.run_dir else real_access(p, mode))
    with pytest.raises(UserError, match="not writable"):
        run(_cfg(tmp_path))


def test_disk_full_while_writing_the_summary_is_a_message(tmp_path, monkeypatch):
    import errno

    import fisherbench.core.store as store

    def full(path, obj, **kw):
        if Path(path).name == "summary.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, obj, **kw)

    real = store.atomic_write_json
    monkeypatch.setattr(store, "atomic_write_json", full)
    with pytest.raises(store.DiskFullError, match="disk full.*No space left on device.*the run is resumable.*"
                                                  "launch the same command again"):
        run(_cfg(tmp_path))
    monkeypatch.setattr(store, "atomic_write_json", real)
    assert run(_cfg(tmp_path)).status == "completed"  # and the next launch records it


# ---------------------------------------------------------------------------------------------- signals
def test_ctrl_c_checkpoints_and_exits_4_as_preempted(tmp_path):
    p = _train(*TINY, "budget.epochs=3", f"results_dir={tmp_path / 'runs'}",
               env={"FISHERBENCH_SIGNAL_AT_STEP": "5:SIGINT"})
    assert p.returncode == 4, p.stderr
    assert "Traceback" not in p.stderr
    (rd,) = list(iter_run_dirs(tmp_path / "runs"))
    assert rd.status() is Status.PREEMPTED and rd.checkpoint_path.exists()
    again = _train(*TINY, "budget.epochs=3", f"results_dir={tmp_path / 'runs'}")
    assert again.returncode == 0 and rd.status() is Status.COMPLETED


def test_multirun_with_a_failed_job_exits_nonzero_and_lists_it(tmp_path):
    p = _train("-m", *TINY, f"results_dir={tmp_path / 'runs'}", "optimizer.lr=0.01,-1")
    assert p.returncode == 2, p.stderr
    assert "1 of 2 jobs did not complete" in p.stderr and "optimizer.lr=-1" in p.stderr
    (index,) = list((tmp_path / "runs" / "_multirun").glob("*/jobs.jsonl"))
    jobs = [json.loads(line) for line in index.read_text().splitlines()]
    assert sorted(j["status"] for j in jobs) == ["completed", "config_error"]
    assert all(j["run_id"] for j in jobs if j["status"] == "completed")


# ------------------------------------------------------------------------------------------------- nits
def test_stale_error_file_is_removed_when_the_run_later_completes(tmp_path):
    first = run(_cfg(tmp_path, "checkpoint.keep_final=true"))
    rd = RunDir(first.run_dir)
    rd.error_path.write_text("Traceback: an earlier attempt\n")
    summary = rd.summary()
    rd.write_summary({**summary, "status": "preempted"})
    assert run(_cfg(tmp_path)).status == "completed"
    assert not rd.error_path.exists()


def test_overwrite_keeps_the_finished_result_until_the_new_summary_exists(tmp_path):
    first = run(_cfg(tmp_path))
    rd = RunDir(first.run_dir)
    seen = {}

    def look_during_training(trainer):
        original = trainer.on_eval

        def on_eval(row):
            if original:
                original(row)
            seen.setdefault("status", rd.status())
            seen.setdefault("finished_at", (rd.summary() or {}).get("finished_at"))
        trainer.on_eval = on_eval

    again = run(_cfg(tmp_path, "overwrite=true"), on_trainer=look_during_training)
    assert seen["status"] is Status.COMPLETED and seen["finished_at"] == first.summary["finished_at"]
    assert again.status == "completed" and again.run_dir == first.run_dir
    assert rd.summary()["finished_at"] == again.summary["finished_at"]
    assert not list((tmp_path / "runs").glob(".*"))  # no staging directory or lock left


def test_atomically_written_files_follow_the_umask(tmp_path):
    result = run(_cfg(tmp_path))
    rd = RunDir(result.run_dir)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (rd.config_path, rd.meta_path, rd.summary_path,
                                                                rd.metrics_path)}
    assert len(set(modes.values())) == 1, modes  # all the same (the umask's), none 0600
    assert modes["summary.json"] == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

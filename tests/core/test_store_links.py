"""No write of the suite follows a link planted in a store (issue 19, item 4), and killed writes leave no
temporary files for good.

Run ids are predictable (a hash of the config), so anyone who can write to a shared store can plant
`.<run id>.lock -> ~victim/file` or `<run id>/summary.json -> ...` before a run starts. Each test plants one
link where the suite writes and checks that the write is refused with a message naming the path, and that
the victim is untouched.
"""
import errno
import os
import time
from pathlib import Path

import pytest

from fisherbench.core import checkpoint as ckpt
from fisherbench.core.errors import UserError
from fisherbench.core.store import (
    RunDir,
    RunLock,
    StoreLinkError,
    append_text,
    atomic_write_json,
    atomic_write_text,
    ensure_dir,
    lock_is_held,
    refuse_link,
)
from fisherbench.engine.compose import compose_config
from fisherbench.engine.identity import run_id_of
from fisherbench.engine.lifecycle import run

TINY = ["model=small_cnn", "model.width=4", "model.hidden=16", "data=synthetic_image", "data.shape=[3,8,8]",
        "data.num_train=32", "data.num_test=16", "data.batch_size=16", "logger=none", "optimizer=adam",
        "budget=steps", "budget.steps=2"]
PRECIOUS = "precious contents\n"


def _cfg(tmp_path, *overrides):
    return compose_config([*TINY, f"results_dir={tmp_path / 'runs'}", *overrides])


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_text(PRECIOUS)
    return path


@pytest.fixture
def victim_dir(tmp_path):
    d = tmp_path / "victim_dir"
    d.mkdir()
    (d / "keep.txt").write_text(PRECIOUS)
    return d


def _untouched(victim_dir):
    assert sorted(p.name for p in victim_dir.iterdir()) == ["keep.txt"]
    assert (victim_dir / "keep.txt").read_text() == PRECIOUS


# ------------------------------------------------------------------------------------------- the lock
def test_a_lock_link_is_refused_and_the_victim_is_not_truncated(tmp_path, victim):
    cfg = _cfg(tmp_path)
    root = tmp_path / "runs"
    root.mkdir()
    (root / f".{run_id_of(cfg)}.lock").symlink_to(victim)
    with pytest.raises(StoreLinkError, match=r"\.lock is a symbolic link .* refusing to follow it"):
        run(cfg)
    assert victim.read_text() == PRECIOUS  # was truncated to the PID before
    assert not lock_is_held(root, run_id_of(cfg))  # a probe neither follows it nor calls it held


def test_a_lock_hard_link_to_another_file_is_refused(tmp_path, victim):
    root = tmp_path / "runs"
    root.mkdir()
    os.link(victim, root / ".abc.lock")
    with pytest.raises(StoreLinkError):
        RunLock(root, "abc").acquire()
    assert victim.read_text() == PRECIOUS


def test_a_fifo_lock_is_refused_without_blocking(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    os.mkfifo(root / ".abc.lock")
    with pytest.raises(StoreLinkError):
        RunLock(root, "abc").acquire()


def test_a_lock_left_by_a_dead_process_is_still_taken(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    (root / ".abc.lock").write_text("12345\n")  # a plain file from a killed run: O_EXCL fails, then it is opened
    lock = RunLock(root, "abc")
    assert lock.acquire()
    lock.release()


# -------------------------------------------------------------------------------- the run directory
def test_a_run_directory_link_is_refused(tmp_path, victim_dir):
    cfg = _cfg(tmp_path)
    root = tmp_path / "runs"
    root.mkdir()
    (root / run_id_of(cfg)).symlink_to(victim_dir)
    with pytest.raises(StoreLinkError, match="a directory"):
        run(cfg)
    _untouched(victim_dir)


@pytest.mark.parametrize("name", ["config.yaml", "meta.json", "summary.json", "metrics.jsonl", "error.txt"])
def test_every_run_file_write_refuses_a_link(tmp_path, victim, name):
    rd = RunDir(tmp_path / "runs" / "0123456789abcdef")
    rd.create({"seed": 0}, {"argv": []})
    rd.path.joinpath(name).unlink(missing_ok=True)
    rd.path.joinpath(name).symlink_to(victim)
    write = {
        "config.yaml": lambda: rd.create({"seed": 0}, {}),
        "meta.json": lambda: rd.update_meta(x=1),
        "summary.json": lambda: rd.write_summary({"run_id": rd.run_id, "status": "completed"}),
        "metrics.jsonl": lambda: rd.append_metrics({"eval": 0}),
        "error.txt": lambda: rd.write_error("Traceback ..."),
    }[name]
    with pytest.raises(StoreLinkError, match=name):
        write()
    assert victim.read_text() == PRECIOUS
    assert [p.name for p in rd.path.iterdir() if p.name.endswith(".tmp")] == []  # the temporary file is gone


def test_truncating_metrics_refuses_a_link(tmp_path, victim):
    rd = RunDir(tmp_path / "runs" / "0123456789abcdef")
    rd.create({"seed": 0}, {})
    rd.metrics_path.symlink_to(victim)
    with pytest.raises(StoreLinkError):
        rd.truncate_metrics(0)
    assert victim.read_text() == PRECIOUS


def test_a_checkpoint_temp_link_is_refused_and_a_checkpoint_link_is_replaced_not_followed(tmp_path, victim):
    rd = RunDir(tmp_path / "runs" / "0123456789abcdef")
    rd.create({"seed": 0}, {})
    payload = {"run_id": "r", "model": {}, "optimizer": {}, "state": {}, "ledger": {"train_s": 1.0}, "rng": {}}
    new = rd.path / ".checkpoint.pt.new"
    new.symlink_to(victim)
    with pytest.raises(StoreLinkError):
        ckpt.save(rd.checkpoint_path, payload)
    new.unlink()
    rd.checkpoint_path.symlink_to(victim)  # rename never follows: the link moves to .prev, the victim stays
    ckpt.save(rd.checkpoint_path, payload)
    assert victim.read_text() == PRECIOUS and not rd.checkpoint_path.is_symlink()


# ------------------------------------------------------------------------------ overwrite and error.txt
def test_an_overwrite_staging_link_is_refused_and_the_result_kept(tmp_path, victim_dir):
    first = run(_cfg(tmp_path))
    assert first.status == "completed"
    before = RunDir(first.run_dir).summary_path.read_bytes()
    root = tmp_path / "runs"
    (root / f".{first.run_dir.name}.overwrite").symlink_to(victim_dir)
    with pytest.raises(StoreLinkError, match=r"\.overwrite is a symbolic link"):
        run(_cfg(tmp_path, "overwrite=true"))
    _untouched(victim_dir)  # `remove_tree` ignored the link and `create` wrote through it before
    assert RunDir(first.run_dir).summary_path.read_bytes() == before
    (root / f".{first.run_dir.name}.overwrite").unlink()
    assert run(_cfg(tmp_path, "overwrite=true")).status == "completed"


def test_a_failed_run_refuses_an_error_txt_link(tmp_path, victim, monkeypatch):
    from fisherbench.engine import trainer as trainer_mod

    def boom(self):
        self.run_dir.error_path.symlink_to(victim)  # planted while the run trains
        raise RuntimeError("a bug")

    monkeypatch.setattr(trainer_mod.Trainer, "fit", boom)
    with pytest.raises(StoreLinkError, match="error.txt"):
        run(_cfg(tmp_path))
    assert victim.read_text() == PRECIOUS


# ------------------------------------------------------------------- calibration, sweep, multirun, optuna
def test_the_calibration_cache_write_refuses_links(tmp_path, victim, victim_dir):
    root = tmp_path / "runs"
    root.mkdir()
    (root / "_calibration").symlink_to(victim_dir)  # the cache directory itself
    with pytest.raises(StoreLinkError, match="_calibration"):
        atomic_write_json(root / "_calibration" / "key.json", {"step_s": 0.1})  # as engine/calibrate.py writes it
    _untouched(victim_dir)
    (root / "_calibration").unlink()
    (root / "_calibration").mkdir()
    (root / "_calibration" / "key.json").symlink_to(victim)  # or one cache file
    with pytest.raises(StoreLinkError, match="key.json"):
        atomic_write_json(root / "_calibration" / "key.json", {"step_s": 0.1})
    assert victim.read_text() == PRECIOUS


def test_sweep_event_log_and_run_logs_refuse_links(tmp_path, victim, victim_dir):
    from fisherbench.sweep.local import SWEEP_SUBDIR, LocalRunner

    root = tmp_path / "runs"
    root.mkdir()
    (root / SWEEP_SUBDIR).symlink_to(victim_dir)
    runner = LocalRunner(root, [], "spec")
    with pytest.raises(StoreLinkError, match=SWEEP_SUBDIR):
        runner.events.write(event="sweep_start")
    _untouched(victim_dir)
    (root / SWEEP_SUBDIR).unlink()
    (root / SWEEP_SUBDIR / "logs").mkdir(parents=True)
    (root / SWEEP_SUBDIR / "logs" / "abc.log").symlink_to(victim)
    with pytest.raises(StoreLinkError, match="abc.log"):
        append_text(root / SWEEP_SUBDIR / "logs" / "abc.log", "x\n", below=root)  # as a run's log is opened
    assert victim.read_text() == PRECIOUS


def test_multirun_jobs_index_refuses_a_link(tmp_path, victim):
    d = tmp_path / "runs" / "_multirun" / "2026-01-01_00-00-00"
    d.mkdir(parents=True)
    (d / "jobs.jsonl").symlink_to(victim)
    with pytest.raises(StoreLinkError, match="jobs.jsonl"):
        append_text(d / "jobs.jsonl", "{}\n")  # as fisherbench/train.py records a multirun job
    assert victim.read_text() == PRECIOUS


def test_optuna_storage_refuses_links(tmp_path, victim, victim_dir):
    root = tmp_path / "runs"
    root.mkdir()
    (root / "_optuna").symlink_to(victim_dir)
    with pytest.raises(StoreLinkError, match="_optuna"):
        ensure_dir(root / "_optuna", below=root)  # what fisherbench/sweep/search.py checks before SQLite opens it
    (root / "_optuna").unlink()
    (root / "_optuna").mkdir()
    (root / "_optuna" / "spec.db").symlink_to(victim)
    with pytest.raises(StoreLinkError, match="spec.db"):
        refuse_link(root / "_optuna" / "spec.db")
    assert victim.read_text() == PRECIOUS and sorted(p.name for p in victim_dir.iterdir()) == ["keep.txt"]


def test_store_link_error_is_a_user_error_naming_the_path(tmp_path, victim):
    (tmp_path / "f.json").symlink_to(victim)
    with pytest.raises(UserError) as e:
        atomic_write_text(tmp_path / "f.json", "{}")
    assert str(tmp_path / "f.json") in str(e.value) and "symbolic link" in str(e.value)


# ------------------------------------------------------------------------------ stale temporary files
def test_a_killed_checkpoint_write_leaves_no_temp_file_after_the_next_write(tmp_path):
    rd = RunDir(tmp_path / "runs" / "0123456789abcdef")
    rd.create({"seed": 0}, {})
    stale = rd.path / "..checkpoint.pt.new.5f3a9c.tmp"  # what `kill -9` during a checkpoint write leaves
    stale.write_bytes(b"half a checkpoint")
    payload = {"run_id": "r", "model": {}, "optimizer": {}, "state": {}, "ledger": {"train_s": 1.0}, "rng": {}}
    ckpt.save(rd.checkpoint_path, payload)
    assert not stale.exists()
    stale.write_bytes(b"half")
    ckpt.remove(rd.checkpoint_path)  # a run that completes removes them with its checkpoints
    assert not stale.exists() and not rd.checkpoint_path.exists()


def test_stale_temp_files_of_shared_files_are_removed_only_when_old(tmp_path):
    target = tmp_path / "_calibration" / "key.json"
    target.parent.mkdir()
    old, fresh = target.parent / ".key.json.aaaa.tmp", target.parent / ".key.json.bbbb.tmp"
    for p in (old, fresh):
        p.write_text("partial")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    atomic_write_json(target, {"a": 1})
    assert not old.exists() and fresh.exists()  # another process may still be writing the fresh one


def test_a_killed_run_resumes_and_its_temp_files_are_gone(tmp_path):
    cfg = _cfg(tmp_path, "budget.steps=4", "checkpoint.every_epochs=1", "data.num_train=64")
    first = run(compose_config([*TINY, f"results_dir={tmp_path / 'runs'}", "budget.steps=4",
                                "data.num_train=64", "checkpoint.keep_final=true"]))
    rd = RunDir(first.run_dir)
    stale = rd.path / "..checkpoint.pt.new.0badc0de.tmp"
    stale.write_bytes(b"torn")
    rd.summary_path.unlink()  # as if killed before the end: the next launch resumes from the checkpoint
    assert run(cfg).status == "completed"
    assert not stale.exists()


def test_disk_full_error_names_the_path_and_says_resumable():
    from fisherbench.core.store import DiskFullError, is_disk_full

    exc = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(exc) and is_disk_full(OSError(errno.EDQUOT, "quota")) and not is_disk_full(OSError(1, "x"))
    assert "disk full while writing x/y" in str(DiskFullError(Path("x/y"), exc))
    assert "resumable" in str(DiskFullError(Path("x/y"), exc))


def test_a_wandb_directory_link_in_a_run_is_refused_and_the_run_goes_on_without_wandb(tmp_path, victim_dir, capsys):
    from omegaconf import OmegaConf

    from fisherbench.engine.loggers import WandbLogger

    rd = RunDir(tmp_path / "runs" / "0123456789abcdef")
    rd.create({"seed": 0}, {})
    (rd.path / "wandb").symlink_to(victim_dir)  # W&B would write its offline run through it
    logger = WandbLogger(OmegaConf.create({"name": "wandb", "mode": "offline", "project": "p", "entity": None,
                                           "group": None, "tags": [], "progress": "never"}))
    logger.start(rd.run_id, {"seed": 0}, rd.path, False)
    assert logger.run is None
    assert "symbolic link" in capsys.readouterr().err
    _untouched(victim_dir)

"""A sweep learns how a run process ended from the outcome file the process writes (and its exit code and the
store), never from the lines it prints: rewording a message cannot change what a sweep records."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import fisherbench.sweep.local as local
from fisherbench.core.outcome import OUTCOME_FILE_ENV, ProcessOutcome, parse_outcome, read_outcome, write_outcome
from fisherbench.core.status import RunOutcome, Status
from tests.sweep.test_faults import _env, _spec

# Lines the sweep used to parse, printed by a fake train process next to the outcome it reports in its file.
MISLEADING = "[fisherbench] skipped (already running_elsewhere) · nothing to see"
REWORDED = "[fisherbench] the configuration was refused: learning rate must be positive"


# How the fake process puts its outcome at `path`: as train.py does, through a link it planted, or padded with
# whitespace past the size an outcome file may have (still valid JSON).
WRITERS = {
    "plain": "open(path, 'w').write(text)",
    "link": "open(path + '.elsewhere', 'w').write(text); os.symlink(path + '.elsewhere', path)",
    "oversized": "open(path, 'w').write(text + ' ' * (1 << 17))",
}


def _fake_train(tmp_path: Path, printed: str, outcome: dict | None, code: int, writer: str = "plain") -> list[str]:
    script = tmp_path / "fake_train.py"
    script.write_text(f"""
import json, os, sys
print({printed!r}, flush=True)
outcome = {outcome!r}
if outcome is not None:
    path, text = os.environ[{OUTCOME_FILE_ENV!r}], json.dumps(outcome)
    {WRITERS[writer]}
sys.exit({code})
""")
    return [sys.executable, str(script)]


def _one_run(tmp_path, monkeypatch, printed, outcome, code, writer="plain"):
    from fisherbench.sweep.expand import expand
    from fisherbench.sweep.spec import load_spec

    runs = expand(load_spec(_spec(tmp_path, seeds="[0]", columns="{Adam: [optimizer=adam]}")), ("main",))
    monkeypatch.setattr(local, "train_command",
                        lambda *a, **k: _fake_train(tmp_path, printed, outcome, code, writer))
    runner = local.LocalRunner(tmp_path / "runs", [local.Worker("cpu0", (), 1)], "outcomes", out=open(os.devnull, "w"))
    (out,) = runner.run(runs)
    assert not (runner.log_dir / f"{runs[0].run_id}.outcome.json").exists()  # read once, then removed
    return out


@pytest.mark.parametrize("printed", [MISLEADING, REWORDED, ""])
def test_the_outcome_comes_from_the_file_whatever_the_process_prints(tmp_path, monkeypatch, printed):
    said = {"run_id": None, "status": "config_error", "exit_code": 2, "error": "lr must be positive"}
    out = _one_run(tmp_path, monkeypatch, printed, said, 2)
    assert out.status is RunOutcome.CONFIG_ERROR and out.error == "lr must be positive" and not out.ran


def test_a_corrupt_run_directory_is_reported_as_corrupt_from_the_file(tmp_path, monkeypatch):
    said = {"run_id": None, "status": "corrupt", "exit_code": 2, "error": "run directory x is corrupt (...)"}
    out = _one_run(tmp_path, monkeypatch, "[fisherbench] configuration error: something else", said, 2)
    assert out.status is Status.CORRUPT and "x is corrupt" in out.error


@pytest.mark.parametrize("said", [
    None,  # the process died before writing it
    {"run_id": None, "status": "config_error", "exit_code": 0, "error": "x"},  # not this exit: stale or foreign
    {"run_id": "someone-else", "status": "lock_lost", "exit_code": 1, "error": "x"},  # another run's file
    {"run_id": None, "status": "great", "exit_code": 1},  # not a status
    ["not", "an", "object"],
])
def test_a_missing_or_invalid_file_falls_back_on_the_exit_code(tmp_path, monkeypatch, said):
    out = _one_run(tmp_path, monkeypatch, MISLEADING, said, 1)
    assert out.status is RunOutcome.CRASHED and out.error == "train.py exited 1 without a summary"


@pytest.mark.parametrize("writer", ["link", "oversized"])
def test_a_linked_or_oversized_outcome_file_is_ignored_not_followed(tmp_path, monkeypatch, writer):
    """The outcome would say `lock_lost` if the sweep followed the link (or read past the size cap); it is
    ignored instead and the sweep decides from the exit code: `crashed`."""
    said = {"run_id": None, "status": "lock_lost", "exit_code": 1, "error": "the lock was replaced"}
    assert _one_run(tmp_path, monkeypatch, "", said, 1).status is RunOutcome.LOCK_LOST  # the same file, plain
    out = _one_run(tmp_path, monkeypatch, "", said, 1, writer)
    assert out.status is RunOutcome.CRASHED and out.error == "train.py exited 1 without a summary"


def test_read_outcome_never_follows_a_link_nor_opens_a_fifo(tmp_path):
    target = tmp_path / "elsewhere.json"
    write_outcome(ProcessOutcome("abc", RunOutcome.LOCK_LOST, 1, "x"), str(target))
    assert read_outcome(target) is not None
    (tmp_path / "link.json").symlink_to(target)
    assert read_outcome(tmp_path / "link.json") is None
    os.mkfifo(tmp_path / "fifo.json")  # a plain open() would block here until someone writes
    assert read_outcome(tmp_path / "fifo.json") is None
    assert read_outcome(tmp_path / "missing.json") is None


@pytest.mark.parametrize("obj", [
    {"run_id": 3, "status": "oom", "exit_code": 1}, {"run_id": None, "status": "oom", "exit_code": True},
    {"run_id": None, "status": "oom", "exit_code": 1, "skipped": "no"}, {"run_id": None, "status": 1, "exit_code": 1},
    {"run_id": None, "status": "oom", "exit_code": 1, "error": ["x"]}, "oom", None,
])
def test_outcome_files_are_validated(obj):
    assert parse_outcome(obj) is None


def test_outcome_files_round_trip_and_oversized_ones_are_ignored(tmp_path, monkeypatch):
    path = tmp_path / "o.json"
    said = ProcessOutcome("abc", RunOutcome.LOCK_LOST, 1, "lock lost: gone", skipped=False)
    write_outcome(said, str(path))
    assert read_outcome(path) == said and json.loads(path.read_text())["status"] == "lock_lost"
    path.write_text(json.dumps({**said.as_dict(), "error": "x" * 100_000}))
    assert read_outcome(path) is None
    monkeypatch.setenv("RANK", "1")  # only the main rank of a multi-process run writes
    write_outcome(ProcessOutcome("abc", Status.OOM, 1), str(tmp_path / "rank1.json"))
    assert not (tmp_path / "rank1.json").exists()


def test_train_writes_its_outcome_file_on_a_configuration_error(tmp_path):
    import subprocess

    path = tmp_path / "outcome.json"
    proc = subprocess.run([sys.executable, "-m", "fisherbench", "train", "optimizer.lr=-1", f"results_dir={tmp_path}"],
                          env=_env(**{OUTCOME_FILE_ENV: str(path)}), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    said = read_outcome(path)
    assert said is not None and said.status is RunOutcome.CONFIG_ERROR and said.exit_code == 2
    assert said.error and said.error in proc.stderr  # the same message the user sees

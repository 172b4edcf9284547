"""One vocabulary for how runs end: statuses, launcher outcomes, the sets built from them and the exit codes
live in fisherbench/core/status.py, and nowhere else."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from fisherbench.core.status import (
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    FINAL,
    OUTCOME_OF_EXIT,
    RECORDED,
    SETTLED,
    SUCCESS,
    RunOutcome,
    Status,
)
from fisherbench.core.store import CorruptRunError, RunDir

PACKAGE = Path(__file__).resolve().parents[2] / "fisherbench"
STATUS_MODULE = PACKAGE / "core" / "status.py"
# values that name nothing but a run's end (words such as "error" or "diverged" are also summary keys)
STATUS_WORDS = {s.value for s in (*Status, *RunOutcome)} - {"error", "diverged", "failed", "corrupt", "running"}
STATUS_WORDS |= {"configuration_error"}  # what train.py used to write for a config error


def _modules():
    return [p for p in PACKAGE.rglob("*.py") if p != STATUS_MODULE]


def test_run_end_literals_appear_only_in_the_status_module():
    found = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in STATUS_WORDS:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    assert not found, "use Status / RunOutcome from fisherbench.core.status:\n" + "\n".join(found)


def test_exit_codes_are_declared_only_in_the_status_module():
    declared = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            declared += [f"{path.relative_to(PACKAGE)}:{node.lineno} {t.id}" for t in targets
                         if isinstance(t, ast.Name) and t.id.startswith("EXIT_")]
    assert not declared


def test_sets_follow_from_the_statuses():
    assert SUCCESS == {s for s in Status if s.is_success} == {Status.COMPLETED, Status.BUDGET_EXHAUSTED}
    assert FINAL == SUCCESS | {Status.DIVERGED} and all(s.is_final for s in FINAL)
    assert SETTLED == FINAL | {RunOutcome.RUNNING_ELSEWHERE}
    assert Status.RUNNING not in RECORDED and Status.UNFINISHED not in RECORDED
    assert EXIT_INTERRUPTED == EXIT_PREEMPTED
    for code, outcome in OUTCOME_OF_EXIT.items():  # a status a code stands for exits with that code
        assert not isinstance(outcome, Status) or outcome.exit_code == code


def test_outcomes_are_plain_strings_on_the_wire():
    assert json.dumps({"status": RunOutcome.CONFIG_ERROR}) == '{"status": "config_error"}'
    assert str(Status.BUDGET_EXHAUSTED) == "budget_exhausted" and f"{RunOutcome.NOT_STARTED:<12}|" == "not_started |"
    assert RunOutcome.parse("running_elsewhere") is RunOutcome.RUNNING_ELSEWHERE
    assert RunOutcome.parse("oom") is Status.OOM
    with pytest.raises(ValueError, match="unknown run status"):
        RunOutcome.parse("great")


@pytest.mark.parametrize("state", ["running", "unfinished", "corrupt"])
def test_a_summary_naming_a_state_that_is_never_written_is_corrupt(tmp_path, state):
    rd = RunDir(tmp_path / "r")
    rd.path.mkdir()
    rd.summary_path.write_text(json.dumps({"run_id": "r", "status": state}))
    with pytest.raises(CorruptRunError, match="never written to a summary"):
        rd.summary()
    assert rd.status() is Status.CORRUPT

"""summary.json is one typed record: the run layer builds `RunSummary`, the store validates against it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fisherbench.core.store import CorruptRunError, validate_summary
from fisherbench.core.summary import SUMMARY_FIELDS, RunSummary

FIELDS = [f.name for f in dataclasses.fields(RunSummary)]


def test_a_run_writes_exactly_the_record_fields(run_train):
    result = run_train("budget=steps", "budget.steps=2")
    optional = {f.name for f in dataclasses.fields(RunSummary) if f.metadata["optional"]}
    assert set(result.summary) == set(FIELDS) - optional
    validate_summary(Path("summary.json"), result.summary)


@pytest.mark.parametrize("name", [n for n in FIELDS if n not in ("run_id", "status")])
def test_every_field_is_type_checked_when_read(name):
    bad = "not a mapping" if dict in SUMMARY_FIELDS[name] else {"not": "this type"}
    with pytest.raises(CorruptRunError, match=f"'{name}' is a"):
        validate_summary(Path("summary.json"), {"run_id": "r", "status": "completed", name: bad})


def test_optional_fields_are_left_out_when_empty():
    record = RunSummary(run_id="r", status="completed")
    assert "reference_budget" not in record.as_dict() and "world_size" not in record.as_dict()
    assert RunSummary(run_id="r", status="completed", world_size=2).as_dict()["world_size"] == 2

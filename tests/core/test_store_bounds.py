"""Store readers are bounded (issue 19, item 6) and numbers read back from a store are finite and in range
(item 7): one small planted file neither hangs nor crashes `results ls`, the report or a run's resume path,
and a run whose files break a bound is reported as corrupt.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from fisherbench.core import checkpoint as ckpt
from fisherbench.core.errors import UserError
from fisherbench.core.status import Status
from fisherbench.core.store import (
    MAX_BYTES,
    CorruptRunError,
    RunDir,
    check_number,
    finite_number,
    read_json,
    read_yaml_mapping,
)
from fisherbench.engine.compose import compose_config
from fisherbench.engine.identity import run_id_of
from fisherbench.engine.lifecycle import run

# the 377-byte file: nine levels of nine aliases each, 9**9 (387 million) strings once expanded
ALIAS_BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{c}: &{c} [{','.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]) + "\n"
DEEP_YAML = "model: " + "[" * 20000 + "]" * 20000 + "\n"
DEEP_JSON = '{"run_id": "x", "status": "completed", "choices": {"a": ' + "[" * 100000 + "]" * 100000 + "}}"
TINY = ["model=small_cnn", "model.width=4", "model.hidden=16", "data=synthetic_image", "data.shape=[3,8,8]",
        "data.num_train=32", "data.num_test=16", "data.batch_size=16", "logger=none", "optimizer=adam",
        "budget=steps", "budget.steps=2"]


def _cfg(tmp_path, *overrides):
    return compose_config([*TINY, f"results_dir={tmp_path / 'runs'}", *overrides])


def _run_dir(tmp_path, name="0123456789abcdef"):
    rd = RunDir(tmp_path / "runs" / name)
    rd.create({"seed": 0, "model": {"name": "small_cnn"}}, {"argv": []})
    rd.write_summary({"run_id": rd.run_id, "status": "completed", "ledger": {"train_s": 1.0}})
    return rd


# ------------------------------------------------------------------------------------------- YAML
def test_the_alias_bomb_is_corrupt_at_once(tmp_path):
    assert len(ALIAS_BOMB) < 400
    rd = _run_dir(tmp_path)
    rd.config_path.write_text(ALIAS_BOMB)
    t0 = time.perf_counter()
    with pytest.raises(CorruptRunError, match="anchors and aliases are not allowed"):
        rd.config()
    assert rd.problem().startswith(f"{rd.config_path}: not valid YAML")
    assert time.perf_counter() - t0 < 30  # generous: it used to take minutes and gigabytes


@pytest.mark.parametrize("text", [DEEP_YAML, "a:\n" + "".join(f"{' ' * (i + 1)}b{i}:\n" for i in range(200))],
                         ids=["flow", "block"])
def test_deeply_nested_config_is_corrupt_not_a_recursion_error(tmp_path, text):
    rd = _run_dir(tmp_path)
    rd.config_path.write_text(text)
    with pytest.raises(CorruptRunError, match="nested deeper than"):
        rd.config()


def test_store_yaml_still_reads_what_the_suite_writes(tmp_path):
    shared = [1, 2]
    rd = RunDir(tmp_path / "r")
    rd.create({"a": shared, "b": shared, "nested": {"x": {"y": [{"z": 1.5}]}}}, {})  # shared: no anchor written
    assert "&" not in rd.config_path.read_text()
    assert rd.config() == {"a": [1, 2], "b": [1, 2], "nested": {"x": {"y": [{"z": 1.5}]}}}


# ------------------------------------------------------------------------------------------- JSON
def test_deeply_nested_summary_is_corrupt(tmp_path):
    rd = _run_dir(tmp_path)
    rd.summary_path.write_text(DEEP_JSON)
    assert rd.status() is Status.CORRUPT
    assert "nested deeper than" in rd.problem()
    rd.summary_path.write_text(json.dumps({"run_id": "x", "status": "completed", "choices": {"a": [[[[[[[[[[[[
        [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}))  # parses, too deep
    assert "nested deeper than" in rd.problem()


@pytest.mark.parametrize("name,limit", [("config.yaml", MAX_BYTES["config.yaml"]),
                                        ("summary.json", MAX_BYTES["summary.json"])])
def test_oversized_store_files_are_corrupt_without_being_read(tmp_path, name, limit):
    rd = _run_dir(tmp_path)
    path = rd.path / name
    with open(path, "ab") as f:
        f.write(b" " * (limit + 1))
    assert f"is {path.stat().st_size} bytes, more than the {limit}" in rd.problem()


def test_a_fifo_or_a_link_as_a_store_file_is_corrupt_without_blocking(tmp_path):
    rd = _run_dir(tmp_path)
    rd.summary_path.unlink()
    os.mkfifo(rd.summary_path)  # opening it for reading would wait for a writer
    assert "not a regular file" in rd.problem()
    rd.summary_path.unlink()
    rd.summary_path.symlink_to("/etc/passwd")
    assert "symbolic link" in rd.problem()
    assert read_json(rd.summary_path) is None


# ------------------------------------------------------------------------------- numbers in a store
@pytest.mark.parametrize("ledger,why", [
    ('{"train_s": NaN}', "NaN"), ('{"train_s": Infinity}', "Infinity"), ('{"train_s": "nan"}', "ledger.train_s"),
    ('{"train_s": -3.0}', "ledger.train_s"), ('{"train_s": true}', "ledger.train_s"),
])
def test_a_ledger_that_is_not_finite_and_non_negative_is_corrupt(tmp_path, ledger, why):
    rd = _run_dir(tmp_path)
    rd.summary_path.write_text('{"run_id": "x", "status": "completed", "ledger": ' + ledger + "}")
    assert rd.status() is Status.CORRUPT and why in rd.problem()


@pytest.mark.parametrize("field,value,why", [
    ("steps", -1, "'steps' is -1"), ("epochs_done", "inf", "'epochs_done' is a str"),
    ("peak_memory_bytes", -5, "'peak_memory_bytes' is -5"), ("steps_per_epoch", 2.5, "'steps_per_epoch' is a float"),
    ("budget", {"seconds": 1e999}, "Infinity"), ("reference_budget", {"steps": [1, -1e999]}, "-Infinity"),
])
def test_summary_numbers_out_of_range_are_corrupt(tmp_path, field, value, why):
    rd = _run_dir(tmp_path)
    summary = json.loads(rd.summary_path.read_text()) | {field: value}
    rd.summary_path.write_text(json.dumps(summary))  # 1e999 is written as the literal Infinity
    assert rd.status() is Status.CORRUPT and why in rd.problem()


def test_the_generic_number_checks():
    assert finite_number(1) and finite_number(0.5, 0, 1) and not finite_number(float("nan"))
    assert not finite_number(True) and not finite_number("1") and not finite_number(0, 0, lo_open=True)
    assert not finite_number(1.5, integer=True) and not finite_number(2, hi=1)
    with pytest.raises(CorruptRunError, match=r"'step_s' is inf, expected a finite number in \(0, inf\]"):
        check_number("cache.json", "step_s", float("inf"), 0, lo_open=True)
    assert check_number("c", "x", None, 0, optional=True) is None


def test_a_checkpoint_ledger_with_nan_time_is_corrupt_and_falls_back(tmp_path):
    path = tmp_path / "checkpoint.pt"
    good = {"run_id": "r", "model": {}, "optimizer": {}, "state": {}, "ledger": {"train_s": 1.0}, "rng": {}}
    ckpt.save(path, good)
    ckpt.save(path, {**good, "ledger": {"train_s": float("nan")}})  # the latest says its budget is NaN
    payload, notes = ckpt.load_latest(path, "r")
    assert payload["ledger"]["train_s"] == 1.0  # the previous one
    assert any("ledger" in n for n in notes)
    torch.save({**good, "ledger": {"train_s": -1.0}, "format_version": ckpt.FORMAT_VERSION}, path)
    assert ckpt.read_checkpoint(path)[0] is None


# ------------------------------------------------------------------ every reader: ls, report, train.py
@pytest.fixture
def hostile_store(tmp_path):
    from tests.results.test_report_golden import fabricate
    from tests.results.test_report_verdicts import config

    root = tmp_path / "runs"
    cfg = config()
    good = [fabricate(root, cfg, s, "completed", [0.90 + 0.01 * s]) for s in range(2)]
    bomb = fabricate(root, cfg, 2, "completed", [0.5])
    bomb.config_path.write_text(ALIAS_BOMB)
    deep = fabricate(root, cfg, 3, "completed", [0.5])
    deep.config_path.write_text(DEEP_YAML)
    deep_summary = fabricate(root, cfg, 4, "completed", [0.5])
    deep_summary.summary_path.write_text(DEEP_JSON)
    return root, good, [bomb, deep, deep_summary]


def test_results_ls_lists_hostile_runs_as_corrupt_quickly(hostile_store):
    root, good, bad = hostile_store
    p = subprocess.run([sys.executable, "-m", "fisherbench", "results", "ls", "--store", str(root)],
                       capture_output=True, text=True, timeout=120)  # it ran past 90 s and 5 GB before
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "RecursionError" not in p.stderr
    assert "2 completed, 3 corrupt" in p.stdout
    for rd in bad:
        assert str(rd.path) in p.stdout


def test_the_report_lists_hostile_runs_as_corrupt(hostile_store, tmp_path):
    from tests.results.test_report_golden import report_script

    root, _, bad = hostile_store
    rc = report_script().main(["--store", str(root), "--group-by", "optimizer.name", "--out", str(tmp_path / "o"),
                               "--no-figures"])
    assert rc == 0
    md = (tmp_path / "o" / "tables" / "store.md").read_text()
    for rd in bad:
        assert f"`{rd.path}`" in md


@pytest.mark.parametrize("text", [ALIAS_BOMB, DEEP_YAML], ids=["alias_bomb", "deep"])
def test_train_resume_path_stops_on_a_hostile_config_with_a_message(tmp_path, text):
    cfg = _cfg(tmp_path)
    rd = RunDir(tmp_path / "runs" / run_id_of(cfg))
    rd.path.mkdir(parents=True)
    rd.config_path.write_text(text)
    with pytest.raises(UserError, match="is corrupt .*config.yaml"):
        run(cfg)


def test_train_exits_2_on_a_deep_summary_without_traceback(tmp_path):
    cfg = _cfg(tmp_path)
    rd = RunDir(tmp_path / "runs" / run_id_of(cfg))
    rd.create({"seed": 0}, {})
    rd.summary_path.write_text(DEEP_JSON)
    p = subprocess.run([sys.executable, "-m", "fisherbench", "train", *TINY, f"results_dir={tmp_path / 'runs'}"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "is corrupt" in p.stderr and "nested deeper than" in p.stderr and "Traceback" not in p.stderr


def test_read_yaml_mapping_is_the_store_reader_for_any_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("a: 1\n")
    assert read_yaml_mapping(path) == {"a": 1}
    assert read_yaml_mapping(tmp_path / "missing.yaml") is None


def test_the_fisher_analysis_reads_a_run_config_through_the_bounded_reader(tmp_path):
    from fisherbench.analysis import sources

    rd = _run_dir(tmp_path)
    rd.config_path.write_text(ALIAS_BOMB)
    with pytest.raises(ValueError, match="is corrupt: .*anchors and aliases"):
        sources.load_run(rd.path)

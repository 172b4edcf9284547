"""Corrupt run directories never stop a report or the browser: each is listed by path with its problem, and the
report carries on with the rest (a run of a cell whose summary is corrupt counts as a seed that did not finish)."""
from __future__ import annotations

import json

import pytest

from tests.results.test_report_golden import fabricate
from tests.results.test_report_verdicts import config, one_cell_spec


@pytest.fixture()
def store(tmp_path):
    """Three good runs of one cell (seeds 0-2) and one run of each kind of damage."""
    root = tmp_path / "runs"
    cfg = config()
    good = [fabricate(root, cfg, s, "completed", [0.90 + 0.01 * s]) for s in range(3)]
    bad = {}
    bad["list_summary"] = fabricate(root, cfg, 3, "completed", [0.5])
    bad["list_summary"].summary_path.write_text("[1, 2]\n")  # valid JSON, not an object
    bad["no_status"] = fabricate(root, cfg, 4, "completed", [0.5])
    bad["no_status"].summary_path.write_text(json.dumps({"run_id": bad["no_status"].run_id}))
    bad["bad_status"] = fabricate(root, config(optimizer__name="sgd"), 0, "completed", [0.5])
    s = json.loads(bad["bad_status"].summary_path.read_text())
    bad["bad_status"].summary_path.write_text(json.dumps({**s, "status": "banana"}))
    bad["yaml"] = fabricate(root, config(optimizer__name="sgd"), 1, "completed", [0.5])
    bad["yaml"].config_path.write_text("model: {name: [unclosed\n")  # malformed YAML
    bad["yaml_list"] = fabricate(root, config(optimizer__name="sgd"), 2, "completed", [0.5])
    bad["yaml_list"].config_path.write_text("- 1\n- 2\n")  # YAML, not a mapping
    bad["meta"] = fabricate(root, config(optimizer__name="sgd"), 3, "completed", [0.5])
    bad["meta"].meta_path.write_text("{not json")
    bad["metrics"] = fabricate(root, config(optimizer__name="sgd"), 4, "completed", [0.5])
    bad["metrics"].metrics_path.unlink()
    bad["metrics"].metrics_path.mkdir()  # unreadable metrics.jsonl (found only when its rows are read)
    return root, cfg, good, bad


def test_index_lists_every_corrupt_run_with_its_problem(store):
    from fisherbench.results.runs import StoreIndex

    root, _, good, bad = store
    index = StoreIndex(root)
    problems = {c.path.name: c.problem for c in index.corrupt_runs()}
    assert problems[bad["list_summary"].run_id] == "summary.json: holds a JSON list, not an object"
    assert problems[bad["no_status"].run_id] == "summary.json: has no 'status'"
    assert problems[bad["bad_status"].run_id].startswith("summary.json: unknown run status 'banana'")
    assert problems[bad["yaml"].run_id].startswith("config.yaml: not valid YAML")
    assert problems[bad["yaml_list"].run_id] == "config.yaml: holds a YAML list, not a mapping"
    assert problems[bad["meta"].run_id].startswith("meta.json: not valid JSON")
    assert bad["metrics"].run_id not in problems  # not read yet
    completed = {r.run_id for r in index.runs if r.status == "completed"}
    assert completed == {g.run_id for g in good} | {bad["metrics"].run_id}
    # the unreadable metrics file marks its run corrupt when read, without raising
    run = index.find(bad["metrics"].run_id)
    assert run.rows() == [] and run.status == "corrupt" and run.problem.startswith("metrics.jsonl: unreadable")
    assert bad["metrics"].run_id in {c.path.name for c in index.corrupt_runs()}


def test_spec_report_carries_on_and_counts_corrupt_seeds(store):
    """A corrupt summary of an expected seed: that seed did not finish (incomplete), the rest is reported."""
    from fisherbench.results import tables as render
    from fisherbench.results.report import StoreIndex, collect

    root, cfg, _, _ = store
    (t,) = collect(one_cell_spec(cfg, range(5)), StoreIndex(root))
    c = t.cell("net", "Adam")
    assert (c.n, c.incomplete, c.corrupt) == (3, 2, 2) and c.verdict == "incomplete 3/5"
    assert render.note_text(c) == "2 unfinished/failed (2 corrupt)"
    assert c.mean == pytest.approx(91.0)


def test_report_script_lists_corrupt_runs_by_path(store, tmp_path, capsys):
    from tests.results.test_report_golden import report_script

    root, _, _, bad = store
    rc = report_script().main(["--store", str(root), "--group-by", "optimizer.name", "--out", str(tmp_path / "o"),
                               "--no-figures"])
    assert rc == 0
    captured = capsys.readouterr()
    md = (tmp_path / "o" / "tables" / "store.md").read_text()
    assert "## Corrupt runs in the store (7: left out, listed by path)" in md
    for rd in bad.values():
        assert f"`{rd.path}`" in md
        assert str(rd.path) in captured.err
    assert f"- `{bad['list_summary'].path}`: summary.json: holds a JSON list, not an object" in md
    # the report went on: the three good seeds are the adam cell; every sgd seed is corrupt or not run
    assert "| small_cnn · synthetic_image | 91.00 ± 1.00 (3/5 seeds) | incomplete 0/5 |" in md
    assert "| small_cnn · synthetic_image | sgd |  | 0/5 | 3 unfinished/failed (3 corrupt), 2 not run |" in md


def test_ls_and_show_list_corrupt_runs(store, capsys):
    from fisherbench.results.browse import main

    root, _, good, bad = store
    assert main(["ls", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line[:16] in {r.run_id for r in
                                                                                 [*good, *bad.values()]}}
    assert len(lines) == 10
    assert lines[bad["yaml"].run_id].split()[5] == "corrupt"  # unreadable config: '?' fields, status corrupt
    assert lines[bad["list_summary"].run_id].split()[5] == "corrupt"
    assert "corrupt runs (left out of reports):" in out
    assert f"{bad['list_summary'].path}: summary.json: holds a JSON list, not an object" in out
    # ls reads configs and summaries (not metrics): the run with an unreadable metrics.jsonl is not counted yet
    assert f"10 runs in {root}: 4 completed, 6 corrupt" in out
    assert main(["show", bad["yaml"].run_id, "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert "status: corrupt" in out and "not valid YAML" in out
    assert main(["show", bad["list_summary"].run_id[:10], "--store", str(root)]) == 0
    assert "holds a JSON list, not an object" in capsys.readouterr().out

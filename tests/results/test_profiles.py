"""Time-to-target per cell and performance profiles against hand-computed values and a numerical integral;
reports without a spec (`--group-by`): grouping, experiment splits, filters, seeds, and the command line."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from fisherbench.core.store import RunDir, run_id

CFG = {"model": {"name": "a", "width": 4}, "data": {"name": "synthetic_image", "batch_size": 8},
       "optimizer": {"name": "adam", "lr": 0.001}, "budget": {"mode": "steps", "steps": 10}}


def make_run(root, model: str, optimizer: str, seed: int, reach_at, status="completed", lr=None, n_evals=10):
    """A run whose test/acc1 first reaches 0.8 at train_s = `reach_at` (None: never), one evaluation per second."""
    cfg = copy.deepcopy(CFG)
    cfg["model"]["name"], cfg["optimizer"]["name"], cfg["seed"] = model, optimizer, seed
    if lr is not None:
        cfg["optimizer"]["lr"] = lr
    rd = RunDir(root / run_id({k: v for k, v in cfg.items()}))
    rd.create(cfg, {})
    rows = []
    for i in range(n_evals):
        t = float(i + 1)
        acc = 0.85 if reach_at is not None and t >= reach_at else 0.5 + 0.01 * i
        row = {"eval": i, "epoch": t / 10, "step": i + 1, "train_s": t, "test/acc1": acc, "train/loss": 1 / t}
        rd.append_metrics(row)
        rows.append(row)
    rd.write_summary({"run_id": rd.run_id, "status": status, "seed": seed, "select_metric": "test/acc1",
                      "best": max(rows, key=lambda r: r["test/acc1"]), "final": rows[-1], "epochs_done": 1.0,
                      "budget": {"mode": "steps", "steps": 10}, "ledger": {"train_s": rows[-1]["train_s"]},
                      "finished_at": f"2025-01-01T00:00:0{seed}"})
    return rd


# time to 0.8 per (problem, optimizer): seeds' times (None = never reached)
TIMES = {("a", "adam"): (2, 4), ("a", "sgd"): (6, 6), ("a", "lion"): (None, None),
         ("b", "adam"): (10, None), ("b", "sgd"): (5, 7), ("b", "lion"): (3, 3)}


@pytest.fixture()
def store(tmp_path):
    root = tmp_path / "runs"
    for (model, opt), times in TIMES.items():
        for seed, t in enumerate(times):
            make_run(root, model, opt, seed, t)
    return root


def _tables(root, **req):
    from fisherbench.results.adhoc import AdhocRequest, build
    from fisherbench.results.runs import StoreIndex

    return build(StoreIndex(root), AdhocRequest(**{"rows": ["model.name"], **req}))


def test_time_to_target_and_profile_against_hand_computation(store):
    from fisherbench.core.scores import parse_target
    from fisherbench.results.profiles import profile

    (t,) = _tables(store)
    assert t.rows == ["a", "b"] and t.columns == ["adam", "lion", "sgd"]
    p = profile(t, parse_target("test/acc1>=0.8"))
    med = {k: p.times[k].median for k in p.times}
    assert med[("a", "adam")] == 3.0 and med[("a", "sgd")] == 6.0 and med[("a", "lion")] == math.inf
    assert med[("b", "adam")] == math.inf  # one of two seeds never reached it: the median seed did not
    assert med[("b", "sgd")] == 6.0 and med[("b", "lion")] == 3.0
    # each time carries its resolution: the spacing of the evaluations (1 s here)
    assert p.times[("b", "adam")].text() == "not reached (1/2 reached; evals every 1.0 s)"
    assert p.times[("a", "adam")].text() == "3.0 s [2.0–4.0] (2/2 reached; evals every 1.0 s)"
    assert p.ties() == []  # the fastest leads by ≥ one evaluation interval on both problems
    # ratios to the fastest per problem: a: adam 1, sgd 2, lion ∞; b: adam ∞, sgd 2, lion 1
    assert [p.ratio("a", s) for s in ("adam", "sgd", "lion")] == [1.0, 2.0, math.inf]
    assert [p.ratio("b", s) for s in ("adam", "sgd", "lion")] == [math.inf, 2.0, 1.0]
    assert (p.rho("adam", 1), p.rho("sgd", 1.99), p.rho("sgd", 2), p.rho("lion", 100)) == (0.5, 0.0, 1.0, 0.5)
    # the score is the normalised area under ρ on [1, 4]: exact for the step function vs a fine numerical integral
    taus = np.linspace(1, 4, 30001)
    for s, exact in (("adam", 0.5), ("sgd", 2 / 3), ("lion", 0.5)):
        numeric = np.trapezoid([p.rho(s, x) for x in taus], taus) / 3
        assert p.score(s) == pytest.approx(exact) and p.score(s) == pytest.approx(numeric, abs=1e-4)
    assert p.unsolved() == []


def test_missing_seeds_count_as_not_reached(store, tmp_path):
    from fisherbench.core.scores import parse_target
    from fisherbench.results.profiles import profile

    make_run(store, "a", "adam", 2, 1)  # a third seed for one cell: every other cell now expects three seeds
    (t,) = _tables(store)
    p = profile(t, parse_target("test/acc1>=0.8"))
    assert p.times[("a", "adam")].times == [2.0, 4.0, 1.0] and p.times[("a", "adam")].median == 2.0
    assert p.times[("a", "sgd")].times == [6.0, 6.0, math.inf] and p.times[("a", "sgd")].median == 6.0
    assert t.cell("a", "sgd").verdict == "incomplete 2/3"


def test_figures_over_time_and_profile(store, tmp_path):
    from fisherbench.core.scores import parse_target
    from fisherbench.results import figures
    from fisherbench.results.profiles import profile

    (t,) = _tables(store)
    target = parse_target("test/acc1>=0.8")
    paths = figures.over_time(t, "test/acc1", tmp_path, target) + figures.profile(profile(t, target), tmp_path)
    assert sorted(q.name for q in paths) == ["over_time.pdf", "over_time.png", "profile.pdf", "profile.png"]
    assert all(q.stat().st_size > 1000 for q in paths)


def test_band_by_evaluation_index():
    from fisherbench.results.figures import band_by_eval

    a = (np.array([1.0, 2.0, 3.0]), np.array([0.2, 0.4, 0.6]))
    b = (np.array([1.2, 2.4, 3.6]), np.array([0.4, 0.4, 0.8]))
    x, m, sd = band_by_eval([a, b])
    np.testing.assert_allclose(x, [1.1, 2.2, 3.3])
    np.testing.assert_allclose(m, [0.3, 0.4, 0.7])
    np.testing.assert_allclose(sd, [0.1 * math.sqrt(2), 0.0, 0.1 * math.sqrt(2)])  # sample std (ddof=1)


# ------------------------------------------------------------------------------------ reports without a spec
def test_adhoc_groups_filters_and_splits_experiments(store):
    from fisherbench.results import tables as render
    from fisherbench.results.runs import parse_where

    # two learning rates of sgd on problem a are two experiments: never averaged together
    make_run(store, "a", "sgd", 0, 9, lr=0.1)
    make_run(store, "a", "sgd", 1, 9, lr=0.1)
    (t,) = _tables(store, columns=["sgd", "adam"], metrics=["final_test_acc1"])
    assert t.columns == ["sgd (optimizer.lr=0.001)", "sgd (optimizer.lr=0.1)", "adam"]
    assert t.cell("b", "sgd (optimizer.lr=0.001)").n == 2 and t.cell("b", "sgd (optimizer.lr=0.1)") is None
    assert t.cell("a", "sgd (optimizer.lr=0.1)").values == [85.0, 85.0]
    md = render.markdown([t])
    assert "| paper |" not in md and "verdict" not in md and "Verdict" not in md  # no paper: no comparison
    assert "| row | column | ours | seeds | runs |" in md
    # filters: by row value, by config key
    (t,) = _tables(store, row_values={"model.name": ["b"]}, where=[parse_where("optimizer.name!=lion")])
    assert t.rows == ["b"] and t.columns == ["adam", "sgd"]
    # rows by a key that is not a name are labelled key=value; cells are listed row by row
    (t,) = _tables(store, rows=["model.width", "model.name"])
    assert t.rows == ["model.width=4 · a", "model.width=4 · b"]
    assert [(c.row[-1], c.column) for c in t.cells][:3] == [("a", "adam"), ("a", "lion"),
                                                             ("a", "sgd (optimizer.lr=0.001)")]
    # the best column of each row is bold (complete cells only) where a test supports it
    (t,) = _tables(store, columns=["adam", "lion"])
    # a: 85.00 ± 0.00 vs 59.00 ± 0.00 (separated); b: lion 85.00 ± 0.00 vs adam 72.00 ± 18.38 (n=2: Welch p 0.5)
    assert t.best_cells() == {("a", "adam")}


def test_adhoc_group_by_a_config_group(store):
    """`--group-by optimizer`: the option chosen (meta.json `choices`); runs that did not record it give the
    group's `name`."""
    import json

    (t,) = _tables(store, group_by="optimizer")
    assert t.columns == ["adam", "lion", "sgd"]
    paper = make_run(store, "a", "adafisher", 0, 3)
    meta = json.loads(paper.meta_path.read_text())
    paper.meta_path.write_text(json.dumps({**meta, "choices": {"optimizer": "adafisher_paper"}}))
    (t,) = _tables(store, group_by="optimizer")
    assert t.columns == ["adafisher_paper", "adam", "lion", "sgd"]


def test_adhoc_errors_are_user_errors(store):
    from fisherbench.core.errors import UserError
    from fisherbench.results.runs import parse_where

    with pytest.raises(UserError, match="no runs in .* match the selection .*optimizer.name = adam, lion, sgd"):
        _tables(store, where=[parse_where("optimizer.name=muon")])
    with pytest.raises(UserError, match="write KEY=VALUE"):
        parse_where("optimizer.name")


def test_report_script_group_by_with_target(store, tmp_path, capsys):
    from tests.results.test_report_golden import report_script

    out = tmp_path / "out"
    argv = ["--store", str(store), "--group-by", "optimizer.name", "--rows", "model.name", "--metric",
            "best_acc1,final_test_acc1", "--target", "test/acc1>=0.8", "--out", str(out), "--name", "ttt"]
    assert report_script().main(argv) == 0
    captured = capsys.readouterr()
    console = captured.out
    assert "time to test/acc1>=0.8  adam" in console
    assert "adam       0.50    0.50    0.50    0.500" in console.splitlines()
    assert "sgd        0.00    1.00    1.00    0.667" in console.splitlines()
    md = (out / "tables" / "ttt.md").read_text()
    # the title (and so every figure's title) names what is compared, never the store's path
    assert md.splitlines()[0] == "# synthetic_image: runs by optimizer.name" and str(store) not in md.splitlines()[0]
    assert "## best test top-1 (%)" in md and "## final test top-1 (%)" in md
    assert "## Time to test/acc1>=0.8" in md and "### Performance profile" in md
    assert ("| a | 3.0 s [2.0–4.0] (2/2 reached; evals every 1.0 s) | not reached (0/2 reached; evals every 1.0 s) "
            "| 6.0 s [6.0–6.0] (2/2 reached; evals every 1.0 s) |") in md
    # a target on a test metric: the report and the console warn (targets belong on validation metrics)
    assert "**Warning: the target test/acc1>=0.8 is on a test metric." in md
    assert "val/acc1>=0.8" in md and "Warning: the target test/acc1>=0.8" in captured.err
    assert "| lion | 0.50 | 0.50 | 0.50 | 0.500 |" in md
    for name in ("over_time.png", "profile.png", "cost.png"):
        assert (out / "figures" / "ttt" / name).stat().st_size > 1000


@pytest.mark.parametrize("argv,message", [
    (["--target", "test/acc1=0.8"], "is not KEY>=VALUE"),
    (["--metric", "best_acc9"], "unknown metric 'best_acc9'"),
    (["--where", "optimizer.name=muon"], "no runs in"),
    (["quick"], "give a spec (quick) or --group-by, not both"),
    (["--tau-max", "1"], "--tau-max must be > 1"),
    # a typo in the target's metric used to print "not reached (0/1)" for every optimizer with rc 0
    (["--target", "test/acc>=0.9"], "no run of this report logs 'test/acc'; logged metrics: test/acc1, "
                                    "train/loss (e.g. --target 'test/acc1>=0.9')"),
])
def test_report_script_user_errors_exit_2(store, tmp_path, capsys, argv, message):
    from tests.results.test_report_golden import report_script

    base = ["--store", str(store), "--group-by", "optimizer.name", "--out", str(tmp_path), "--no-figures"]
    assert report_script().main(base + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_ties_within_one_evaluation_are_reported(tmp_path):
    """Two optimizers whose median times differ by less than the evaluation spacing: the profile's ρ(1) between
    them is decided by a tie within one evaluation, and the report says so."""
    from fisherbench.core.scores import parse_target
    from fisherbench.results.profiles import markdown, profile

    root = tmp_path / "runs"
    for opt, times in (("adam", (3, 3)), ("sgd", (3, 4)), ("lion", (8, 9))):
        for seed, t in enumerate(times):
            make_run(root, "c", opt, seed, t)
    (t,) = _tables(root)
    p = profile(t, parse_target("test/acc1>=0.8"))
    assert p.times[("c", "sgd")].median == 3.5 and p.times[("c", "sgd")].spacing == 1.0
    assert p.ties() == ["c: adam (3.0 s) and sgd (3.5 s) are within one evaluation interval (1.0 s), so which is "
                        "fastest is not resolved by the evaluations"]
    assert "Tie within one evaluation: c: adam (3.0 s) and sgd (3.5 s)" in markdown(p)


def test_report_script_without_a_store_exits_2(tmp_path, capsys):
    from tests.results.test_report_golden import report_script

    assert report_script().main(["--store", str(tmp_path / "nope"), "--group-by", "optimizer.name"]) == 2
    assert "no results store at" in capsys.readouterr().err
    assert report_script().main(["--store", str(tmp_path)]) == 2
    assert "give a sweep spec" in capsys.readouterr().err

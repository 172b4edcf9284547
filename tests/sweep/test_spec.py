"""Sweep specs without Hydra: loading, override merging, families, cells, WCT budgets, paper values."""
from __future__ import annotations

import pytest

from fisherbench.sweep.spec import (
    SpecError,
    available_specs,
    load_spec,
    merge_overrides,
    override_key,
    parse_paper_value,
)

TINY_SPEC = """
title: t
seeds: [0, 1]
overrides: [model=small_cnn, optimizer.lr=0.5]
families:
  cnn: {overrides: [optimizer.weight_decay=1.0e-4]}
  mobile: {base: cnn, overrides: [optimizer.weight_decay=1.0e-6]}
  vit: {}
rows:
  r1: {family: cnn, overrides: [model.width=4]}
  r2: {family: mobile, overrides: [optimizer.lr=0.01]}
  r3: {family: vit}
arms:
  main:
    A: {cnn: [optimizer=adafisher], vit: [optimizer=adamw, optimizer.weight_decay=0.05]}
    B: [optimizer=sgd, optimizer.weight_decay=0.0]
    C: {vit: [optimizer=kfac]}
  fixed:
    F: {cnn: [optimizer=adafisher, optimizer.variant=constf], vit: [optimizer=adamw]}
cells:
  r1: {B: [optimizer.momentum=0.5]}
  r3: {B: null}
wct:
  reference: {cnn: adafisher, vit: adamw}
  epochs: 200
  paper_epochs: {A: 200, B: 50}
paper:
  r1: {A: "94.85±0.10", B: "—"}
  r3: {A: 12.5}
"""


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY_SPEC)
    return load_spec(p)


def test_merge_overrides_by_key_later_wins_in_place():
    assert override_key("+optimizer.lr=1") == "optimizer.lr" and override_key("~x") == "x"
    merged = merge_overrides(["model=a", "optimizer.lr=1"], ["optimizer.lr=2", "seed=3"], ["model=b"])
    assert merged == ["model=b", "optimizer.lr=2", "seed=3"]


def test_paper_values():
    v = parse_paper_value("94.85±0.10")
    assert (v.mean, v.std) == (94.85, 0.10)
    assert parse_paper_value("35.1 +/- 0.78").std == 0.78
    assert parse_paper_value(175.06).mean == 175.06 and parse_paper_value(175.06).std is None
    assert parse_paper_value("—").no_result and parse_paper_value(None).no_result
    with pytest.raises(SpecError):
        parse_paper_value("about 94")


def test_cells_follow_families_and_precedence(tiny):
    cells = {(c.row, c.column): c for c in tiny.cells(("main", "fixed"))}
    # C exists only for the vit family; r3 x B is excluded by `cells: {r3: {B: null}}`
    assert sorted(cells) == [("r1", "A"), ("r1", "B"), ("r1", "F"), ("r2", "A"), ("r2", "B"), ("r2", "F"),
                             ("r3", "A"), ("r3", "C"), ("r3", "F")]
    # family (base first) < column < row < cell
    assert list(cells[("r1", "A")].overrides) == ["model=small_cnn", "optimizer.lr=0.5",
                                                  "optimizer.weight_decay=1.0e-4", "optimizer=adafisher",
                                                  "model.width=4"]
    assert "optimizer.weight_decay=1.0e-6" in cells[("r2", "A")].overrides  # mobile inherits cnn, overrides it
    assert "optimizer.lr=0.01" in cells[("r2", "B")].overrides  # the row beats the spec
    assert "optimizer.weight_decay=0.0" in cells[("r1", "B")].overrides  # the column beats the family
    assert cells[("r1", "B")].overrides[-1] == "optimizer.momentum=0.5"  # per-cell, last
    assert "optimizer.weight_decay=0.05" in cells[("r3", "A")].overrides
    assert cells[("r1", "F")].arm_set == "fixed"


def test_wct_budgets(tiny):
    cells = {(c.row, c.column): c for c in tiny.cells(("main", "fixed"))}
    # the reference arm trains the reference epochs; a tuned lr/wd does not change that
    assert tiny.budget_overrides(cells[("r1", "A")]) == ["budget=epochs", "budget.epochs=200"]
    assert tiny.budget_overrides(cells[("r3", "A")]) == ["budget=epochs", "budget.epochs=200"]
    # a variant changes the cost of a step: timed against the reference
    assert tiny.budget_overrides(cells[("r1", "F")]) == [
        "budget=reference", "budget.reference_optimizer=adafisher", "budget.reference_epochs=200"]
    assert tiny.budget_overrides(cells[("r3", "C")])[1] == "budget.reference_optimizer=adamw"
    # paper mode: Table 6's counts where the paper has one, measured otherwise
    assert tiny.budget_overrides(cells[("r1", "B")], "paper") == ["budget=epochs", "budget.epochs=50"]
    assert tiny.budget_overrides(cells[("r3", "C")], "paper")[0] == "budget=reference"


def test_paper_lookup(tiny):
    assert tiny.paper_value("r1", "A").mean == 94.85
    assert tiny.paper_value("r1", "B").no_result
    assert tiny.paper_value("r2", "A") is None


@pytest.mark.parametrize("bad, message", [
    ("rows: {r: {family: nope}}\narms: {main: {A: [optimizer=adam]}}", "unknown family"),
    ("rows: {r: {}}\narms: {main: {A: [optimizer=adam]}}\nfoo: 1", "unknown keys"),
    ("rows: {r: {}}\narms: {main: {A: [optimizer=adam]}}\npaper: {q: {A: 1}}", "not in `rows`"),
    ("rows: {r: {}}\narms: {main: {A: [optimizer=adam]}}\npaper: {r: {Z: 1}}", "no arm set has"),
    ("rows: {r: {}}\narms: {main: {A: [optimizer=adam]}}\nwct: {epochs: 2}", "wct needs"),
    ("arms: {main: {A: [optimizer=adam]}}", "needs `rows` and `arms`"),
])
def test_bad_specs_say_what_is_wrong(tmp_path, bad, message):
    p = tmp_path / "bad.yaml"
    p.write_text(bad)
    with pytest.raises(SpecError, match=message):
        load_spec(p)


def test_unknown_spec_lists_the_available_ones():
    with pytest.raises(SpecError, match="table2_cifar10"):
        load_spec("no_such_table")


def test_extends_merges_and_null_drops(tmp_path):
    (tmp_path / "_base.yaml").write_text("rows: {a: {}, b: {}}\narms: {main: {X: [optimizer=adam], Y: [optimizer=sgd]}}\n")
    (tmp_path / "child.yaml").write_text("extends: [_base]\nrows: {b: null, c: {}}\narms: {main: {Y: null}}\n")
    spec = load_spec(tmp_path / "child.yaml")
    assert [(c.row, c.column) for c in spec.cells()] == [("a", "X"), ("c", "X")]


def test_every_shipped_spec_loads_with_paper_values_on_its_cells():
    for name in available_specs():
        spec = load_spec(name)
        cells = spec.cells(tuple(spec.arms))  # every arm set the spec has (not every spec has `fixed`)
        assert cells, name
        keys = {c.key for c in cells}
        for row, values in spec.paper.items():
            for col in values:
                assert (row, col) in keys, (name, row, col)


def test_paper_tables_have_the_papers_shape():
    t2 = load_spec("table2_cifar10")
    assert len(t2.cells()) == 40 and t2.seeds == [0, 1, 2, 3, 4]
    assert sum(1 for r in t2.paper.values() for _ in r) == 40
    assert t2.paper_value("ResNet-18", "AdaFisher").mean == 96.25
    assert t2.paper_value("CCT-2/3x2", "AdaHessian").no_result
    assert [t2.paper_epochs(c) for c in ("Adam", "AdaHessian", "K-FAC", "Shampoo", "AdaFisher")] == [210, 89, 107, 36, 200]
    assert load_spec("table10a_cifar100").paper_value("ResNet-50", "AdaFisher").mean == 78.91
    assert [c.column for c in load_spec("table3_imagenet").cells()] == ["Adam", "K-FAC", "Shampoo", "AdaFisher"]
    assert load_spec("table3_imagenet").paper_value("ResNet-50", "AdaFisher", "best_acc5").mean == 93.39
    t5 = load_spec("table5_wikitext2")
    assert t5.metric == "test_ppl" and t5.paper_value("GPT-1 (4 blocks)", "AdaFisherW").mean == 152.72
    t4 = load_spec("table4_transfer_cifar10")
    assert t4.paper_epochs("Shampoo") == 18 and t4.wct["epochs"] == 50
    # every table has the fixed arms: AdaFisher as the paper's equations, F = λ, SGD-momentum, bias-corrected SGD
    for name in ("table2_cifar10", "table3_imagenet", "table4_transfer_cifar100", "table5_wikitext2",
                 "table11_tiny_imagenet", "quick"):
        assert [c for _, c in load_spec(name).columns(("fixed",))] == [
            "AdaFisher (paper eqs.)", "AdaFisher (F = λ)", "SGD-momentum",
            "SGD, bias-corrected (= F = λ, exact from step 1)"], name


def test_baseline_names_a_cell_of_the_spec(tmp_path):
    from fisherbench.sweep.spec import SpecError, load_spec

    assert load_spec("damping_study").baseline == ("no curvature", "F = λ")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rows: {a: {}}\narms: {main: {X: [optimizer=adam]}}\nbaseline: {row: a, column: Y}\n")
    with pytest.raises(SpecError, match="baseline names the cell 'a' × 'Y'"):
        load_spec(bad)
    bad.write_text("rows: {a: {}}\narms: {main: {X: [optimizer=adam]}}\nbaseline: a\n")
    with pytest.raises(SpecError, match="baseline must be"):
        load_spec(bad)

"""Render report tables (`results.report.TableResult`) as Markdown, CSV and LaTeX.

Markdown has the paper-shaped table (ours, mean ± sample std over seeds, bold only where a test supports a
best cell, and on equal-time cells how their budget was set and how sure: `97.10 ± 0.20 ᶜ[9.8–10.2 ep]`), the
cell-by-cell comparison with the paper (value, margin δ, difference with its 90% CI, seeds found, runs left
out, the equivalence verdict), the equal-time budgets, and the epochs each optimizer reached under the budget
(Table 6, from the runs, with each calibrated step-time ratio and its CI). Tables without paper values (custom
reports) drop the paper, δ, Δ and verdict columns. CSV holds the comparison with plain numbers; LaTeX the
paper-shaped table. A mean over one seed is written `97.20 (n=1)`: one run has no spread to show.
"""
from __future__ import annotations

import csv
import io
from typing import Any, Optional, Sequence

from fisherbench.core.budget import loads_differ
from fisherbench.results.report import (
    RULE,
    TABLE6_NOTE,
    VALIDATION_COUNTERPART,
    CellResult,
    TableResult,
    compare_with_baseline,
    run_epoch_seconds,
    run_epochs,
    run_peak_memory,
)
from fisherbench.results.runs import LOAD_DIFF_THRESHOLD, RunBudget, run_curvature_range

CSV_FIELDS = ("table", "metric", "row", "column", "arm_set", "mean", "std", "seeds_found", "seeds_expected",
              "diverged", "incomplete", "duplicates", "paper_mean", "paper_std", "delta", "margin", "ci90_lo",
              "ci90_hi", "ci95_lo", "ci95_hi", "verdict", "best", "epochs", "epoch_seconds", "peak_memory_mb",
              "budget_method", "budget_seeds", "derived_epochs_lo", "derived_epochs_hi", "ratio", "ratio_lo",
              "ratio_hi", "calibration_shared", "busy_runs", "load_flagged", "reference_runs", "run_ids")


def _f(v: Optional[float], d: int, sign: bool = False) -> str:
    if v is None:
        return ""
    return f"{v:+.{d}f}" if sign else f"{v:.{d}f}"


def value_text(c: CellResult) -> str:
    """The mean ± sample std, or `mean (n=1)`; empty when no seed finished."""
    d = c.metric.digits
    if c.mean is None:
        return ""
    return f"{c.mean:.{d}f} (n=1)" if c.n == 1 else f"{c.mean:.{d}f} ± {c.std:.{d}f}"


def ours_text(c: CellResult, budget: bool = True) -> str:
    """The cell as the tables show it: value, its completeness, and (equal-time cells) its budget mark."""
    if c.mean is None:
        if c.diverged:
            return f"diverged {c.diverged}/{c.expected}"
        return f"incomplete 0/{c.expected}" if c.seeds else "missing"
    marks = []
    if c.n < c.expected:
        marks.append(f"{c.n}/{c.expected} seeds")
    if c.diverged:
        marks.append(f"{c.diverged} diverged")
    text = value_text(c)
    if marks:
        text = text[:-1] + "; " + ", ".join(marks) + ")" if c.n == 1 else f"{text} ({', '.join(marks)})"
    mark = budget_mark(c) if budget else ""
    return f"{text} {mark}" if mark else text


# ------------------------------------------------------------------------------------ equal-time budgets
METHOD_MARKS = {"match": "ᵐ", "calibration": "ᶜ"}


def _digits(*vs: float) -> int:
    """Decimals for a value and its interval, alike for all of them: 2 below 10, else 1 (9.80–10.2 reads as
    two precisions)."""
    return 2 if max(abs(v) for v in vs) < 10 else 1


def _num_text(v: float, d: Optional[int] = None) -> str:
    return f"{v:.{_digits(v) if d is None else d}f}"


def _range_text(lo: float, hi: float) -> str:
    d = _digits(lo, hi)
    return f"{lo:.{d}f}–{hi:.{d}f}"


def _span(pairs: list[tuple[float, float]]) -> Optional[tuple[float, float]]:
    return (min(p[0] for p in pairs), max(p[1] for p in pairs)) if pairs else None


def cell_budget(c: CellResult) -> Optional[dict[str, Any]]:
    """What a cell's derived budgets say, over its finished seeds; None for cells with plain budgets (and the
    reference arm itself)."""
    budgets = [b for b in c.budgets if b.method in METHOD_MARKS]
    if not budgets:
        return None
    cal = [b for b in budgets if b.method == "calibration"]
    match = [b for b in budgets if b.method == "match"]
    keys = {b.calibration for b in cal}
    ratios = [b.ratio for b in cal if b.ratio is not None]
    return {
        "methods": c.budget_methods,
        "seeds": len(budgets),
        "epochs": [b.epochs for b in budgets if b.epochs is not None],
        "epochs_ci": _span([b.epochs_ci for b in cal if b.epochs_ci]),
        "ratio": sum(ratios) / len(ratios) if ratios else None,
        "ratio_ci": _span([b.ratio_ci for b in cal if b.ratio_ci]),
        "blocks": sorted({b.blocks for b in cal if b.blocks is not None}),
        "calibrations": len(keys),
        # one calibration measured once and reused by every seed: its error is common to them all
        "shared": len(cal) > 1 and len(keys) == 1 and None not in keys,
        "busy": sum(b.busy_warning is not None for b in budgets),
        "references": list(dict.fromkeys(b.reference_run for b in match if b.reference_run)),
        "load_flagged": sum(_load_differs(b) for b in match),
    }


def _load_differs(b: RunBudget) -> bool:
    if b.loads_differ is not None:  # the run recorded the comparison itself
        return b.loads_differ
    return loads_differ(b.load, b.reference_load)


def budget_mark(c: CellResult) -> str:
    """`ᶜ[9.8–10.2 ep]` (calibrated: the 95% CI of the derived epochs), `ᵐ[ref 1a2b3c4d]` (matched: the
    reference run whose measured time was replayed; `+k` more references), `mixed (m 3, c 2)` when seeds were
    budgeted by different methods; `⚠busy k/n` when k seeds' budgets were measured on a busy machine,
    `⚠load k/n` when k matched pairs ran under machine loads that differ beyond LOAD_DIFF_THRESHOLD."""
    b = cell_budget(c)
    if b is None:
        return ""
    methods = b["methods"]
    if len(methods) > 1:
        text = f"mixed (m {methods.get('match', 0)}, c {methods.get('calibration', 0)})"
    elif "calibration" in methods:
        ci = b["epochs_ci"]
        text = "ᶜ" + (f"[{_range_text(*ci)} ep]" if ci else "")
    else:
        refs = b["references"]
        text = "ᵐ" + (f"[ref {refs[0][:8]}" + (f" +{len(refs) - 1}" if len(refs) > 1 else "") + "]" if refs else "")
    if b["busy"]:
        text += f" ⚠busy {b['busy']}/{b['seeds']}"
    if b["load_flagged"]:
        text += f" ⚠load {b['load_flagged']}/{b['seeds']}"
    return text


def budgets_markdown(t: TableResult) -> Optional[str]:
    """Per equal-time cell: how its budget was set and how sure (None when no cell has a derived budget)."""
    body = []
    notes = []
    for c in t.cells:
        b = cell_budget(c)
        if b is None:
            continue
        methods = ", ".join(f"{ {'match': 'matched', 'calibration': 'calibrated'}[m]} {k}"
                            for m, k in sorted(b["methods"].items()))
        epochs = b["epochs"]
        ci = b["epochs_ci"]
        mean_epochs = sum(epochs) / len(epochs) if epochs else None
        d = _digits(*(ci or ()), *([mean_epochs] if mean_epochs is not None else []), 0.0)
        ep = "" if mean_epochs is None else _num_text(mean_epochs, d)
        if ci:
            ep += f" [{ci[0]:.{d}f}–{ci[1]:.{d}f}]"
        ratio = "" if b["ratio"] is None else f"{b['ratio']:.3f}"
        if b["ratio_ci"]:
            ratio += f" [{b['ratio_ci'][0]:.3f}–{b['ratio_ci'][1]:.3f}]"
        blocks = ", ".join(map(str, b["blocks"]))
        if b["shared"]:
            calib = f"one, shared by all {b['seeds']} seeds"
            notes.append(f"{c.row} × {c.column}")
        else:
            calib = str(b["calibrations"]) if b["methods"].get("calibration") else ""
        refs = ", ".join(r[:8] for r in b["references"])
        body.append([c.row, c.column, methods, ep, ratio, blocks, calib,
                     f"{b['busy']}/{b['seeds']}" if b["busy"] else "", refs,
                     f"{b['load_flagged']}/{b['seeds']}" if b["load_flagged"] else ""])
    if not body:
        return None
    out = [_md_table(["row", "column", "budget", "epochs [95% CI]", "step-time ratio [95% CI]", "blocks",
                      "calibrations", "busy machine", "reference runs", "load differs"], body), "",
           "Calibrated (ᶜ): the candidate trains the reference's time, converted to steps by an interleaved "
           "measurement of both optimizers' step times; the interval is that measurement's 95% CI, carried to "
           "epochs. Matched (ᵐ): the candidate replays the measured training time of the reference run named. "
           f"`load differs`: matched pairs whose 1-minute load averages differ by more than {LOAD_DIFF_THRESHOLD:g}: "
           "the replayed seconds bought a different amount of work. `busy machine`: the budget was measured (or "
           "the run trained) while other work shared the machine."]
    if notes:
        out += ["", "One calibration is shared by all seeds of " + "; ".join(notes) + ": its error is common to "
                "them (every seed trained the same number of steps) and is **not** in the ± spread over seeds."]
    return "\n".join(out)


def paper_text(c: CellResult) -> str:
    if c.paper is None:
        return ""
    if c.paper.mean is None:
        return "—"
    d = c.metric.digits
    return f"{c.paper.mean:.{d}f} ± {c.paper.std:.{d}f}" if c.paper.std is not None else f"{c.paper.mean:.{d}f}"


def note_text(c: CellResult) -> str:
    parts = []
    if c.diverged:
        parts.append(f"{c.diverged} diverged")
    if c.incomplete:
        corrupt = f" ({c.corrupt} corrupt)" if c.corrupt else ""
        parts.append(f"{c.incomplete} unfinished/failed{corrupt}")
    if c.no_value:
        parts.append(f"{c.no_value} without {c.metric.key or 'the metric'}")
    if c.missing:
        parts.append(f"{c.missing} not run")
    if c.duplicates:
        parts.append(f"{c.duplicates} duplicate run{'s' if c.duplicates > 1 else ''} ignored")
    return ", ".join(parts)


def verdict_text(c: CellResult) -> str:
    return c.verdict


def delta_text(c: CellResult) -> str:
    """Δ = ours − paper with its 90% CI (the interval the equivalence test reads); Δ alone for one seed."""
    d = c.metric.digits
    if c.delta is None:
        return ""
    eq = c.equivalence
    if eq is None or eq.ci90 is None or not c.complete:
        return _f(c.delta, d, sign=True)
    lo, hi = eq.ci90
    return f"{c.delta:+.{d}f} [{lo:+.{d}f}, {hi:+.{d}f}]"


def margin_text(c: CellResult) -> str:
    m = c.margin
    return "" if m is None else f"±{m:.{c.metric.digits}f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def wide_markdown(t: TableResult) -> str:
    best = t.best_cells()
    body = []
    for r in t.rows:
        row = [r]
        for col in t.columns:
            c = t.cell(r, col)
            text = ours_text(c) if c else ""
            row.append(f"**{text}**" if (r, col) in best else text)
        body.append(row)
    return _md_table(["", *t.columns], body)


def long_markdown(t: TableResult) -> str:
    with_paper = t.has_paper
    body = []
    for c in t.cells:
        line = [c.row, c.column, ours_text(c) if c.mean is not None else ""]
        if with_paper:
            line += [paper_text(c), margin_text(c), delta_text(c)]
        line += [f"{c.n}/{c.expected}", note_text(c)]
        if with_paper:
            line.append(verdict_text(c) if c.paper is not None else "")
        body.append(line)
    header = ["row", "column", "ours"] + (["paper", "δ", "Δ [90% CI]"] if with_paper else []) + ["seeds", "runs"]
    return _md_table(header + (["verdict"] if with_paper else []), body)


def _epochs_text(v: Optional[float]) -> str:
    if v is None:
        return ""
    return f"{v:.0f}" if abs(v - round(v)) < 0.05 else f"{v:.1f}"


METHOD_NOTE = ("How each equal-time budget was set: ᵐ the measured training time of the cell's reference run "
               "(budget=match), ᶜ an interleaved calibration of step times (budget=reference), with the step-time "
               "ratio (candidate / reference) and its 95% CI; unmarked cells trained a fixed budget (the reference "
               "arm itself).")


def _method_mark(c: CellResult) -> str:
    methods = c.budget_methods
    return "".join(METHOD_MARKS[m] for m in sorted(methods))


def _ratio_text(c: CellResult) -> str:
    b = cell_budget(c)
    if b is None or b["ratio"] is None:
        return ""
    ci = b["ratio_ci"]
    return f" ×{b['ratio']:.2f}" + (f" [{ci[0]:.2f}–{ci[1]:.2f}]" if ci else "")


def epochs_markdown(t: TableResult) -> str:
    """Epochs reached under the budget per cell (Table 6 from the runs), with the paper's counts; calibrated
    cells add their step-time ratio (candidate / reference) and its 95% CI."""
    body = []
    for r in t.rows:
        body.append([r, *[_epochs_text(c.mean_of(run_epochs)) + _method_mark(c) + _ratio_text(c)
                          if (c := t.cell(r, col)) else "" for col in t.columns]])
    paper = [t.spec.paper_epochs_of(col) for col in t.columns]
    if any(p is not None for p in paper):
        body.append(["paper (Table 6)", *[str(p) if p is not None else "" for p in paper]])
    return _md_table(["epochs", *t.columns], body)


def table6_markdown(tables: Sequence[TableResult]) -> str:
    """Paper Table 6 across specs: per WCT spec, the epochs each optimizer reached (mean over its networks and
    seeds; the paper's count in parentheses), then every calibrated step-time ratio with its 95% CI (per spec
    and network), then the timing note."""
    specs = [t for t in tables if t.spec.wct and t.metric.name == t.spec.metric]
    columns = list(dict.fromkeys(col for t in specs for col in t.columns))
    body = []
    for t in specs:
        row = [t.spec.name]
        for col in columns:
            vals = [v for r in t.rows if (c := t.cell(r, col)) and (v := c.mean_of(run_epochs)) is not None]
            ours = _epochs_text(sum(vals) / len(vals)) if vals else ("" if col not in t.columns else "—")
            paper = t.spec.paper_epochs_of(col) if col in t.columns else None
            row.append(ours + (f" ({paper})" if paper is not None else ""))
        body.append(row)
    out = _md_table(["spec", *columns], body)
    ratios = []
    for t in specs:
        for r in t.rows:
            cells = [(col, c) for col in columns if (c := t.cell(r, col)) is not None]
            texts = [_method_mark(c) + _ratio_text(c).strip() if _ratio_text(c) else _method_mark(c)
                     for _, c in cells]
            if any(texts):
                by_col = dict(zip([col for col, _ in cells], texts))
                ratios.append([f"{t.spec.name} · {r}", *[by_col.get(col, "") for col in columns]])
    if ratios:
        out += ("\n\nStep-time ratio (candidate / reference) behind each calibrated budget, mean over seeds, "
                "[95% CI] (the span of the seeds' intervals); ᵐ: matched to the reference run's measured time "
                "(no ratio)\n\n" + _md_table(["spec · network", *columns], ratios))
    return out + "\n\n" + TABLE6_NOTE


def cost_markdown(t: TableResult) -> str:
    """Training seconds per epoch and peak memory per cell (mean over seeds)."""
    body = []
    for r in t.rows:
        row = [r]
        for col in t.columns:
            c = t.cell(r, col)
            sec = c.mean_of(run_epoch_seconds) if c else None
            mem = c.mean_of(run_peak_memory) if c else None
            row.append("" if sec is None else f"{sec:.2f} s" + ("" if mem is None else f" · {mem / 2**20:.0f} MB"))
        body.append(row)
    return _md_table(["s/epoch · peak memory", *t.columns], body)


def curvature_markdown(t: TableResult) -> Optional[str]:
    """F/λ over training per cell (AdaFisher-family runs): how far the preconditioner got from plain momentum.

    Per cell, over its seeds: the lowest and highest F/λ logged at any evaluation, and the mean over seeds of
    the last evaluation's range. None when no run of the table logs F/λ.
    """
    body, any_value = [], False
    for r in t.rows:
        row = [r]
        for col in t.columns:
            c = t.cell(r, col)
            ranges = [x for x in (run_curvature_range(s.run) for s in c.seeds)] if c else []
            ranges = [x for x in ranges if x is not None]
            if not ranges:
                row.append("")
                continue
            any_value = True
            lo, hi = min(x[0] for x in ranges), max(x[1] for x in ranges)
            flo, fhi = (sum(x[i] for x in ranges) / len(ranges) for i in (2, 3))
            row.append(f"[{lo:.4g}, {hi:.4g}] · final [{flo:.4g}, {fhi:.4g}]")
        body.append(row)
    if not any_value:
        return None
    return _md_table(["F/λ over training · at the end", *t.columns], body)


def baseline_markdown(t: TableResult) -> Optional[str]:
    """Every cell against the spec's baseline cell (Welch's test, Holm-corrected per column), a verdict per row,
    and one sentence per column listing the rows that differ."""
    base, comparisons = compare_with_baseline(t)
    if base is None:
        return None
    label = f"{base.row} × {base.column}"
    if not comparisons:
        return f"The baseline {label} has no complete result yet: nothing is compared."
    d = t.metric.digits

    def verdict(c) -> str:
        if c.differs is None:
            return "no test (n=1)"
        return "differs" if c.differs else "no difference found"

    body = []
    for c in comparisons:
        delta = _f(c.delta, d, sign=True)
        if c.test is not None:
            delta += f" [{c.test.ci95[0]:+.{d}f}, {c.test.ci95[1]:+.{d}f}]"
        body.append([c.cell.row, c.cell.column, delta, "" if c.p_value is None else f"{c.p_value:.3g}",
                     "" if c.p_holm is None else f"{c.p_holm:.3g}", verdict(c)])
    sentences = []
    for col in dict.fromkeys(c.cell.column for c in comparisons):
        mine = [c for c in comparisons if c.cell.column == col]
        differ = [c.cell.row for c in mine if c.differs]
        same = [c.cell.row for c in mine if c.differs is False]
        untested = [c.cell.row for c in mine if c.differs is None]
        parts = []
        if differ:
            parts.append(f"differs from {label} at {', '.join(differ)}")
        if same:
            parts.append(f"no difference found at {', '.join(same)}")
        if untested:
            parts.append(f"no test at {', '.join(untested)} (one seed)")
        sentences.append(f"**{col}** ({len(mine)} row{'s' if len(mine) != 1 else ''} compared): "
                         + "; ".join(parts) + ".")
    table = _md_table([f"vs {label}", "column", "Δ mean [95% CI]", "Welch p", "Holm p", "verdict"], body)
    return "\n".join([
        f"Baseline: {label}, {_f(base.mean, d)} ± {_f(base.std, d)} over {base.n} seeds. Each cell is compared "
        "with it by Welch's t-test (Δ with its 95% CI); the p-values of the rows compared in one column are "
        "Holm-corrected (family-wise error ≤ 5% per column), and a row `differs` when its Holm p < 0.05. "
        "`no difference found` is not evidence of equality: the CI says how large a difference the seeds allow.",
        "", table, "", *sentences])


def rule_text(t: TableResult) -> str:
    seeds = t.cells[0].seeds_expected if t.cells else []
    parts = [f"Ours: mean ± sample std (ddof=1) over seeds {seeds}; one finished seed is shown as `(n=1)` (no "
             f"spread, no test); {'higher' if t.metric.higher_is_better else 'lower'} is better."]
    if t.metric.selects_on_test:
        parts.append("The metric is a maximum over test evaluations (the paper's protocol: it selects on the "
                     "test set).")
    if t.has_paper:
        how = ("set by the spec (`equivalence_margin`)" if t.cells and t.cells[0].margin_set is not None else
               "0.5 points for percent metrics, 2% of the paper's value otherwise, or the paper's std when larger; "
               "a spec sets its own with `equivalence_margin`")
        parts.append(f"Verdict, only when every seed finished: {RULE}. δ per cell in the δ column ({how}). Otherwise "
                     "`diverged k/n` (k of n seeds diverged) or `incomplete k/n` (k of n seeds finished); a cell "
                     "whose seeds were budgeted by different methods is `mixed` and gets no verdict.")
    if t.spec.best in ("row", "column") and t.selection()[0] is not None:
        what = t.spec.best_label or ("the best of each row" if t.spec.best == "row" else "the best of each column")
        metric, _ = t.selection()
        if metric.name in VALIDATION_COUNTERPART.values():
            how = f"chosen by {metric.name} (validation)"
        elif metric.selects_on_test:
            how = f"chosen by {metric.name} (on the test set: the runs have no validation split)"
        else:
            how = f"chosen by {metric.name}"
        parts.append(f"Bold: {what}, {how}, among cells whose seeds all finished, only where Welch's test against "
                     "each other cell of its group (Holm-corrected) says it is better at 5%.")
    return " ".join(parts)


def markdown(tables: Sequence[TableResult]) -> str:
    t0 = tables[0]
    out = [f"# {t0.spec.title}", ""]
    for t in tables:
        out += [f"## {t.metric.label}", "", rule_text(t), "", wide_markdown(t), "", long_markdown(t), ""]
    out += [f"## Epochs under the budget{' (Table 6, from the runs)' if t0.spec.wct else ''}", "",
            epochs_markdown(t0), ""]
    if t0.spec.wct:
        out += [TABLE6_NOTE, ""]
    if any(_method_mark(c) for c in t0.cells):
        out += [METHOD_NOTE, ""]
    budgets = budgets_markdown(t0)
    if budgets is not None:
        out += ["## Equal-time budgets", "", budgets, ""]
    out += ["## Cost per epoch", "", "Budget-clock seconds: evaluation, logging and checkpoints excluded.", "",
            cost_markdown(t0), ""]
    baseline = baseline_markdown(t0)
    if baseline is not None:
        out += ["## Against the baseline", "", baseline, ""]
    curvature = curvature_markdown(t0)
    if curvature is not None:
        out += ["## F/λ over training", "", "The range of F/λ over the preconditioned entries, logged at every "
                "evaluation (AdaFisher family): 1 means a plain momentum step at lr/λ, larger values damp the step "
                "by that factor.", "", curvature, ""]
    notes = list(t0.spec.notes or [])
    if notes:
        out += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(out)


def csv_text(tables: Sequence[TableResult]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for t in tables:
        best = t.best_cells()
        for c in t.cells:
            d = c.metric.digits + 2
            eq = c.equivalence if c.complete else None
            ci90 = eq.ci90 if eq and eq.ci90 else (None, None)
            ci95 = eq.ci95 if eq and eq.ci95 else (None, None)
            b = cell_budget(c) or {}
            ep_ci = b.get("epochs_ci") or (None, None)
            r_ci = b.get("ratio_ci") or (None, None)
            w.writerow({
                "table": t.spec.name, "metric": t.metric.name, "row": c.row, "column": c.column,
                "arm_set": c.arm_set, "mean": _f(c.mean, d), "std": _f(c.std, d), "seeds_found": c.n,
                "seeds_expected": c.expected, "diverged": c.diverged, "incomplete": c.incomplete,
                "duplicates": c.duplicates,
                "paper_mean": "" if c.paper is None or c.paper.mean is None else _f(c.paper.mean, d),
                "paper_std": "" if c.paper is None or c.paper.std is None else _f(c.paper.std, d),
                "delta": _f(c.delta, d), "margin": _f(c.margin, d),
                "ci90_lo": _f(ci90[0], d), "ci90_hi": _f(ci90[1], d),
                "ci95_lo": _f(ci95[0], d), "ci95_hi": _f(ci95[1], d),
                "verdict": c.verdict if c.paper is not None else "",
                "best": int((c.row, c.column) in best),
                "epochs": _f(c.mean_of(run_epochs), 2), "epoch_seconds": _f(c.mean_of(run_epoch_seconds), 4),
                "peak_memory_mb": _f(None if (m := c.mean_of(run_peak_memory)) is None else m / 2**20, 1),
                "budget_method": " ".join(f"{k}:{v}" for k, v in sorted((b.get("methods") or {}).items())),
                "budget_seeds": b.get("seeds", ""),
                "derived_epochs_lo": _f(ep_ci[0], 4), "derived_epochs_hi": _f(ep_ci[1], 4),
                "ratio": _f(b.get("ratio"), 4), "ratio_lo": _f(r_ci[0], 4), "ratio_hi": _f(r_ci[1], 4),
                "calibration_shared": int(bool(b.get("shared"))) if b else "",
                "busy_runs": b.get("busy", ""), "load_flagged": b.get("load_flagged", ""),
                "reference_runs": " ".join(b.get("references") or []),
                "run_ids": " ".join(s.run.run_id for s in c.seeds),
            })
    return buf.getvalue()


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"), ("_", r"\_"),
                 ("±", r"$\pm$"), ("λ", r"$\lambda$"), ("×", r"$\times$"), ("—", "---")):
        s = s.replace(a, b)
    return s


def _tex_ours(c: CellResult, bold: bool) -> str:
    d = c.metric.digits
    if c.mean is None:
        return "div." if c.diverged else "--"
    math = f"\\mathbf{{{c.mean:.{d}f}}}" if bold else f"{c.mean:.{d}f}"
    if c.n > 1:
        math += f"_{{\\pm {c.std:.{d}f}}}"
    if c.n < c.expected:
        math += f"^{{{c.n}/{c.expected}}}"
    return f"${math}$" + (" ($n{=}1$)" if c.n == 1 else "")


def latex(tables: Sequence[TableResult]) -> str:
    out = []
    for t in tables:
        best = t.best_cells()
        out += [f"% {t.spec.title} -- {t.metric.label}; ours (paper); a superscript k/n: k of n seeds finished",
                r"\begin{tabular}{l" + "c" * len(t.columns) + "}",
                r"\toprule", " & ".join(["", *(_tex(c) for c in t.columns)]) + r" \\", r"\midrule"]
        for r in t.rows:
            cells = []
            for col in t.columns:
                c = t.cell(r, col)
                if c is None:
                    cells.append("")
                    continue
                paper = paper_text(c)
                cells.append(_tex_ours(c, (r, col) in best) + (f" ({_tex(paper)})" if paper else ""))
            out.append(" & ".join([_tex(r), *cells]) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(out)


def summary_markdown(verdicts: dict[str, list[str]]) -> str:
    total = sum(len(v) for v in verdicts.values())
    lines = [f"{total} cells with a paper value: " + ", ".join(f"{k} {len(v)}" for k, v in verdicts.items() if v),
             "", f"A verdict only where every seed finished; {RULE}."]
    titles = {"untested": "no test (one seed)", "mixed": "mixed budgets (matched and calibrated seeds: no verdict)",
              "diverged": "diverged (some seeds diverged: no verdict)",
              "incomplete": "incomplete (some seeds did not finish: no verdict)"}
    for k in ("reproduced", "differs", "inconclusive", "untested", "mixed", "n/a", "diverged", "incomplete"):
        if verdicts.get(k):
            lines += ["", f"### {titles.get(k, k)}", *[f"- {x}" for x in verdicts[k]]]
    if verdicts.get("missing"):
        n = len(verdicts["missing"])
        lines += ["", f"### missing ({n} cell{'s' if n != 1 else ''}: no run in the store)"]
    return "\n".join(lines)


def console_table(t: TableResult) -> str:
    """A plain-text version of the comparison for the terminal."""
    with_paper = t.has_paper
    best = t.best_cells()
    header = ["row", "column", "ours", "seeds", "epochs", "s/epoch"]
    header += ["paper", "δ", "Δ [90% CI]", "verdict"] if with_paper else []
    rows: list[list[Any]] = []
    for c in t.cells:
        sec = c.mean_of(run_epoch_seconds)
        ours = ours_text(c) + (" *" if (c.row, c.column) in best else "")
        row = [c.row, c.column, ours, f"{c.n}/{c.expected}", _epochs_text(c.mean_of(run_epochs)),
               "" if sec is None else f"{sec:.2f}"]
        if with_paper:
            row += [paper_text(c), margin_text(c), delta_text(c), verdict_text(c) if c.paper is not None else ""]
        rows.append(row)
    return format_columns(header, rows) + ("\n(* best, by a test)" if best else "")


def format_columns(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned plain-text columns."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*map(str, r)) for r in rows)]
    return "\n".join(line.rstrip() for line in lines)

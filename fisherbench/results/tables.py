"""Render report tables (`results.report.TableResult`) as Markdown, CSV and LaTeX.

Markdown has the paper-shaped table (ours, mean ± std over seeds, the best cell in bold), the cell-by-cell
comparison with the paper (value, difference, Welch p, seeds found, runs left out, verdict), and the epochs
each optimizer reached under the budget (Table 6, from the runs). Tables without paper values (custom
reports) drop the paper, Δ, p and verdict columns. CSV holds the comparison with plain numbers; LaTeX the
paper-shaped table. A mean over one seed is written `97.20 (n=1)`: one run has no spread to show.
"""
from __future__ import annotations

import csv
import io
from typing import Any, Optional, Sequence

from fisherbench.results.report import (
    RULE,
    TABLE6_NOTE,
    TTEST,
    VALIDATION_COUNTERPART,
    CellResult,
    TableResult,
    compare_with_baseline,
    run_epoch_seconds,
    run_epochs,
    run_peak_memory,
)
from fisherbench.results.runs import run_budget_method, run_curvature_range

CSV_FIELDS = ("table", "metric", "row", "column", "arm_set", "mean", "std", "seeds_found", "seeds_expected",
              "diverged", "incomplete", "duplicates", "paper_mean", "paper_std", "delta", "sigma", "p_value",
              "verdict", "best", "epochs", "epoch_seconds", "peak_memory_mb", "run_ids")


def _f(v: Optional[float], d: int, sign: bool = False) -> str:
    if v is None:
        return ""
    return f"{v:+.{d}f}" if sign else f"{v:.{d}f}"


def value_text(c: CellResult) -> str:
    """The mean ± std, or `mean (n=1)`; empty when no seed finished."""
    d = c.metric.digits
    if c.mean is None:
        return ""
    return f"{c.mean:.{d}f} (n=1)" if c.n == 1 else f"{c.mean:.{d}f} ± {c.std:.{d}f}"


def ours_text(c: CellResult) -> str:
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
    if not marks:
        return text
    return text[:-1] + "; " + ", ".join(marks) + ")" if c.n == 1 else f"{text} ({', '.join(marks)})"


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
    kind = c.verdict_kind
    if kind == "reproduced":
        return "✓ within 2σ"
    if kind == "not reproduced":
        return f"✗ {abs(c.delta) / c.sigma:.1f}σ"  # type: ignore[operator]
    return c.verdict


def p_text(c: CellResult) -> str:
    p = c.p_value
    if p is None:
        return ""
    return f"{p:.2g}" if p >= 1e-3 else "<0.001"


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
            line += [paper_text(c), _f(c.delta, c.metric.digits, sign=True), p_text(c)]
        line += [f"{c.n}/{c.expected}", note_text(c)]
        if with_paper:
            line.append(verdict_text(c) if c.paper is not None else "")
        body.append(line)
    header = ["row", "column", "ours"] + (["paper", "Δ", "p"] if with_paper else []) + ["seeds", "runs"]
    return _md_table(header + (["verdict"] if with_paper else []), body)


def _epochs_text(v: Optional[float]) -> str:
    if v is None:
        return ""
    return f"{v:.0f}" if abs(v - round(v)) < 0.05 else f"{v:.1f}"


METHOD_MARKS = {"match": "ᵐ", "calibration": "ᶜ"}
METHOD_NOTE = ("How each equal-time budget was set: ᵐ the measured training time of the cell's reference run "
               "(budget=match), ᶜ an interleaved calibration of step times (budget=reference); unmarked cells "
               "trained a fixed budget (the reference arm itself).")


def _method_mark(c: CellResult) -> str:
    methods = sorted({m for s in c.seeds if (m := run_budget_method(s.run)) in METHOD_MARKS})
    return "".join(METHOD_MARKS[m] for m in methods)


def epochs_markdown(t: TableResult) -> str:
    """Epochs reached under the budget per cell (Table 6 from the runs), with the paper's counts."""
    body = []
    for r in t.rows:
        body.append([r, *[_epochs_text(c.mean_of(run_epochs)) + _method_mark(c) if (c := t.cell(r, col)) else ""
                          for col in t.columns]])
    paper = [t.spec.paper_epochs_of(col) for col in t.columns]
    if any(p is not None for p in paper):
        body.append(["paper (Table 6)", *[str(p) if p is not None else "" for p in paper]])
    return _md_table(["epochs", *t.columns], body)


def table6_markdown(tables: Sequence[TableResult]) -> str:
    """Paper Table 6 across specs: per WCT spec, the epochs each optimizer reached (mean over its networks and
    seeds; the paper's count in parentheses), followed by the timing note."""
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
    return _md_table(["spec", *columns], body) + "\n\n" + TABLE6_NOTE


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
    """Every cell against the spec's baseline cell, and one sentence per column: the first row (in table order)
    from which the column differs from the baseline beyond 2σ of run-to-run spread, if any."""
    base, comparisons = compare_with_baseline(t)
    if base is None:
        return None
    label = f"{base.row} × {base.column}"
    if not comparisons:
        return f"The baseline {label} has no complete result yet: nothing is compared."
    d = t.metric.digits
    body = [[c.cell.row, c.cell.column, _f(c.delta, d, sign=True), _f(2 * c.sigma, d),
             "" if c.p_value is None else f"{c.p_value:.3g}", "yes" if c.differs else "no"] for c in comparisons]
    sentences = []
    for col in dict.fromkeys(c.cell.column for c in comparisons):
        mine = [c for c in comparisons if c.cell.column == col]
        first = next((c for c in mine if c.differs), None)
        if first is None:
            sentences.append(f"**{col}** does not differ from {label} beyond 2σ at any row.")
        else:
            sentences.append(f"**{col}** differs from {label} beyond 2σ from row **{first.cell.row}** on "
                             f"(Δ {_f(first.delta, d, sign=True)}; "
                             f"{sum(c.differs for c in mine)} of {len(mine)} rows differ).")
    table = _md_table([f"vs {label}", "column", "Δ mean", "2σ", "Welch p", "beyond 2σ"], body)
    return "\n".join([f"Baseline: {label}, {_f(base.mean, d)} over {base.n} seeds. Rule: |Δ| > 2σ, "
                      "σ = √(std² + std_baseline²) (run-to-run spread, as the verdicts).", "", table, "",
                      *sentences])


def rule_text(t: TableResult) -> str:
    seeds = t.cells[0].seeds_expected if t.cells else []
    parts = [f"Ours: mean ± population std (ddof=0) over seeds {seeds}; one finished seed is shown as `(n=1)`; "
             f"{'higher' if t.metric.higher_is_better else 'lower'} is better."]
    if t.metric.selects_on_test:
        parts.append("The metric is a maximum over test evaluations (the paper's protocol: it selects on the "
                     "test set).")
    if t.has_paper:
        parts.append(f"Verdict, only when every seed finished: {RULE}; otherwise `diverged k/n` (k of n seeds "
                     f"diverged) or `incomplete k/n` (k of n seeds finished). {TTEST}; the paper's side: "
                     f"{t.spec.paper_seeds} seeds.")
    if t.best_cells():
        what = t.spec.best_label or ("the best of each row" if t.spec.best == "row" else "the best of each column")
        metric, _ = t.selection()
        if metric.name in VALIDATION_COUNTERPART.values():
            how = f"chosen by {metric.name} (validation)"
        elif metric.selects_on_test:
            how = f"chosen by {metric.name} (on the test set: the runs have no validation split)"
        else:
            how = f"chosen by {metric.name}"
        parts.append(f"Bold: {what}, {how}, among cells whose seeds all finished.")
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
            p = c.p_value
            w.writerow({
                "table": t.spec.name, "metric": t.metric.name, "row": c.row, "column": c.column,
                "arm_set": c.arm_set, "mean": _f(c.mean, d), "std": _f(c.std, d), "seeds_found": c.n,
                "seeds_expected": c.expected, "diverged": c.diverged, "incomplete": c.incomplete,
                "duplicates": c.duplicates,
                "paper_mean": "" if c.paper is None or c.paper.mean is None else _f(c.paper.mean, d),
                "paper_std": "" if c.paper is None or c.paper.std is None else _f(c.paper.std, d),
                "delta": _f(c.delta, d), "sigma": _f(c.sigma, d) if c.paper is not None else "",
                "p_value": "" if p is None else f"{p:.4g}",
                "verdict": c.verdict if c.paper is not None else "",
                "best": int((c.row, c.column) in best),
                "epochs": _f(c.mean_of(run_epochs), 2), "epoch_seconds": _f(c.mean_of(run_epoch_seconds), 4),
                "peak_memory_mb": _f(None if (m := c.mean_of(run_peak_memory)) is None else m / 2**20, 1),
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
    lines = [f"{total} cells with a paper value: " + ", ".join(f"{k} {len(v)}" for k, v in verdicts.items()),
             "", f"A verdict only where every seed finished; reproduced = {RULE}."]
    titles = {"diverged": "diverged (some seeds diverged: no verdict)",
              "incomplete": "incomplete (some seeds did not finish: no verdict)"}
    for k in ("reproduced", "not reproduced", "n/a", "diverged", "incomplete"):
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
    header += ["paper", "Δ", "p", "verdict"] if with_paper else []
    rows: list[list[Any]] = []
    for c in t.cells:
        sec = c.mean_of(run_epoch_seconds)
        ours = ours_text(c) + (" *" if (c.row, c.column) in best else "")
        row = [c.row, c.column, ours, f"{c.n}/{c.expected}", _epochs_text(c.mean_of(run_epochs)),
               "" if sec is None else f"{sec:.2f}"]
        if with_paper:
            row += [paper_text(c), _f(c.delta, c.metric.digits, sign=True), p_text(c),
                    verdict_text(c) if c.paper is not None else ""]
        rows.append(row)
    return format_columns(header, rows) + ("\n(* best)" if best else "")


def format_columns(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned plain-text columns."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*map(str, r)) for r in rows)]
    return "\n".join(line.rstrip() for line in lines)

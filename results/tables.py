"""Render report tables (`results.report.TableResult`) as Markdown, CSV and LaTeX.

Markdown has the paper-shaped table (ours, mean ± std over seeds), the cell-by-cell comparison with the
paper (value, difference, seeds found, runs left out, verdict), and the epochs each optimizer reached under
the budget (Table 6, from the runs). CSV holds the comparison with plain numbers; LaTeX the paper-shaped table.
"""
from __future__ import annotations

import csv
import io
from typing import Any, Optional, Sequence

from results.report import CellResult, TableResult, run_epoch_seconds, run_epochs, run_peak_memory

CSV_FIELDS = ("table", "metric", "row", "column", "arm_set", "mean", "std", "seeds_found", "seeds_expected",
              "diverged", "incomplete", "duplicates", "paper_mean", "paper_std", "delta", "sigma", "verdict",
              "epochs", "epoch_seconds", "peak_memory_mb", "run_ids")


def _f(v: Optional[float], d: int, sign: bool = False) -> str:
    if v is None:
        return ""
    return f"{v:+.{d}f}" if sign else f"{v:.{d}f}"


def ours_text(c: CellResult) -> str:
    d = c.metric.digits
    if c.mean is None:
        if c.diverged:
            return f"diverged ({c.diverged}/{len(c.seeds_expected)})"
        return "incomplete" if c.seeds else "missing"
    text = f"{c.mean:.{d}f} ± {c.std:.{d}f}"
    marks = []
    if c.n < len(c.seeds_expected):
        marks.append(f"{c.n}/{len(c.seeds_expected)} seeds")
    if c.diverged:
        marks.append(f"{c.diverged} diverged")
    return text + (f" ({', '.join(marks)})" if marks else "")


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
        parts.append(f"{c.incomplete} unfinished/failed")
    if c.missing:
        parts.append(f"{c.missing} not run")
    if c.duplicates:
        parts.append(f"{c.duplicates} duplicate run{'s' if c.duplicates > 1 else ''} ignored")
    return ", ".join(parts)


def verdict_text(c: CellResult) -> str:
    v = c.verdict
    if v == "reproduced":
        return "✓ within 2σ"
    if v == "not reproduced":
        return f"✗ {abs(c.delta) / c.sigma:.1f}σ"  # type: ignore[operator]
    return v


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def wide_markdown(t: TableResult) -> str:
    body = []
    for r in t.rows:
        cells = [t.cell(r, c) for c in t.columns]
        body.append([r, *[ours_text(c) if c else "" for c in cells]])
    return _md_table(["", *t.columns], body)


def long_markdown(t: TableResult) -> str:
    body = []
    for c in t.cells:
        body.append([c.row, c.column, ours_text(c) if c.mean is not None else "", paper_text(c),
                     _f(c.delta, c.metric.digits, sign=True), f"{c.n}/{len(c.seeds_expected)}", note_text(c),
                     verdict_text(c) if c.paper is not None else ""])
    return _md_table(["row", "column", "ours", "paper", "Δ", "seeds", "runs", "verdict"], body)


def _epochs_text(v: Optional[float]) -> str:
    if v is None:
        return ""
    return f"{v:.0f}" if abs(v - round(v)) < 0.05 else f"{v:.1f}"


def epochs_markdown(t: TableResult) -> str:
    """Epochs reached under the budget per cell (Table 6 from the runs), with the paper's counts."""
    body = []
    for r in t.rows:
        body.append([r, *[_epochs_text(c.mean_of(run_epochs)) if (c := t.cell(r, col)) else "" for col in t.columns]])
    paper = [t.spec.paper_epochs(col) for col in t.columns]
    if any(p is not None for p in paper):
        body.append(["paper (Table 6)", *[str(p) if p is not None else "" for p in paper]])
    return _md_table(["epochs", *t.columns], body)


def table6_markdown(tables: Sequence[TableResult]) -> str:
    """Paper Table 6 across specs: per WCT spec, the epochs each optimizer reached (mean over its networks and
    seeds; the paper's count in parentheses)."""
    specs = [t for t in tables if getattr(t.spec, "wct", None) and t.metric.name == t.spec.metric]
    columns = list(dict.fromkeys(col for t in specs for col in t.columns))
    body = []
    for t in specs:
        row = [t.spec.name]
        for col in columns:
            vals = [v for r in t.rows if (c := t.cell(r, col)) and (v := c.mean_of(run_epochs)) is not None]
            ours = _epochs_text(sum(vals) / len(vals)) if vals else ("" if col not in t.columns else "—")
            paper = t.spec.paper_epochs(col) if col in t.columns else None
            row.append(ours + (f" ({paper})" if paper is not None else ""))
        body.append(row)
    return _md_table(["spec", *columns], body)


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


def markdown(tables: Sequence[TableResult]) -> str:
    t0 = tables[0]
    out = [f"# {t0.spec.title}", ""]
    for t in tables:
        out += [f"## {t.metric.label}", "",
                f"Ours: mean ± population std (ddof=0) over seeds {t.cells[0].seeds_expected if t.cells else []}; "
                f"{'higher' if t.metric.higher_is_better else 'lower'} is better. Verdict: |Δ| ≤ 2σ with "
                "σ = sqrt(std_ours² + std_paper²).", "", wide_markdown(t), "", long_markdown(t), ""]
    out += ["## Epochs under the budget (Table 6, from the runs)", "", epochs_markdown(t0), "",
            "## Cost per epoch", "", cost_markdown(t0), ""]
    notes = list(getattr(t0.spec, "notes", []) or [])
    if notes:
        out += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(out)


def csv_text(tables: Sequence[TableResult]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for t in tables:
        for c in t.cells:
            d = c.metric.digits + 2
            w.writerow({
                "table": t.spec.name, "metric": t.metric.name, "row": c.row, "column": c.column,
                "arm_set": c.arm_set, "mean": _f(c.mean, d), "std": _f(c.std, d), "seeds_found": c.n,
                "seeds_expected": len(c.seeds_expected), "diverged": c.diverged, "incomplete": c.incomplete,
                "duplicates": c.duplicates,
                "paper_mean": "" if c.paper is None or c.paper.mean is None else _f(c.paper.mean, d),
                "paper_std": "" if c.paper is None or c.paper.std is None else _f(c.paper.std, d),
                "delta": _f(c.delta, d), "sigma": _f(c.sigma, d) if c.paper is not None else "",
                "verdict": c.verdict if c.paper is not None else "",
                "epochs": _f(c.mean_of(run_epochs), 2), "epoch_seconds": _f(c.mean_of(run_epoch_seconds), 4),
                "peak_memory_mb": _f(None if (m := c.mean_of(run_peak_memory)) is None else m / 2**20, 1),
                "run_ids": " ".join(s.run.run_dir.run_id for s in c.seeds),
            })
    return buf.getvalue()


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"), ("_", r"\_"),
                 ("±", r"$\pm$"), ("λ", r"$\lambda$"), ("×", r"$\times$"), ("—", "---")):
        s = s.replace(a, b)
    return s


def latex(tables: Sequence[TableResult]) -> str:
    out = []
    for t in tables:
        d = t.metric.digits
        out += [f"% {t.spec.title} -- {t.metric.label}; ours (paper)",
                r"\begin{tabular}{l" + "c" * len(t.columns) + "}",
                r"\toprule", " & ".join(["", *(_tex(c) for c in t.columns)]) + r" \\", r"\midrule"]
        for r in t.rows:
            cells = []
            for col in t.columns:
                c = t.cell(r, col)
                if c is None:
                    cells.append("")
                    continue
                ours = (f"${c.mean:.{d}f}_{{\\pm {c.std:.{d}f}}}$" if c.mean is not None
                        else ("div." if c.diverged else "--"))
                paper = paper_text(c)
                cells.append(ours + (f" ({_tex(paper)})" if paper else ""))
            out.append(" & ".join([_tex(r), *cells]) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(out)


def summary_markdown(verdicts: dict[str, list[str]]) -> str:
    total = sum(len(v) for v in verdicts.values())
    lines = [f"{total} cells with a paper value: " + ", ".join(f"{k} {len(v)}" for k, v in verdicts.items())]
    for k in ("reproduced", "not reproduced", "n/a", "diverged", "missing"):
        if verdicts.get(k) and k != "missing":
            lines += ["", f"### {k}", *[f"- {x}" for x in verdicts[k]]]
    if verdicts.get("missing"):
        lines += ["", f"### missing ({len(verdicts['missing'])} cells: no finished run in the store)"]
    return "\n".join(lines)


def console_table(t: TableResult) -> str:
    """A plain-text version of the comparison for the terminal."""
    with_paper = any(c.paper is not None for c in t.cells)
    header = ["row", "column", "ours", "seeds", "epochs", "s/epoch"]
    header += ["paper", "Δ", "verdict"] if with_paper else []
    rows: list[list[Any]] = []
    for c in t.cells:
        sec = c.mean_of(run_epoch_seconds)
        row = [c.row, c.column, ours_text(c), f"{c.n}/{len(c.seeds_expected)}", _epochs_text(c.mean_of(run_epochs)),
               "" if sec is None else f"{sec:.2f}"]
        if with_paper:
            row += [paper_text(c), _f(c.delta, c.metric.digits, sign=True),
                    verdict_text(c) if c.paper is not None else ""]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])

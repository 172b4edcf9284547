"""Reports without a spec: group whatever runs a store holds into a table.

    columns = the values of `group_by` (e.g. optimizer.name), in `columns` order when given (also a filter);
    rows    = the values of the `rows` keys (e.g. model.name), one row when none is given;
    cells   = the runs with that row and column, one value per seed (`results.report.cell_result`).

Runs in one cell that are different experiments (e.g. two learning rates of `adam`) are never averaged
together: the cell is split by the config keys in which they differ, and the column is labelled with them
(`adam (optimizer.lr=0.01)`). The seeds expected in every cell are the seeds found in the whole table (or
`seeds`), so an optimizer with fewer finished seeds than the others is `incomplete`, not silently averaged
over fewer runs. Such tables have no paper values: they drop the paper, Δ, p and verdict columns.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

from fisherbench.core.config import flatten
from fisherbench.core.errors import UserError
from fisherbench.results.report import CellInput, ReportSpec, TableResult, cell_result, get_metric
from fisherbench.results.runs import (
    MATCH_IGNORE,
    StoredRun,
    StoreIndex,
    Where,
    filter_runs,
    lookup,
    progress_printer,
    value_text,
)

_IGNORED_IN_LABELS = ("seed", "results_dir", "overwrite", "logger", "tags", "_choices", *MATCH_IGNORE)


@dataclass
class AdhocRequest:
    group_by: str = "optimizer.name"
    rows: list[str] = field(default_factory=list)  # row keys
    row_values: dict[str, list[str]] = field(default_factory=dict)  # row key -> allowed values (and order)
    columns: Optional[list[str]] = None  # allowed group values (and order)
    where: list[Where] = field(default_factory=list)
    metrics: Optional[list[str]] = None  # default: from the runs' selection metric
    seeds: Optional[list[int]] = None
    name: str = "store"
    title: Optional[str] = None


def parse_key_values(text: str) -> tuple[str, list[str]]:
    """`model.name=a,b` -> ("model.name", ["a", "b"]); `model.name` -> ("model.name", [])."""
    key, _, values = text.partition("=")
    key = key.strip()
    if not key:
        raise UserError(f"{text!r}: expected a config key such as model.name (optionally =VALUE1,VALUE2)")
    return key, [v.strip() for v in values.split(",") if v.strip()]


def default_metric(runs: Sequence[StoredRun]) -> str:
    """The metric a table of these runs shows by default: the paper's for the runs' selection metric."""
    selects = [s for r in runs if isinstance(s := (r.summary or {}).get("select_metric"), str)]
    select = max(set(selects), key=selects.count) if selects else "test/acc1"
    return {"test/acc1": "best_acc1", "val/ppl": "test_ppl", "val/acc1": "test_acc1_at_best_val"}.get(
        select, f"best:{select}")


def _identity_items(run: StoredRun) -> dict[str, str]:
    flat = flatten(json.loads(run.signature)) if not run.signature.startswith("corrupt:") else {}
    return {k: value_text(v) for k, v in flat.items() if not k.startswith(_IGNORED_IN_LABELS)}


def _variant_labels(by_row: Sequence[Sequence[StoredRun]]) -> dict[str, str]:
    """signature -> a label of the config keys in which experiments of one column differ within a row ('' when
    no row of the column holds two experiments). Keys that differ only between rows (the rows' own keys and
    what follows from them) are left out; every experiment of the column is labelled with the same keys."""
    items = {r.signature: _identity_items(r) for runs in by_row for r in runs}
    differing: set[str] = set()
    for runs in by_row:
        sigs = list(dict.fromkeys(r.signature for r in runs))
        if len(sigs) > 1:
            keys = {k for s in sigs for k in items[s]}
            differing |= {k for k in keys if len({items[s].get(k, "—") for s in sigs}) > 1}
    shown = sorted(differing)[:3]
    more = ", …" if len(differing) > 3 else ""
    return {s: (", ".join(f"{k}={items[s].get(k, '—')}" for k in shown) + more if shown else "") for s in items}


def build(index: StoreIndex, req: AdhocRequest) -> list[TableResult]:
    """The tables (one per metric) of the runs of `index` selected and grouped as `req` says."""
    runs = filter_runs(index.runs, req.where)
    for key, values in req.row_values.items():
        if values:
            runs = [r for r in runs if value_text(r.get(key)) in values]
    runs = [r for r in runs if lookup(r.config, req.group_by, None) is not None]
    if req.columns:
        runs = [r for r in runs if value_text(r.get(req.group_by)) in req.columns]
    if not runs:
        known = sorted({value_text(r.get(req.group_by)) for r in index.runs if r.get(req.group_by) is not None})
        raise UserError(f"no runs in {index.root} match the selection ({req.group_by}"
                        + (f" in {','.join(req.columns)}" if req.columns else "")
                        + "".join(f", {w.text}" for w in req.where)
                        + f"); the store has {len(index.runs)} readable runs"
                        + (f" with {req.group_by} = {', '.join(known)}" if known else ""))
    seeds = sorted({r.seed for r in runs if r.seed >= 0}) if req.seeds is None else list(req.seeds)

    def row_label(run: StoredRun) -> str:
        if not req.rows:
            return _common_label(runs)
        return " · ".join(_value_label(k, run.get(k)) for k in req.rows)

    # cells: (row, column value) -> runs, then split by experiment
    groups: dict[tuple[str, str], list[StoredRun]] = {}
    for r in runs:
        groups.setdefault((row_label(r), value_text(r.get(req.group_by))), []).append(r)
    wanted_rows = [" · ".join(_value_label(k, v) for k, v in zip(req.rows, vs)) for vs in _product_order(req)]
    row_order = _ordered([k[0] for k in groups], wanted_rows or None)
    col_order = _ordered([k[1] for k in groups], req.columns)
    cells_in: list[tuple[str, str, list[StoredRun]]] = []
    columns: list[str] = []
    for col in col_order:
        labels = _variant_labels([groups.get((row, col), []) for row in row_order])
        for row in row_order:
            by_sig: dict[str, list[StoredRun]] = {}
            for r in groups.get((row, col), []):
                by_sig.setdefault(r.signature, []).append(r)
            for sig, members in by_sig.items():
                label = f"{col} ({labels[sig]})" if labels.get(sig) else col
                cells_in.append((row, label, members))
                if label not in columns:
                    columns.append(label)
    order = {(r, c): i for i, (r, c) in enumerate((r, c) for r in row_order for c in columns)}
    cells_in.sort(key=lambda rcm: order[(rcm[0], rcm[1])])  # row by row, as spec tables
    metrics = req.metrics or [default_metric(runs)]
    spec = ReportSpec(
        # the title names what is compared, never the store's path (figures carry it; the path is machine-specific)
        name=req.name, title=req.title or f"{_common_label(runs)}: runs by {req.group_by}", seeds=seeds,
        metrics=metrics,
        cells=[CellInput(row, col, "store", members[0].config) for row, col, members in cells_in],
        best="row", best_label=f"best {req.group_by} per row",
    )
    tables = []
    progress = progress_printer("scoring cells")
    for name in metrics:
        metric = get_metric(name)
        cells = []
        for i, (row, col, members) in enumerate(cells_in):
            cells.append(cell_result(row, col, "store", metric, seeds, members))
            progress(i + 1, len(cells_in))
        rows = [r for r in row_order if any(c.row == r for c in cells)]
        cols = [c for c in columns if any(x.column == c for x in cells)]
        tables.append(TableResult(spec, metric, cells, rows, cols))
    return tables


def _value_label(key: str, value) -> str:
    """A row label: the value of a name (`small_cnn`), `key=value` for anything else (`model.width=16`)."""
    text = value_text(value)
    return text if key.endswith(".name") else f"{key}={text}"


def _common_label(runs: Sequence[StoredRun]) -> str:
    parts = []
    for key in ("model.name", "data.name"):
        values = {value_text(r.get(key)) for r in runs}
        if len(values) == 1:
            parts.append(values.pop())
    return " · ".join(parts) or "all runs"


def _product_order(req: AdhocRequest) -> list[list[str]]:
    """Row labels in the order the user listed their values (only when every row key has values)."""
    if not req.rows or not all(req.row_values.get(k) for k in req.rows):
        return []
    out: list[list[str]] = [[]]
    for k in req.rows:
        out = [[*prefix, v] for prefix in out for v in req.row_values[k]]
    return out


def _ordered(found: Sequence[str], wanted: Optional[Sequence[str]]) -> list[str]:
    seen = list(dict.fromkeys(found))
    if not wanted:
        return sorted(seen, key=_natural)
    return [w for w in wanted if w in seen] + sorted((f for f in seen if f not in wanted), key=_natural)


def _natural(text: str) -> tuple:
    """Sort numbers by value (lr 0.01 before lr 0.1), text alphabetically."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def describe(req: AdhocRequest) -> str:
    parts = [f"columns: {req.group_by}"]
    if req.rows:
        parts.append(f"rows: {', '.join(req.rows)}")
    parts += [f"where {w.text}" for w in req.where]
    return "; ".join(parts)

"""Tables (CSV + Markdown + JSON) of layer diagnostics, and logging of tables and figures to W&B."""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from fisherbench.analysis.diagnostics import LayerAnalysis
from fisherbench.engine.loggers import resolve_wandb_mode

FACTOR_COLUMNS = (
    "dim", "analysed_dim", "diag_energy_ratio", "snr_db", "snr_db_noise_free", "snr_db_notebook",
    "gershgorin_dominant_frac", "gershgorin_median_radius_over_centre", "noise_max_abs_shift",
    "noise_max_rel_shift_above_kaiser", "frac_eig_above_damping", "eig_max", "eig_min", "trace_over_dim",
)
LAYER_COLUMNS = (
    "damping", "kron_diag_error", "kron_frac_eig_above_damping", "official_frac_above_damping",
    "official_F_over_lambda_max", "state_frac_above_damping", "state_F_over_lambda_max",
)
# (header, column, format) of the short Markdown table
MARKDOWN = (
    ("step", "step", "d"), ("layer", "layer", "s"), ("type", "kind", "s"), ("H dim", "H_dim", "dim"),
    ("S dim", "S_dim", "dim"), ("H diag energy", "H_diag_energy_ratio", ".3f"),
    ("S diag energy", "S_diag_energy_ratio", ".3f"), ("H SNR dB", "H_snr_db", ".1f"),
    ("S SNR dB", "S_snr_db", ".1f"), ("H dominant rows", "H_gershgorin_dominant_frac", ".2f"),
    ("S dominant rows", "S_gershgorin_dominant_frac", ".2f"), ("H eig>λ", "H_frac_eig_above_damping", ".3f"),
    ("S eig>λ", "S_frac_eig_above_damping", ".3f"), ("H⊗S eig>λ", "kron_frac_eig_above_damping", ".4f"),
    ("diag-approx error", "kron_diag_error", ".3f"), ("official SH>λ", "official_frac_above_damping", ".3f"),
    ("official max F/λ", "official_F_over_lambda_max", ".4f"), ("state max F/λ", "state_F_over_lambda_max", ".4f"),
)


def layer_row(la: LayerAnalysis) -> dict[str, Any]:
    row: dict[str, Any] = {"step": la.step, "layer": la.name, "kind": la.kind}
    for key in ("H", "S"):
        metrics = getattr(la, key).metrics
        row.update({f"{key}_{c}": metrics.get(c, math.nan) for c in FACTOR_COLUMNS})
    row.update({c: la.metrics.get(c, math.nan) for c in LAYER_COLUMNS})
    return row


def _fmt(value: Any, fmt: str, row: dict[str, Any], column: str) -> str:
    if fmt == "dim":  # "3137 (1024)" when a sub-block was analysed
        analysed = row.get(column.replace("_dim", "_analysed_dim"))
        return f"{value} ({analysed})" if analysed is not None and analysed != value else f"{value}"
    if isinstance(value, float) and math.isnan(value):
        return "–"
    return format(value, fmt) if fmt != "s" else str(value)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    cols = [c for c in MARKDOWN if any(not _missing(r.get(c[1])) for r in rows)]
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), f, r, c) for _, c, f in cols) + " |")
    return "\n".join(lines) + "\n"


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def write_tables(rows: Sequence[dict[str, Any]], out_dir: Path, notes: Sequence[str] = ()) -> list[Path]:
    """fisher_table.csv (every column), fisher_table.md (the short table + notes), fisher_table.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0].keys()) if rows else ["step", "layer"]
    csv_path, md_path, json_path = (out_dir / f"fisher_table.{e}" for e in ("csv", "md", "json"))
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    md = markdown_table(rows)
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    md_path.write_text(md)
    json_path.write_text(json.dumps([{k: _json_safe(v) for k, v in r.items()} for r in rows], indent=1) + "\n")
    return [csv_path, md_path, json_path]


def _json_safe(v: Any) -> Any:
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


# -------------------------------------------------------------------------------------------- W&B
def log_wandb(out_dir: Path, figures: Sequence[Path], rows: Sequence[dict[str, Any]], *, mode: str = "auto",
              project: str = "fisherbench", entity: Optional[str] = None, run_id: Optional[str] = None,
              config: Optional[dict[str, Any]] = None) -> Optional[str]:
    """Log the table and the PNG figures to W&B (offline/online per `mode`, as the trainer's logger).

    With `run_id` (a fisherbench run) the figures go to that run (resumed). Returns the W&B run directory,
    or None when disabled or failed (a failure is reported and never raises: the files are the result).
    """
    resolved = resolve_wandb_mode(mode)
    if resolved == "disabled":
        return None
    try:
        import wandb  # lazy: W&B is opt-in (--wandb), ~0.5 s to import

        run = wandb.init(project=project, entity=entity, id=run_id, resume="allow" if run_id else None,
                         dir=str(out_dir), mode=resolved, job_type="fisher_analysis", config=config or {},
                         settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        payload: dict[str, Any] = {}
        if rows:
            columns = list(rows[0].keys())
            payload["fisher_analysis/table"] = wandb.Table(
                columns=columns, data=[[_json_safe(r.get(c)) for c in columns] for r in rows])
        for path in figures:
            if path.suffix == ".png":
                payload[f"fisher_analysis/{path.stem}"] = wandb.Image(str(path))
        run.log(payload)
        run_dir = str(getattr(run, "dir", "") or "")
        run.finish()
        return run_dir
    except Exception as exc:  # noqa: BLE001 - logging never fails the analysis
        print(f"[fisher_analysis] W&B logging failed ({type(exc).__name__}: {exc}); the files in {out_dir} are "
              "unaffected", file=sys.stderr)
        return None

"""The results store: one directory per run, named by a hash of the resolved config + seed.

Layout of `<results_dir>/<run_id>/`:
  config.yaml    resolved config (written at start)
  meta.json      git SHA/dirty, versions, device, dataset fingerprint, config choices (written at start)
  metrics.jsonl  one JSON object per evaluation, appended and flushed (never rewritten)
  summary.json   written atomically at the end: status, best/final metrics, ledger, budget, memory, ...
  error.txt      traceback of a failed run
  checkpoint.pt  latest checkpoint while a run is unfinished
A directory without `summary.json` is an unfinished (running or interrupted) run. The store is the source
of truth; W&B mirrors it and reports read only the store.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

# Statuses a finished run can have; `FINAL_STATUSES` are not re-run unless `overwrite=true`.
STATUSES = ("completed", "budget_exhausted", "diverged", "oom", "failed", "preempted")
FINAL_STATUSES = ("completed", "budget_exhausted", "diverged")
ID_LENGTH = 16


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float):
        if math.isfinite(obj) and obj == int(obj) and abs(obj) < 2**53:
            return int(obj)  # 1.0 and 1 are the same setting
        return repr(obj)
    return obj


def run_id(identity: dict[str, Any]) -> str:
    """Stable hash of the identity part of a resolved config (which must include the seed)."""
    if "seed" not in identity:
        raise ValueError("a run identity must include the seed")
    blob = json.dumps(_canonical(identity), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:ID_LENGTH]


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so readers never mistake them for numbers (or for 0)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(obj), indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class RunDir:
    """Writer/reader for one run directory."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def run_id(self) -> str:
        return self.path.name

    config_path = property(lambda self: self.path / "config.yaml")
    meta_path = property(lambda self: self.path / "meta.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    summary_path = property(lambda self: self.path / "summary.json")
    error_path = property(lambda self: self.path / "error.txt")
    checkpoint_path = property(lambda self: self.path / "checkpoint.pt")

    def exists(self) -> bool:
        return self.config_path.exists()

    def create(self, config: dict[str, Any], meta: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))
        atomic_write_json(self.meta_path, meta)

    def update_meta(self, **fields: Any) -> None:
        meta = read_json(self.meta_path) or {}
        meta.update(fields)
        atomic_write_json(self.meta_path, meta)

    def append_metrics(self, row: dict[str, Any]) -> None:
        line = json.dumps(_clean(row), sort_keys=True, default=_json_default)
        with open(self.metrics_path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_metrics(self, keep_rows: int) -> None:
        """Keep the first `keep_rows` rows (resume: drop rows written after the checkpoint we resume from)."""
        rows = self.metrics_lines()
        if len(rows) > keep_rows:
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in rows[:keep_rows]))

    def metrics_lines(self) -> list[str]:
        if not self.metrics_path.exists():
            return []
        # a torn last line (killed mid-write) is dropped
        lines = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                json.loads(line)
            except json.JSONDecodeError:
                continue
            lines.append(line)
        return lines

    def metrics(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.metrics_lines()]

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary_path, summary)

    def summary(self) -> Optional[dict[str, Any]]:
        return read_json(self.summary_path)

    def meta(self) -> Optional[dict[str, Any]]:
        return read_json(self.meta_path)

    def config(self) -> Optional[dict[str, Any]]:
        try:
            return yaml.safe_load(self.config_path.read_text())
        except FileNotFoundError:
            return None

    def status(self) -> str:
        """Status from the summary, or `unfinished` (running or interrupted) when there is none."""
        s = self.summary()
        return s.get("status", "unfinished") if s else "unfinished"

    def is_final(self) -> bool:
        return self.status() in FINAL_STATUSES


def iter_run_dirs(root: Path | str) -> Iterator[RunDir]:
    root = Path(root)
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if p.is_dir() and (p / "config.yaml").exists():
            yield RunDir(p)

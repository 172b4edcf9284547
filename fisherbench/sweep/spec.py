"""Sweep specs: one YAML file per paper table/figure (`fisherbench/configs/sweep/<name>.yaml`) that says which runs make
the table and what the paper reported for each cell. The sweep expands it into runs; the report reads the
same spec to find those runs in the store, so every fact (grid, recipes, paper values) is written once.

A spec (keys; `extends` merges other specs first, later files win: a name is looked up next to the spec, then
among the built-in specs, so a spec of your own can extend `_fixed` or `table2_cifar10`):

    title:    "Table 2 - CIFAR-10 with Cutout"
    preset:   table2_cifar10            # fisherbench/configs/experiment/<preset>.yaml: data, batch size, schedule, eval
    seeds:    [0, 1, 2, 3, 4]
    metric:   best_acc1                 # see results.report.METRICS
    overrides: [...]                    # every run of this sweep (after the preset)
    families:                           # recipe families; a family inherits its `base`'s overrides
      cnn: {}
      mobilenet: {base: cnn, overrides: [optimizer.weight_decay=1.0e-5]}
    rows:                               # table rows (networks, batch sizes, learning rates, ...)
      ResNet-18: {family: cnn, overrides: [model=resnet18_cifar], tags: {...}}
    arms:                               # column sets; `main` = the paper's columns, `fixed` = ablation arms
      main:
        Adam: {cnn: [optimizer=adam], vit: [optimizer=adamw]}   # per family (nearest family in the chain)
        SGD: [optimizer=sgd]                                     # or one list for every family
    cells:    {ResNet-18: {Adam: [...]}}  # per-cell overrides, applied last
    scale:    {ResNet-18: {optimizer.lr: 0.1}}  # multiply a composed value (per row; e.g. LR grids)
    wct:                                # the wall-clock protocol (omit to keep the preset's budget)
      reference: {cnn: adafisher, vit: adafisherw_vit}   # optimizer option whose time is the budget
      epochs: 200                       # ... for this many epochs
      paper_epochs: {Adam: 210, ...}    # the paper's resulting epoch counts (Table 6)
    paper:    {ResNet-18: {Adam: "94.85±0.10", AdaHessian: "—"}}   # the paper's value per cell
    extra_metrics: {best_acc5: {ResNet-50: {Adam: 88.37}}}         # further metrics with paper values
    grid:     true                      # rows are values of one setting: name each column's best row
    select:   best_val_acc1             # what picks that row / a search's objective (default: the validation
                                        # counterpart of `metric` where a val split exists; fisherbench/sweep/selection.py)
    search:   {...}                     # an Optuna search over one cell (fisherbench/sweep/search.py)
    baseline: {row: R, column: C}       # reports compare every cell with it (Welch, Holm-corrected per column)
    equivalence_margin: 0.3             # δ of the reports' "reproduced" test (metric units; docs/reports.md)

Overrides are Hydra override strings; within a cell they are merged by key in the order preset, sweep,
family chain, column, row, cell, WCT budget, user, so a later source wins on the same key: a column's recipe
beats its family's defaults (e.g. its own weight decay), a row's setting beats the recipe (an LR-grid row
sets `optimizer.lr`). A column or row set to `null` (e.g. in a spec that extends another) is dropped.

Specs are configuration that users exchange, so an override line can never run code: a `_target_` anywhere
in a line (Hydra would instantiate it, e.g. through `hydra.callbacks`) and any `hydra.*` / `hydra/` key are
refused, except the launcher resource settings of `SPEC_LAUNCHER_KEYS` in the top-level `overrides`
(`hydra.launcher.timeout_min=1440`): those configure the submitit launcher, never a run.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from fisherbench.core import plugins
from fisherbench.core.config import CONFIG_DIR
from fisherbench.core.scores import METRICS, PaperValue

SPEC_DIR = CONFIG_DIR / "sweep"
ARM_SETS = ("main", "fixed")
WCT_MODES = ("measured", "paper")
# Optimizer options that do not change the cost of a step: an arm that differs from the WCT reference only in
# these *is* the reference (it trains the reference epochs); any other difference (e.g. `variant`) is timed.
COST_NEUTRAL_OPTIONS = ("lr", "weight_decay")
NO_RESULT = ("—", "-", "–", "n/a", None)
# `hydra.launcher.<key>` settings a spec may carry (top-level `overrides` only): the resources its runs need.
# Left out on purpose: `setup`, `srun_args` and `additional_parameters` (shell commands and sbatch options),
# `submitit_folder` (where files are written), `_target_` (which class runs).
SPEC_LAUNCHER_KEYS = ("timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes",
                      "partition", "qos", "comment", "constraint", "exclude", "gres", "cpus_per_gpu",
                      "gpus_per_task", "mem_per_gpu", "mem_per_cpu", "account", "signal_delay_s",
                      "max_num_timeout", "array_parallelism")


class SpecError(ValueError):
    """A sweep spec that cannot be used; the message names the file and what to fix."""


# ------------------------------------------------------------------------------------------ overrides
def override_key(override: str) -> str:
    """`optimizer.lr=0.1` -> `optimizer.lr`; `+x=1` -> `x`; `~x` -> `x`."""
    key = override.split("=", 1)[0].strip()
    return key.lstrip("+~")


def merge_overrides(*sources: Iterable[str]) -> list[str]:
    """Merge override lists by key; a later source replaces an earlier value but keeps its position."""
    merged: dict[str, str] = {}
    for source in sources:
        for ov in source or ():
            merged[override_key(str(ov))] = str(ov)
    return list(merged.values())


def is_launcher_override(override: str) -> bool:
    """`hydra.launcher.timeout_min=1440`: one of the launcher settings a spec may carry (SPEC_LAUNCHER_KEYS)."""
    key = override_key(override)
    return key.startswith("hydra.launcher.") and key[len("hydra.launcher."):] in SPEC_LAUNCHER_KEYS


def check_spec_override(override: Any, where: str, launcher_ok: bool = False) -> str:
    """An override line of a spec, refused (SpecError) when it could make Hydra run code or reconfigure itself."""
    if not isinstance(override, (str, int, float, bool)):
        raise SpecError(f"{where}: an override must be a `key=value` string, got {override!r}")
    text = str(override)
    if "_target_" in text:
        raise SpecError(f"{where}: {text!r}: `_target_` is not allowed in a sweep spec (Hydra would import and "
                        "call it). Plug-in optimizers belong in a config group file of your own, not in a spec")
    key = override_key(text)
    if key == "hydra" or key.startswith(("hydra.", "hydra/")):
        if launcher_ok and is_launcher_override(text):
            return text
        allowed = ", ".join(f"hydra.launcher.{k}" for k in SPEC_LAUNCHER_KEYS)
        raise SpecError(f"{where}: {text!r}: a sweep spec may not set Hydra's own settings. Allowed (in the "
                        f"top-level `overrides` only): {allowed}. Pass other launcher settings on the "
                        "command line, where they are yours")
    return text


def override_value(overrides: Iterable[str], key: str) -> Optional[str]:
    for ov in overrides:
        if override_key(ov) == key and "=" in ov:
            return ov.split("=", 1)[1]
    return None


# -------------------------------------------------------------------------------------- paper values
_PM = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*(?:±|\+-|\+/-)\s*(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*$")


def parse_paper_value(raw: Any) -> PaperValue:
    if raw is None or (isinstance(raw, str) and raw.strip() in NO_RESULT):
        return PaperValue(None, None, "—")
    if isinstance(raw, (int, float)):
        return PaperValue(float(raw), None, str(raw))
    text = str(raw).strip()
    m = _PM.match(text)
    if m:
        return PaperValue(float(m.group(1)), float(m.group(2)), text)
    try:
        return PaperValue(float(text), None, text)
    except ValueError:
        raise SpecError(f"paper value {raw!r} is neither a number, 'mean±std', nor '—'") from None


# ------------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class Cell:
    """One table cell: a row x column of an arm set, with the overrides that define its runs."""

    row: str
    column: str
    arm_set: str
    family: str
    overrides: tuple[str, ...]  # without experiment/seed/budget
    scale: tuple[tuple[str, float], ...] = ()
    tags: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.row, self.column)

    @property
    def optimizer_option(self) -> Optional[str]:
        return override_value(self.overrides, "optimizer")


@dataclass
class SweepSpec:
    name: str
    title: str
    preset: Optional[str]
    seeds: list[int]
    metric: str
    overrides: list[str]
    families: dict[str, dict[str, Any]]
    rows: dict[str, dict[str, Any]]
    arms: dict[str, dict[str, Any]]
    cells_overrides: dict[str, dict[str, list[str]]]
    scale: dict[str, dict[str, float]]
    wct: Optional[dict[str, Any]]
    paper: dict[str, dict[str, Any]]
    extra_metrics: dict[str, dict[str, dict[str, Any]]]
    notes: list[str] = field(default_factory=list)
    search: Optional[dict[str, Any]] = None
    path: Optional[Path] = None
    grid: bool = False
    select: Optional[str] = None
    baseline: Optional[tuple[str, str]] = None  # (row, column): reports compare every cell with it
    # metric -> δ of the reports' equivalence test ("reproduced"); a plain number in the spec is the main metric's
    equivalence_margin: dict[str, float] = field(default_factory=dict)
    launcher: list[str] = field(default_factory=list)  # `hydra.launcher.*` resource settings (SPEC_LAUNCHER_KEYS)

    # ---------------------------------------------------------------------------------------- families
    def family_chain(self, family: str) -> list[str]:
        """`focalnet` -> [vit, focalnet] (base first)."""
        chain: list[str] = []
        name: Optional[str] = family
        while name is not None:
            if name in chain:
                raise SpecError(f"{self._where}: family cycle through {name!r}")
            if name not in self.families:
                raise SpecError(f"{self._where}: unknown family {name!r} (families: {', '.join(self.families)})")
            chain.insert(0, name)
            name = (self.families[name] or {}).get("base")
        return chain

    def columns(self, arm_sets: Iterable[str] = ("main",)) -> list[tuple[str, str]]:
        """(arm set, column) in spec order."""
        out = []
        for arm_set in arm_sets:
            if arm_set not in self.arms:
                raise SpecError(f"{self._where}: no arm set {arm_set!r} (has: {', '.join(self.arms)})")
            out.extend((arm_set, col) for col, entry in self.arms[arm_set].items() if entry is not None)
        return out

    def column_overrides(self, arm_set: str, column: str, family: str) -> Optional[list[str]]:
        """The column's overrides for `family` (nearest family in its chain); None = not run for it."""
        entry = self.arms[arm_set][column]
        if isinstance(entry, list):
            return [str(x) for x in entry]
        if not isinstance(entry, dict):
            raise SpecError(f"{self._where}: arms.{arm_set}.{column} must be a list or a family mapping")
        for fam in reversed(self.family_chain(family)):
            if fam in entry:
                return None if entry[fam] is None else [str(x) for x in entry[fam]]
        return None

    # ------------------------------------------------------------------------------------------- cells
    def cells(self, arm_sets: Iterable[str] = ("main",), rows: Optional[Iterable[str]] = None,
              columns: Optional[Iterable[str]] = None) -> list[Cell]:
        want_rows = list(rows) if rows is not None else None
        want_cols = list(columns) if columns is not None else None
        for r in want_rows or ():
            if r not in self.rows:
                raise SpecError(f"{self._where}: no row {r!r} (rows: {', '.join(self.rows)})")
        out: list[Cell] = []
        for row, rspec in self.rows.items():
            if rspec is None or (want_rows is not None and row not in want_rows):
                continue
            rspec = rspec or {}
            family = rspec.get("family", "default")
            fam_ovs = [(self.families[f] or {}).get("overrides", []) for f in self.family_chain(family)]
            for arm_set, column in self.columns(arm_sets):
                if want_cols is not None and column not in want_cols:
                    continue
                col_ovs = self.column_overrides(arm_set, column, family)
                if col_ovs is None:
                    continue
                cell_ovs = (self.cells_overrides.get(row) or {}).get(column)
                if cell_ovs is None and column in (self.cells_overrides.get(row) or {}):
                    continue  # explicitly excluded cell
                ovs = merge_overrides(self.overrides, *fam_ovs, col_ovs, rspec.get("overrides", []), cell_ovs or [])
                scale = {**(self.scale.get(row) or {}), **(rspec.get("scale") or {})}
                out.append(Cell(row, column, arm_set, family, tuple(ovs), tuple(sorted(scale.items())),
                                tuple(sorted((rspec.get("tags") or {}).items()))))
        return out

    # --------------------------------------------------------------------------------------------- WCT
    def reference_option(self, family: str) -> Optional[str]:
        if not self.wct:
            return None
        ref = self.wct.get("reference")
        if isinstance(ref, dict):
            for fam in reversed(self.family_chain(family)):
                if fam in ref:
                    return ref[fam]
            return ref.get("default")
        return ref

    def is_reference_arm(self, cell: Cell) -> bool:
        """The arm whose time defines the WCT budget: the reference option, modulo cost-neutral overrides."""
        if cell.optimizer_option is None or cell.optimizer_option != self.reference_option(cell.family):
            return False
        tuned = [override_key(ov) for ov in cell.overrides if override_key(ov).startswith("optimizer.")]
        return all(k.split(".", 1)[1] in COST_NEUTRAL_OPTIONS for k in tuned)

    def paper_epochs(self, column: str) -> Optional[int]:
        if not self.wct:
            return None
        value = (self.wct.get("paper_epochs") or {}).get(column)
        return int(value) if value is not None else None

    def budget_overrides(self, cell: Cell, mode: str = "measured", epochs: Optional[float] = None) -> list[str]:
        """Budget overrides of a cell under the WCT protocol (empty when the spec has no `wct`).

        measured: the reference arm trains E = `epochs` (default: the spec's `wct.epochs`; a command line's
        `budget.reference_epochs` is passed here, so it changes the reference arm too) epochs; every other arm
        gets `budget=reference` for the time of those E epochs (derived on the machine that runs it).
        A whole E trains as `budget=epochs`; a fractional E as `budget=reference` against itself, which trains
        round(E x steps per epoch) steps: the one rule every equal-time lookup uses. paper: the paper's
        Table 6 count where it has one (other arms fall back to measured).
        """
        if not self.wct:
            return []
        if mode not in WCT_MODES:
            raise SpecError(f"wct mode must be one of {', '.join(WCT_MODES)}, got {mode!r}")
        epochs = self.wct["epochs"] if epochs is None else epochs
        if mode == "paper":
            n = self.paper_epochs(cell.column)
            if n is not None:
                return ["budget=epochs", f"budget.epochs={n}"]
        ref = self.reference_option(cell.family)
        if ref is None:
            raise SpecError(f"{self._where}: wct.reference has no entry for family {cell.family!r}")
        if self.is_reference_arm(cell) and float(epochs).is_integer():
            return ["budget=epochs", f"budget.epochs={int(epochs)}"]
        return ["budget=reference", f"budget.reference_optimizer={ref}", f"budget.reference_epochs={epochs:g}"]

    # ------------------------------------------------------------------------------------------- paper
    def paper_value(self, row: str, column: str, metric: Optional[str] = None) -> Optional[PaperValue]:
        table = self.paper if metric in (None, self.metric) else self.extra_metrics.get(metric, {})
        row_values = table.get(row) or {}
        if column not in row_values:
            return None
        return parse_paper_value(row_values[column])

    def metrics(self) -> list[str]:
        return [self.metric, *self.extra_metrics]

    @property
    def _where(self) -> str:
        return f"sweep spec {self.path or self.name}"


# ------------------------------------------------------------------------------------------- loading
def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _resolve_parent(parent: Any, child: Path, spec_dir: Path) -> Path:
    """Where `extends: [name]` of `child` points: a file next to `child`, else a built-in spec (`spec_dir`)."""
    if not isinstance(parent, str) or not parent.strip():
        raise SpecError(f"sweep spec {child}: `extends` entries must be spec names, got {parent!r}")
    name = parent if parent.endswith(".yaml") else f"{parent}.yaml"
    candidates = [child.parent / name]
    if not Path(name).is_absolute() and "/" not in parent:
        candidates.append(spec_dir / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    looked = " or ".join(str(c) for c in dict.fromkeys(candidates))
    raise SpecError(f"sweep spec {child}: `extends: {parent}` names no spec (looked for {looked}); built-in "
                    f"specs and parts: {', '.join(sorted(p.stem for p in spec_dir.glob('*.yaml')))}")


def _load_raw(path: Path, seen: tuple[Path, ...] = (), spec_dir: Path = SPEC_DIR) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise SpecError(f"sweep spec {path}: `extends` cycle ({' -> '.join(p.name for p in (*seen, path))})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SpecError(f"sweep spec {path} is not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"sweep spec {path} cannot be read: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"sweep spec {path} must be a mapping")
    parents = raw.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list):
        raise SpecError(f"sweep spec {path}: `extends` must be a list of spec names, got {parents!r}")
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = _deep_merge(merged, _load_raw(_resolve_parent(parent, path, spec_dir), (*seen, path), spec_dir))
    return _deep_merge(merged, raw)


# the shape of each top-level key (checked before anything reads it, so a wrong shape is a message, not a crash)
_SHAPES: dict[str, tuple[type, ...]] = {
    "title": (str,), "preset": (str,), "seeds": (list,), "metric": (str,), "overrides": (list,),
    "families": (dict,), "rows": (dict,), "arms": (dict,), "cells": (dict,), "scale": (dict,), "wct": (dict,),
    "paper": (dict,), "extra_metrics": (dict,), "notes": (list,), "search": (dict,), "grid": (bool,),
    "select": (str,),
}


def _check_shapes(raw: dict[str, Any], path: Path) -> None:
    for key, types in _SHAPES.items():
        value = raw.get(key)
        if value is not None and not isinstance(value, types):
            want = " or ".join("a mapping" if t is dict else "a list" if t is list else t.__name__ for t in types)
            raise SpecError(f"sweep spec {path}: `{key}` must be {want}, got {type(value).__name__} {value!r}")
    for section in ("families", "rows", "arms", "cells", "scale"):
        for name, value in (raw.get(section) or {}).items():
            if value is not None and not isinstance(value, (dict, list) if section == "arms" else dict):
                raise SpecError(f"sweep spec {path}: `{section}.{name}` must be a mapping, got {value!r}")


def _override_lists(raw: dict[str, Any]) -> Iterable[tuple[str, Any]]:
    """(where, list of override lines) for every place of a spec that holds override lines."""
    for name, fam in (raw.get("families") or {}).items():
        yield f"families.{name}.overrides", (fam or {}).get("overrides")
    for name, row in (raw.get("rows") or {}).items():
        yield f"rows.{name}.overrides", (row or {}).get("overrides")
    for arm_set, columns in (raw.get("arms") or {}).items():
        for column, entry in (columns or {}).items():
            if isinstance(entry, dict):
                for fam, lines in entry.items():
                    yield f"arms.{arm_set}.{column}.{fam}", lines
            else:
                yield f"arms.{arm_set}.{column}", entry
    for row, columns in (raw.get("cells") or {}).items():
        for column, lines in (columns or {}).items():
            yield f"cells.{row}.{column}", lines
    search = raw.get("search") or {}
    if isinstance(search, dict):
        yield "search.overrides", search.get("overrides")
        params = search.get("params")
        if isinstance(params, dict):
            yield "search.params", [f"{key}=" for key in params]


def _checked_overrides(raw: dict[str, Any], path: Path) -> tuple[list[str], list[str]]:
    """(run overrides, launcher overrides) of the top level; refuses a code-running line anywhere in the spec."""
    top = [check_spec_override(x, f"sweep spec {path}: overrides", launcher_ok=True) for x in raw.get("overrides") or []]
    for where, lines in _override_lists(raw):
        if lines is None:
            continue
        if not isinstance(lines, list):
            raise SpecError(f"sweep spec {path}: `{where}` must be a list of overrides, got {lines!r}")
        for line in lines:
            check_spec_override(line, f"sweep spec {path}: {where}")
    return [o for o in top if not is_launcher_override(o)], [o for o in top if is_launcher_override(o)]


def spec_dirs(spec_dir: Optional[Path] = None) -> list[Path]:
    """Where specs are looked up by name: `spec_dir` if given, else the `sweep/` folder of every user config
    folder (`$FISHERBENCH_CONFIG_PATH`, `--config-dir`) and then the suite's own specs."""
    if spec_dir is not None:
        return [Path(spec_dir)]
    return [*(d / "sweep" for d in plugins.config_dirs()), SPEC_DIR]


def available_specs(spec_dir: Optional[Path] = None) -> list[str]:
    """Spec names (files starting with `_` are shared parts, not sweeps)."""
    return sorted({p.stem for d in spec_dirs(spec_dir) for p in d.glob("*.yaml") if not p.stem.startswith("_")})


def load_spec(name_or_path: str | Path, spec_dir: Optional[Path] = None) -> SweepSpec:
    path = Path(name_or_path)
    if path.suffix != ".yaml":
        candidates = [d / f"{name_or_path}.yaml" for d in spec_dirs(spec_dir)]
        path = next((c for c in candidates if c.exists()), candidates[-1])
    if not path.exists():
        names = ", ".join(available_specs(spec_dir))
        raise SpecError(f"no sweep spec {name_or_path!r} (looked for {path}); available: {names}")
    try:
        return _load_spec(path, SPEC_DIR if spec_dir is None else Path(spec_dir))
    except SpecError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a shape _check_shapes does not know yet
        raise SpecError(f"sweep spec {path} is malformed: {type(exc).__name__}: {exc}") from None


def _load_spec(path: Path, spec_dir: Path) -> SweepSpec:
    raw = _load_raw(path, spec_dir=spec_dir)
    known = {"title", "preset", "seeds", "metric", "overrides", "families", "rows", "arms", "cells", "scale",
             "wct", "paper", "extra_metrics", "notes", "search", "grid", "select", "baseline",
             "equivalence_margin"}
    unknown = set(raw) - known
    if unknown:
        raise SpecError(f"sweep spec {path}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    if not raw.get("rows") or not raw.get("arms"):
        raise SpecError(f"sweep spec {path} needs `rows` and `arms`")
    _check_shapes(raw, path)
    overrides, launcher = _checked_overrides(raw, path)
    families = raw.get("families") or {}
    families.setdefault("default", {})
    spec = SweepSpec(
        name=path.stem,
        title=str(raw.get("title", path.stem)),
        preset=raw.get("preset"),
        seeds=[int(s) for s in raw.get("seeds", [0])],
        metric=str(raw.get("metric", "best_acc1")),
        overrides=overrides,
        families=families,
        rows=raw["rows"],
        arms=raw["arms"],
        cells_overrides=raw.get("cells") or {},
        scale=raw.get("scale") or {},
        wct=raw.get("wct"),
        paper=raw.get("paper") or {},
        extra_metrics=raw.get("extra_metrics") or {},
        notes=[str(n) for n in raw.get("notes") or []],
        search=raw.get("search"),
        path=path,
        grid=bool(raw.get("grid", False)),
        select=str(raw["select"]) if raw.get("select") else None,
        baseline=_baseline(raw.get("baseline"), path),
        equivalence_margin=_margins(raw.get("equivalence_margin"), str(raw.get("metric", "best_acc1")), path),
        launcher=launcher,
    )
    _validate(spec)
    return spec


def _baseline(value: Any, path: Path) -> Optional[tuple[str, str]]:
    """`baseline: {row: R, column: C}`: the cell every other cell is compared with (reports)."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"row", "column"}:
        raise SpecError(f"sweep spec {path}: baseline must be {{row: <row>, column: <column>}}, got {value!r}")
    return str(value["row"]), str(value["column"])


def _margins(value: Any, metric: str, path: Path) -> dict[str, float]:
    """`equivalence_margin: 0.3` (the main metric's δ, in its units: points for accuracies) or
    `{best_acc1: 0.3, test_ppl: 1.5}`; every δ a positive number."""
    if value is None:
        return {}
    raw = value if isinstance(value, dict) else {metric: value}
    out = {}
    for name, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise SpecError(f"sweep spec {path}: equivalence_margin for {name} must be a positive number (the δ of "
                            f"the reproduction test, in the metric's units), got {v!r}")
        if name not in METRICS:
            raise SpecError(f"sweep spec {path}: equivalence_margin names {name!r}, which is not a metric; known: "
                            f"{', '.join(METRICS)}")
        out[str(name)] = float(v)
    return out


def _validate(spec: SweepSpec) -> None:
    where = spec._where
    spec.rows = {r: v for r, v in spec.rows.items() if v is not None}
    for rspec in spec.rows.values():
        spec.family_chain((rspec or {}).get("family", "default"))
    extra = [(f"extra_metrics.{m}", t) for m, t in spec.extra_metrics.items()]
    for table_name, table in [("paper", spec.paper), *extra]:
        for row, values in table.items():
            if row not in spec.rows:
                raise SpecError(f"{where}: {table_name} names row {row!r}, which is not in `rows`")
            all_cols = {c for arm in spec.arms.values() for c in arm}
            for col, value in (values or {}).items():
                if col not in all_cols:
                    raise SpecError(f"{where}: {table_name}.{row} names column {col!r}, which no arm set has")
                parse_paper_value(value)
    if spec.baseline is not None:
        row, col = spec.baseline
        if row not in spec.rows or col not in {c for arm in spec.arms.values() for c in arm}:
            raise SpecError(f"{where}: baseline names the cell {row!r} × {col!r}, which the spec does not have")
    if spec.wct:
        if "epochs" not in spec.wct or "reference" not in spec.wct:
            raise SpecError(f"{where}: wct needs `reference` and `epochs`")
        e = float(spec.wct["epochs"])
        if not math.isfinite(e) or e <= 0:
            raise SpecError(f"{where}: wct.epochs must be positive")
    for key, name in (("metric", spec.metric), ("select", spec.select),
                      ("search.metric", (spec.search or {}).get("metric"))):
        if name is not None and name not in METRICS:
            raise SpecError(f"{where}: {key} {name!r} is not a metric; known: {', '.join(METRICS)}")

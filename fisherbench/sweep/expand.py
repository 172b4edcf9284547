"""Expand a sweep spec into runs: cells x seeds, each with the exact `train.py` overrides and its run id.

Every cell is composed once with Hydra (as `train.py` would compose it); seeds only change `seed`, so the
run id of each seed is computed from the same composed config. Values a row scales (LR grids as multiples
of each recipe's LR) are read from the composed config and written back as explicit overrides, so the
subprocess composes exactly the config whose id we computed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from fisherbench.core.config import CONFIG_DIR
from fisherbench.sweep.spec import Cell, SweepSpec, merge_overrides, override_key, override_value


@dataclass
class PlannedRun:
    cell: Cell
    seed: int
    overrides: list[str]  # what train.py is given (results_dir added by the launcher)
    run_id: str
    config: DictConfig  # the composed config (with `_choices`), seed set

    @property
    def label(self) -> str:
        return f"{self.cell.row} × {self.cell.column} · seed {self.seed}"


@dataclass
class ComposedCell:
    cell: Cell
    overrides: list[str]  # without seed
    config: DictConfig  # seed as composed (overwritten per run)


def _format_value(value: float) -> float:
    """Round a scaled value to 6 significant digits so that the override string round-trips exactly."""
    return float(f"{value:.6g}")


@contextlib.contextmanager
def hydra_context() -> Iterator[None]:
    """One Hydra initialisation for many compositions (composing is the slow part of expanding)."""
    # lazy: engine pulls in torch and every model (~4 s); every sweep command, --list too, imports this module
    from fisherbench.engine.compose import register_configs

    if GlobalHydra.instance().is_initialized():
        yield
        return
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        yield


CONFIG_GROUPS = ("experiment", "model", "data", "optimizer", "budget", "logger")


def cell_overrides(spec: SweepSpec, cell: Cell, wct_mode: str = "measured",
                   user_overrides: Sequence[str] = ()) -> list[str]:
    """All overrides of a cell: preset, spec/row/family/column/cell, WCT budget, then the user's.

    Group choices are listed first (Hydra applies them first anyway; this only makes commands readable).
    """
    preset = [f"experiment={spec.preset}"] if spec.preset else []
    merged = merge_overrides(preset, cell.overrides, spec.budget_overrides(cell, wct_mode, _reference_epochs(user_overrides)),
                             user_overrides)
    groups = [ov for ov in merged if override_key(ov) in CONFIG_GROUPS]
    return groups + [ov for ov in merged if override_key(ov) not in CONFIG_GROUPS]


def _reference_epochs(user_overrides: Sequence[str]) -> Optional[float]:
    """E from the command line's `budget.reference_epochs=E`: it sets the reference arm's epochs as well as the
    other arms' time (without this the reference arm kept the spec's `wct.epochs`)."""
    value = override_value(list(reversed(user_overrides)), "budget.reference_epochs")
    if value is None:
        return None
    try:
        epochs = float(value)
    except ValueError:
        raise ValueError(f"budget.reference_epochs={value}: not a number of epochs") from None
    if not (0 < epochs < float("inf")):
        raise ValueError(f"budget.reference_epochs={value}: must be a positive number of epochs")
    return epochs


def compose(overrides: Sequence[str]) -> DictConfig:
    """`fisherbench.runner.compose_config` inside `hydra_context()`, without re-registering the schemas on
    every call (a third of the time of a composition)."""
    # lazy: engine pulls in torch and every model (~4 s); every sweep command, --list too, imports this module
    from fisherbench.engine.compose import attach_choices

    with hydra_context():
        cfg = hydra_compose("train", overrides=list(overrides), return_hydra_config=True)
    return attach_choices(cfg, dict(cfg.hydra.runtime.choices))


def short_compose_error(exc: BaseException) -> str:
    """Hydra's message on one line: its first line, and an 'Available options' list as one comma-separated list
    (Hydra prints one option per line, and the config search path after them)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    head, options, in_options = lines[0], [], False
    for line in lines[1:]:
        if line.startswith("Available options"):
            in_options = True
        elif line.startswith("Config search path"):
            break
        elif in_options:
            options.append(line)
    return head + (f" (available: {', '.join(options)})" if options else "")


def compose_cell(spec: SweepSpec, cell: Cell, wct_mode: str = "measured",
                 user_overrides: Sequence[str] = ()) -> ComposedCell:
    overrides = cell_overrides(spec, cell, wct_mode, user_overrides)
    try:
        cfg = compose(overrides)
    except Exception as exc:  # noqa: BLE001 - Hydra raises many types; all mean "this cell does not compose"
        raise ValueError(f"{spec.name}: cell {cell.row} × {cell.column} does not compose "
                         f"({' '.join(overrides)}): {short_compose_error(exc)}") from None
    scaled = []
    for key, factor in cell.scale:
        base = OmegaConf.select(cfg, key)
        if not isinstance(base, (int, float)):
            raise ValueError(f"{spec.name}: row {cell.row} scales {key}, which is not a number ({base!r})")
        value = _format_value(float(base) * float(factor))
        OmegaConf.update(cfg, key, value, merge=False)
        scaled.append(f"{key}={value!r}")
    return ComposedCell(cell, merge_overrides(overrides, scaled), cfg)


def expand(
    spec: SweepSpec,
    arm_sets: Iterable[str] = ("main",),
    user_overrides: Sequence[str] = (),
    wct_mode: str = "measured",
    seeds: Optional[Sequence[int]] = None,
    rows: Optional[Iterable[str]] = None,
    columns: Optional[Iterable[str]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> list[PlannedRun]:
    """The runs of a sweep, cell by cell (spec order), seeds innermost."""
    # lazy: engine pulls in torch and every model (~4 s); every sweep command, --list too, imports this module
    from fisherbench.data.registry import unchanged_data
    from fisherbench.engine.identity import run_id_of

    cells = spec.cells(arm_sets, rows, columns)
    seeds = list(spec.seeds if seeds is None else seeds)
    runs: list[PlannedRun] = []
    with hydra_context(), unchanged_data():  # each dataset's content hashed (or stat-checked) once for the plan
        for i, cell in enumerate(cells):
            composed = compose_cell(spec, cell, wct_mode, user_overrides)
            for seed in seeds:
                cfg = composed.config.copy()
                cfg.seed = int(seed)
                runs.append(PlannedRun(cell, int(seed), [*composed.overrides, f"seed={seed}"], run_id_of(cfg), cfg))
            if progress is not None:
                progress(i + 1, len(cells))
    return dedupe(runs)


def dedupe(runs: list[PlannedRun]) -> list[PlannedRun]:
    """Cells that need the same run (e.g. an LR-grid row equal to the default row) share it: run it once."""
    seen: set[str] = set()
    out = []
    for r in runs:
        if r.run_id not in seen:
            seen.add(r.run_id)
            out.append(r)
    return out

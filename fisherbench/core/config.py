"""Top-level config schema and its registration with Hydra.

`train.yaml` composes the groups `model/`, `data/`, `optimizer/`, `budget/`, `logger/`, `experiment/`.
The top level and every group are typed: the top level by `TrainConfig`, each group option by the schema
of the registry entry it names (`/schema/<group>/<entry>` in the ConfigStore). A typo or a wrong type
therefore fails when Hydra composes the config, before anything runs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from fisherbench.core.errors import UserError
from fisherbench.core.scores import selection_direction

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

BUDGET_MODES = ("epochs", "steps", "seconds", "reference", "match")


def not_identity(default: Any = MISSING, *, default_factory: Any = MISSING) -> Any:
    """A config field that does not change what a run computes (where it is stored, how it is logged, ...).

    Such fields are left out of the run's identity hash (`non_identity_paths`), so changing them resumes or
    skips the same run instead of starting another. This metadata is the one place that decides it.
    """
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata={"identity": False})
    return field(default=default, metadata={"identity": False})


def in_range(default: Any = MISSING, *, ge: Optional[float] = None, gt: Optional[float] = None,
             le: Optional[float] = None, lt: Optional[float] = None, identity: bool = True,
             default_factory: Any = MISSING) -> Any:
    """A numeric config field with its valid range (checked by `check_numbers` when a config is composed; for a
    list of numbers, each element). `identity=False` is `not_identity` as well."""
    meta: dict[str, Any] = {"range": NumberRange(ge, gt, le, lt)}
    if not identity:
        meta["identity"] = False
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class NumberRange:
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def holds(self, x: float) -> bool:
        return not ((self.ge is not None and x < self.ge) or (self.gt is not None and x <= self.gt)
                    or (self.le is not None and x > self.le) or (self.lt is not None and x >= self.lt))

    def __str__(self) -> str:
        lo = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else "(-inf"
        hi = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else "inf)"
        return f"{lo}, {hi}"


# Ranges of optimizer options that mean the same in every optimizer, by name; an optimizer schema's own
# `in_range` field wins. Hyper-parameters outside them make no sense for any optimizer of the suite.
OPTIMIZER_OPTION_RANGES: dict[str, NumberRange] = {
    "lr": NumberRange(ge=0),
    "weight_decay": NumberRange(ge=0),
    "grad_clip": NumberRange(gt=0),
    "eps": NumberRange(gt=0),
    "momentum": NumberRange(ge=0, lt=1),
    "beta": NumberRange(ge=0, lt=1),
    "betas": NumberRange(ge=0, lt=1),
    "damping": NumberRange(ge=0),
    "dampening": NumberRange(ge=0, le=1),
}


@dataclass
class BudgetConfig:
    """How long a run trains. Exactly the field(s) of the chosen mode must be set."""

    mode: str = "epochs"  # epochs | steps | seconds | reference | match
    epochs: Optional[int] = in_range(None, gt=0)
    steps: Optional[int] = in_range(None, gt=0)
    seconds: Optional[float] = in_range(None, gt=0)
    # reference: train for the time optimizer `reference_optimizer` (an optimizer config option, e.g.
    # "adafisher") needs for `reference_epochs` epochs on this machine (the paper's WCT protocol), as
    # estimated by an interleaved calibration (fisherbench/engine/calibrate.py); the derived arm is budgeted in steps.
    reference_optimizer: Optional[str] = None
    # E, fractional allowed: the reference trains round(E x steps per epoch) steps
    reference_epochs: Optional[float] = in_range(None, gt=0)
    # match: train for exactly the measured `train_s` of a finished reference run in the store, on the same
    # machine kind: `match_run` names it (a run id); without it, the reference run of this cell is looked up
    # (this config with `reference_optimizer` for `reference_epochs` epochs, same seed). No estimate involved.
    match_run: Optional[str] = None
    # How a `reference` budget is made equal: `auto` (default) takes the measured train_s of the cell's finished
    # reference run when the store has it (budget=match, no estimate), else calibrates; `calibration` always
    # calibrates; `match` requires the reference run. The method used is recorded (reference_budget.method),
    # and a resumed run keeps the method it started with.
    reference_method: str = "auto"
    # Calibration effort of the first look. Part of the run identity (a derived budget depends on them) and of
    # the calibration cache key: at least `calibration_steps` timed steps per arm, in at least
    # `calibration_blocks` (>= 6) ABBA blocks of whole curvature periods (docs/wall-clock.md says how they are
    # laid out and when more blocks are measured).
    calibration_steps: int = 320
    calibration_blocks: int = 6
    # The sequential rule: more blocks until the ratio's 95% CI half-width is <= `calibration_tolerance`
    # (relative; 0.02 = 2%), or stop with exit 2 when the cap `calibration_max_s` (seconds; null: 10% of the
    # reference's time for its E epochs, estimated from the warm-up) would be passed. How precisely a budget is
    # estimated, not what it estimates: not part of the run identity.
    calibration_tolerance: float = not_identity(0.02)
    calibration_max_s: Optional[float] = not_identity(None)
    calibration_warmup: int = 3  # untimed steps per arm first (at least one curvature period + 1 is used)
    recalibrate: bool = not_identity(False)  # ignore a cached calibration for the same (machine, model, data, optimizers)
    # untimed warm-up steps (cudnn autotune, allocator, compile), whose effects on the model/optimizer are undone
    warmup_steps: int = 0  # at least 1 is always taken (2 with compile): one-off costs never land in train_s


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, sized to the budget so it anneals fully."""

    name: str = "cosine"  # cosine | constant | linear
    interval: str = "epoch"  # epoch (official: stepped once per epoch) | step
    warmup_fraction: float = 0.0  # linear warm-up over this fraction of the budget
    min_lr_ratio: float = 0.0  # final lr / base lr


@dataclass
class EvalConfig:
    """When to evaluate: in epochs or in budget fractions, never in steps of a particular optimizer."""

    every_epochs: Optional[int] = 1
    every_fraction: Optional[float] = None
    max_batches: Optional[int] = None  # cap per split (smoke runs); None = the whole split


@dataclass
class SelectionConfig:
    """Which evaluation row is a run's "best" (summary.json `best`, the progress line, sweeps' objective).

    `metric: null` keeps the paper's protocol for the task: the maximum over evaluations of test top-1 for
    classification (model selection on the test set, as the paper's tables did), the minimum validation
    perplexity for language models. `val/acc1` selects on a held-out validation split (`data.val_fraction>0`
    for image sets): report "test at best validation" from it.
    """

    metric: Optional[str] = None  # "<split>/<metric>", e.g. val/acc1, val/loss, test/acc1; null = the task's
    mode: Optional[str] = None  # max | min; null = max for accuracies, min for losses and perplexities


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    mode: str = "auto"  # auto (online if an API key is configured, else offline) | online | offline | disabled
    project: str = "fisherbench"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    # auto: a progress bar on a terminal, else one plain line per evaluation | always (bar) | lines | never
    progress: str = "auto"


@dataclass
class CheckpointConfig:
    enabled: bool = True
    every_epochs: Optional[int] = 1  # also written on SIGTERM/SIGUSR1 and at the end
    every_seconds: Optional[float] = None  # in budget (training) seconds
    keep_final: bool = False  # keep the last checkpoint after a completed run (default: delete it)


@dataclass
class TrainConfig:
    """The resolved configuration of one run (the run's identity is a hash of the fields not marked `not_identity`)."""

    model: Any = MISSING
    data: Any = MISSING
    optimizer: Any = MISSING
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    logger: LoggerConfig = not_identity(default_factory=LoggerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # which row is "best" changes no computation: runs that differ only in it are the same run
    selection: SelectionConfig = not_identity(default_factory=SelectionConfig)
    checkpoint: CheckpointConfig = not_identity(default_factory=CheckpointConfig)
    seed: int = 0
    results_dir: str = not_identity("runs")  # relative to the working directory
    deterministic: bool = False
    device: str = not_identity("auto")  # auto (CUDA when present) | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 (autocast; statistics of AdaFisher stay fp32)
    # -- throughput settings. None of them changes what a run computes beyond floating-point rounding (like
    # `device`, which is not part of the identity either), so they are NOT part of the run identity: a run
    # resumed or re-launched with other settings is the same run. They change step times, so each is recorded
    # in meta.json (`runtime`) and is part of the calibration cache key (fisherbench/engine/calibrate.py).
    channels_last: bool = not_identity(False)  # conv nets: model and input batches in NHWC memory format
    # cuDNN autotuning (torch.backends.cudnn.benchmark); null = on unless deterministic=true. It picks kernels
    # by timing them, so true with deterministic=true is refused.
    cudnn_benchmark: Optional[bool] = not_identity(None)
    compile: bool = not_identity(False)  # torch.compile the model (compile time goes to warmup_s, not the budget)
    # torch CPU threads: auto = the cores not busy with other processes when the run starts (an OMP_NUM_THREADS
    # in the environment wins; core/env.py `auto_threads`), an integer, or null = torch's default (every core).
    # Typed Any because OmegaConf 2.3 has no int-or-str fields; `validate` checks it.
    threads: Any = not_identity("auto")
    # The host reads the loss buffer and decides on divergence every `check_every` steps (no per-step host sync;
    # see fisherbench/engine/trainer.py). Not identity: a diverged run may take up to 2 x check_every - 1 steps past its
    # first non-finite loss (its recorded divergence step is exact either way); nothing else depends on it.
    check_every: int = not_identity(16)
    experiment: Optional[str] = not_identity(None)  # name of the preset this run belongs to
    overwrite: bool = not_identity(False)  # re-run even if the store holds a finished run with this identity
    tags: list[str] = not_identity(default_factory=list)


_SECTIONS = {"budget": BudgetConfig, "schedule": ScheduleConfig, "eval": EvalConfig}


def _identity_paths(schema: type) -> list[str]:
    paths: list[str] = []
    for f in dataclasses.fields(schema):
        if f.metadata.get("identity", True) is False:
            paths.append(f.name)
            continue
        sub = _SECTIONS.get(f.name) if schema is TrainConfig else None
        if sub is not None:
            paths.extend(f"{f.name}.{p}" for p in _identity_paths(sub))
    return paths


def not_identity_fields(schema: type) -> list[str]:
    """Names of the fields of one schema dataclass (e.g. a dataset's options) marked `not_identity`."""
    return [f.name for f in dataclasses.fields(schema) if f.metadata.get("identity", True) is False]


def non_identity_paths() -> tuple[str, ...]:
    """Dotted paths of every field marked `not_identity` in `TrainConfig` and its sections."""
    return tuple(_identity_paths(TrainConfig))


def strip_non_identity(resolved: dict[str, Any]) -> dict[str, Any]:
    """`resolved` without the non-identity fields (a new dict; nested dicts are copied where changed)."""
    out = dict(resolved)
    for path in non_identity_paths():
        node = out
        *parents, leaf = path.split(".")
        for key in parents:
            child = node.get(key)
            if not isinstance(child, dict):
                break
            node[key] = child = dict(child)
            node = child
        else:
            node.pop(leaf, None)
    return out


def schema_fields(obj_type: Any) -> list[str]:
    if dataclasses.is_dataclass(obj_type):
        return [f.name for f in dataclasses.fields(obj_type)]
    return []


def _range_of(schema: Any, key: str, section: str) -> Optional[NumberRange]:
    if dataclasses.is_dataclass(schema):
        for f in dataclasses.fields(schema):
            if f.name == key and "range" in f.metadata:
                found: NumberRange = f.metadata["range"]
                return found
    return OPTIMIZER_OPTION_RANGES.get(key) if section == "optimizer" else None


def check_numbers(cfg: Any) -> None:
    """Every number of a composed config is finite (`nan`, `inf`, `1e999` are refused: `budget.seconds=nan`
    would never stop), and within its declared range (`in_range` fields, `OPTIMIZER_OPTION_RANGES`); every
    group's schema included. Raises UserError naming the key."""
    stack: list[tuple[Any, str, Any]] = [(cfg, "", None)]
    while stack:
        node, prefix, schema = stack.pop()
        if isinstance(node, DictConfig):
            schema = OmegaConf.get_type(node)
            items = [(str(k), node[k]) for k in node.keys()]
        elif isinstance(node, ListConfig):
            items = [(f"[{i}]", v) for i, v in enumerate(node)]
        else:
            continue
        for key, value in items:
            dotted = f"{prefix}{key}" if key.startswith("[") or not prefix else f"{prefix}.{key}"
            if isinstance(value, (DictConfig, ListConfig)):
                # a list's elements are checked against the range of the list's key
                stack.append((value, dotted, schema) if isinstance(value, ListConfig) else (value, dotted, None))
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                raise UserError(f"{dotted}={value} is not a finite number; every numeric option must be finite")
            name = dotted.split(".")[-1].split("[")[0]
            rng = _range_of(schema, name, dotted.split(".")[0])
            if rng is not None and not rng.holds(value):
                raise UserError(f"{dotted}={value} is out of range: it must be in {rng}")


def validate(cfg: Any) -> None:
    """Checks Hydra cannot express as types (value ranges, mode-dependent fields). Raises UserError."""
    check_numbers(cfg)
    b = cfg.budget
    if b.mode not in BUDGET_MODES:
        raise UserError(f"budget.mode must be one of {', '.join(BUDGET_MODES)}; got {b.mode!r}")
    if b.mode == "match" and not b.match_run and not b.reference_optimizer:
        raise UserError("budget.mode=match needs budget.match_run=<run id> or budget.reference_optimizer and "
                        "budget.reference_epochs (to find the reference run of this cell in the store)")
    need = {"epochs": "epochs", "steps": "steps", "seconds": "seconds", "reference": "reference_epochs",
            "match": "reference_epochs" if not b.match_run else None}[b.mode]
    value = b[need] if need else 1
    if value is None:
        raise UserError(f"budget.mode={b.mode} needs budget.{need} (e.g. `budget.{need}=10`)")
    if value <= 0:
        raise UserError(f"budget.{need} must be positive, got {value}")
    if b.reference_method not in ("auto", "calibration", "match"):
        raise UserError(f"budget.reference_method must be auto, calibration or match; got {b.reference_method!r}")
    if b.mode == "reference" and not b.reference_optimizer:
        raise UserError("budget.mode=reference needs budget.reference_optimizer (an optimizer config, e.g. adafisher)")
    if b.calibration_steps < 2 or b.calibration_warmup < 0 or b.warmup_steps < 0:
        raise UserError("budget.calibration_steps must be >= 2 and the warm-up counts >= 0")
    if b.calibration_blocks < 6:
        raise UserError(f"budget.calibration_blocks must be >= 6 (the interval's first look needs 5 degrees of "
                        f"freedom), got {b.calibration_blocks}")
    if not (0 < b.calibration_tolerance < math.inf):  # also refuses nan
        raise UserError(f"budget.calibration_tolerance must be a positive relative half-width, e.g. 0.02 for "
                        f"±2%; got {b.calibration_tolerance}")
    if b.calibration_max_s is not None and not (0 < b.calibration_max_s < math.inf):
        raise UserError(f"budget.calibration_max_s must be a positive number of seconds (or null: 10% of the "
                        f"reference's estimated time); got {b.calibration_max_s}")
    if b.mode in ("reference", "match") and b.reference_epochs is not None and not math.isfinite(b.reference_epochs):
        raise UserError(f"budget.reference_epochs must be a finite number of epochs; got {b.reference_epochs}")
    if cfg.check_every < 1:
        raise UserError(f"check_every must be >= 1, got {cfg.check_every}")
    if not (cfg.threads is None or cfg.threads == "auto"
            or (isinstance(cfg.threads, int) and not isinstance(cfg.threads, bool) and cfg.threads >= 1)):
        raise UserError(f"threads must be auto, an integer >= 1 or null (torch's default), got {cfg.threads!r}")
    if cfg.cudnn_benchmark and cfg.deterministic:
        raise UserError("cudnn_benchmark=true picks cuDNN kernels by timing them, so runs are not reproducible; "
                        "with deterministic=true use cudnn_benchmark=false or null")
    s = cfg.schedule
    if s.name not in ("cosine", "constant", "linear"):
        raise UserError(f"schedule.name must be cosine|constant|linear, got {s.name!r}")
    if s.interval not in ("epoch", "step"):
        raise UserError(f"schedule.interval must be epoch|step, got {s.interval!r}")
    if not 0.0 <= s.warmup_fraction < 1.0 or not 0.0 <= s.min_lr_ratio <= 1.0:
        raise UserError("schedule.warmup_fraction must be in [0, 1) and schedule.min_lr_ratio in [0, 1]")
    e = cfg.eval
    if e.max_batches is not None and e.max_batches < 1:
        raise UserError(f"eval.max_batches must be >= 1 or null (the whole split), got {e.max_batches}: a run "
                        "without test metrics is not a result")
    if e.every_epochs is not None and e.every_epochs < 1:
        raise UserError(f"eval.every_epochs must be >= 1 or null, got {e.every_epochs}")
    if e.every_fraction is not None and not 0.0 < e.every_fraction <= 1.0:
        raise UserError(f"eval.every_fraction must be in (0, 1] or null, got {e.every_fraction}")
    sel = cfg.selection
    if sel.metric is not None and (sel.metric.count("/") != 1 or not all(sel.metric.split("/"))):
        raise UserError(f"selection.metric must look like <split>/<metric> (e.g. val/acc1), got {sel.metric!r}")
    if sel.mode not in (None, "max", "min"):
        raise UserError(f"selection.mode must be max, min or null, got {sel.mode!r}")
    if sel.metric is not None:
        selection_direction(sel.metric, sel.mode)  # raises when neither the key nor the mode tells the direction
    if cfg.precision not in ("fp32", "bf16"):
        raise UserError(f"precision must be fp32|bf16, got {cfg.precision!r}")
    if cfg.logger.name not in ("none", "wandb"):
        raise UserError(f"logger.name must be none|wandb, got {cfg.logger.name!r}")
    if cfg.logger.mode not in ("auto", "online", "offline", "disabled"):
        raise UserError(f"logger.mode must be auto|online|offline|disabled, got {cfg.logger.mode!r}")
    if cfg.logger.progress not in ("auto", "always", "lines", "never"):
        raise UserError(f"logger.progress must be auto|always|lines|never, got {cfg.logger.progress!r}")
    c = cfg.checkpoint
    if c.every_epochs is not None and c.every_epochs < 1:
        raise UserError("checkpoint.every_epochs must be >= 1 or null")
    if c.every_seconds is not None and c.every_seconds <= 0:
        raise UserError("checkpoint.every_seconds must be > 0 or null")


# ------------------------------------------------------------------------------------ plain data helpers
def plain_dict(node: Any) -> dict[str, Any]:
    """A config node (a DictConfig, resolved, or any mapping) as a plain dict."""
    out = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    if not isinstance(out, dict):
        raise TypeError(f"expected a mapping, got {type(out).__name__}")
    return {str(k): v for k, v in out.items()}


def flatten(mapping: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys; lists, and empty mappings, stay values."""
    out: dict[str, Any] = {}
    if isinstance(mapping, dict):
        for k, v in mapping.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                out.update(flatten(v, key + "."))
            else:
                out[key] = v
    return out

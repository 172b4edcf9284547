"""The runs of a store as reports see them: every file validated, corrupt runs listed, never fatal.

`StoreIndex` reads each run directory once (config, meta and summary through `fisherbench.core.store`'s validating
readers). A run whose files do not validate is kept with status `corrupt` and its problem (file and what is
wrong) when its config can still be read, so it counts as a run of its cell that did not finish; when the
config itself is unreadable the run is only listed in `StoreIndex.corrupt`. Metric rows are read on demand;
an unreadable `metrics.jsonl` marks the run corrupt at that point. Nothing read from a store stops a report.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from fisherbench.core.budget import LOAD_DIFFERENCE_THRESHOLD
from fisherbench.core.config import strip_non_identity
from fisherbench.core.errors import UserError
from fisherbench.core.scores import as_number
from fisherbench.core.status import SUCCESS, Status
from fisherbench.core.store import CorruptRunError, RunDir, canonical, iter_run_dirs

# Config keys that do not change the experiment, so runs that differ only in them are the same cell.
MATCH_IGNORE = (
    "data.root", "data.num_workers", "data.download", "data.verify", "data.cache", "data.loader",
    "data.tokenizer_dir", "deterministic", "budget.calibration_steps", "budget.calibration_warmup",
    "budget.calibration_blocks", "budget.warmup_steps", "budget.recalibrate", "budget.reference_method",
)
# A matched pair (budget=match) replays the reference's measured seconds; when the two runs trained under 1-minute
# load averages that differ by more than the run layer's threshold, the same seconds bought a different amount of
# work and reports flag the pair (docs/reports.md). Runs record the verdict (`loads_differ`); for a run that has
# only the two loads, reports apply the same rule.
LOAD_DIFF_THRESHOLD = LOAD_DIFFERENCE_THRESHOLD


# ------------------------------------------------------------------------------------------ config keys
_MISSING = object()


def lookup(config: Any, dotted: str, default: Any = None) -> Any:
    """`config["a"]["b"]` for `a.b`; `default` when a part is missing or not a mapping."""
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def value_text(v: Any) -> str:
    """A config value as a user types it on the command line (for labels and `--where`)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


@dataclass(frozen=True)
class Where:
    """A filter `KEY=V1,V2` (any of the values) or `KEY!=V` on a run's config (or `status`)."""

    key: str
    values: tuple[str, ...]
    negate: bool = False

    def matches(self, run: "StoredRun") -> bool:
        value = run.status if self.key == "status" else run.get(self.key, _MISSING)
        hit = value is not _MISSING and value_text(value) in self.values
        return hit != self.negate

    @property
    def text(self) -> str:
        return f"{self.key}{'!=' if self.negate else '='}{','.join(self.values)}"


def parse_where(text: str) -> Where:
    if "=" not in text or text.startswith("="):
        raise UserError(f"--where {text!r}: write KEY=VALUE (e.g. optimizer.name=adam, several values comma-"
                        "separated: optimizer.name=adam,sgd; KEY!=VALUE excludes)")
    key, _, values = text.partition("=")
    negate = key.endswith("!")
    return Where(key.rstrip("!").strip(), tuple(v.strip() for v in values.split(",") if v.strip() != ""), negate)


# -------------------------------------------------------------------------------------------- matching
def _drop(d: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.get(p) if isinstance(d, dict) else None  # type: ignore[assignment]
        if not isinstance(d, dict):
            return
    d.pop(leaf, None)


def match_signature(resolved: dict[str, Any]) -> str:
    """What makes two runs the same experiment up to the seed: identity minus seed minus `MATCH_IGNORE`."""
    d = json.loads(json.dumps(resolved, default=str))
    d.pop("_choices", None)
    d.pop("seed", None)
    d = strip_non_identity(d)
    for key in MATCH_IGNORE:
        _drop(d, key)
    return json.dumps(canonical(d), sort_keys=True, separators=(",", ":"))


# ------------------------------------------------------------------------------------------------ runs
@dataclass
class StoredRun:
    run_dir: RunDir
    config: dict[str, Any]
    summary: Optional[dict[str, Any]]
    signature: str
    problem: Optional[str] = None  # why the run is corrupt (file: what is wrong), None when it validates
    choices: dict[str, str] = field(default_factory=dict)  # config group -> the option chosen (meta.json)
    _rows: Optional[list[dict[str, Any]]] = field(default=None, repr=False)

    @property
    def run_id(self) -> str:
        return self.run_dir.run_id

    @property
    def seed(self) -> int:
        seed = self.config.get("seed", 0)
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else -1

    @property
    def status(self) -> str:
        if self.problem is not None:
            return Status.CORRUPT.value
        return str(self.summary.get("status")) if self.summary else Status.UNFINISHED.value

    @property
    def ok(self) -> bool:
        return self.status in SUCCESS

    def rows(self) -> list[dict[str, Any]]:
        """The run's metric rows (read once; an unreadable file marks the run corrupt and gives no rows)."""
        if self._rows is None:
            try:
                self._rows = self.run_dir.metrics()
            except CorruptRunError as exc:
                self.problem = self.problem or problem_text(self.run_dir, exc)
                self._rows = []
        return self._rows

    def get(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key; a config group's own name (`optimizer`, `model`) gives the option chosen
        for it (e.g. `adafisher_paper`), which tells variants apart that share `optimizer.name`; a run that did
        not record its choices gives the group's `name`."""
        group = self.config.get(dotted) if "." not in dotted else None
        if isinstance(group, dict):
            if dotted in self.choices:
                return self.choices[dotted]
            if "name" in group:
                return group["name"]
        return lookup(self.config, dotted, default)


@dataclass(frozen=True)
class CorruptRun:
    path: Path
    problem: str


class StoreIndex:
    """Every run of a store (read once, validated) by match signature; corrupt runs listed, never fatal.

    `progress`: a bar on stderr while reading many runs (only on a terminal).
    """

    def __init__(self, root: Path | str, progress: bool = False) -> None:
        self.root = Path(root)
        self.runs: list[StoredRun] = []
        self.corrupt: list[CorruptRun] = []  # runs whose config cannot be read (not part of any cell)
        dirs = list(iter_run_dirs(self.root))
        if progress and len(dirs) > 50:
            from tqdm import (
                tqdm,  # lazy: adds ~30 ms to `python -m fisherbench results` (~0.17 s); few reads need a bar
            )

            dirs = tqdm(dirs, desc=f"reading {self.root}", unit="run", leave=False, disable=None, file=sys.stderr)
        self.by_signature: dict[str, list[StoredRun]] = {}
        for rd in dirs:
            try:
                run = read_run(rd)
            except CorruptRunError as exc:  # the config cannot be read: the run belongs to no cell
                self.corrupt.append(CorruptRun(rd.path, problem_text(rd, exc)))
                continue
            if run is None:  # removed while we read the store
                continue
            self.runs.append(run)
            self.by_signature.setdefault(run.signature, []).append(run)

    def runs_like(self, signature: str) -> list[StoredRun]:
        return self.by_signature.get(signature, [])

    def find(self, run_id: str) -> Optional[StoredRun]:
        return next((r for r in self.runs if r.run_id == run_id), None)

    def corrupt_runs(self) -> list[CorruptRun]:
        """Every corrupt run: unreadable configs, and runs with a config whose other files do not validate."""
        listed = {c.path for c in self.corrupt}
        more = [CorruptRun(r.run_dir.path, r.problem) for r in self.runs
                if r.problem is not None and r.run_dir.path not in listed]
        return sorted([*self.corrupt, *more], key=lambda c: str(c.path))


def problem_text(rd: RunDir, exc: CorruptRunError) -> str:
    """`summary.json: holds a JSON list, not an object` (the file relative to its run directory)."""
    try:
        name = str(exc.path.relative_to(rd.path))
    except ValueError:
        name = str(exc.path)
    return f"{name}: {exc.problem}"


def read_run(rd: RunDir) -> Optional[StoredRun]:
    """A run directory as a StoredRun, with status `corrupt` and its problem when its summary or meta does not
    validate; CorruptRunError when its config cannot be read; None when it has no config (removed meanwhile)."""
    cfg = rd.config()
    if cfg is None:
        return None
    problem = None
    summary = meta = None
    try:
        summary = rd.summary()
        meta = rd.meta()
    except CorruptRunError as exc:
        problem = problem_text(rd, exc)
    raw_choices = (meta or {}).get("choices") or (summary or {}).get("choices")
    choices = {str(k): v for k, v in raw_choices.items() if isinstance(v, str)} if isinstance(raw_choices, dict) else {}
    seed = cfg.get("seed", 0)
    if problem is None and (not isinstance(seed, int) or isinstance(seed, bool)):
        problem = f"config.yaml: 'seed' is a {type(seed).__name__}, expected int"
    try:
        signature = match_signature(cfg)
    except (TypeError, ValueError) as exc:  # a mapping that is not config-shaped
        signature, problem = f"corrupt:{rd.run_id}", problem or f"config.yaml: {exc}"
    return StoredRun(rd, cfg, summary, signature, problem, choices)


def filter_runs(runs: Iterable[StoredRun], where: Sequence[Where]) -> list[StoredRun]:
    return [r for r in runs if all(w.matches(r) for w in where)]


def prefer(run: StoredRun) -> tuple:
    """Which of several runs of one cell and seed to use: finished, then diverged, then the most recent."""
    s = run.summary or {}
    rank = 2 if run.ok else 1 if run.status == Status.DIVERGED else 0
    return (rank, str(s.get("finished_at") or ""), run.run_id)


def resolve_run(index: StoreIndex, ref: str) -> "StoredRun | Path":
    """A run by id, unique id prefix, or path (every command that takes a run uses this); the path of an
    unreadable (corrupt) run directory. UserError when nothing or several runs match."""
    p = Path(ref)
    name = p.name if (p.is_dir() or "/" in ref) else ref
    exact = index.find(name)
    if exact is not None:
        return exact
    matches = [r for r in index.runs if r.run_id.startswith(name)]
    corrupt = [c.path for c in index.corrupt if c.path.name.startswith(name)]
    if len(matches) + len(corrupt) == 1:
        return matches[0] if matches else corrupt[0]
    if len(matches) + len(corrupt) > 1:
        ids = ", ".join([r.run_id for r in matches] + [c.name for c in corrupt])
        raise UserError(f"run {ref!r} is ambiguous in {index.root}: {ids}")
    raise UserError(f"no run {ref!r} in {index.root} (`python -m fisherbench results ls --store {index.root}` lists them)")


# ------------------------------------------------------------------------------------ facts per run
def run_epochs(run: StoredRun) -> Optional[float]:
    """Epochs the run trained (its budget plan when finished normally, else what it reached)."""
    s = run.summary or {}
    plan = s.get("budget") or {}
    if run.ok and plan.get("mode") == "epochs" and plan.get("epochs"):
        return float(plan["epochs"])
    return as_number(s.get("epochs_done"))


def run_train_seconds(run: StoredRun) -> Optional[float]:
    """Budget-clock seconds the run trained (evaluation, logging and checkpoints excluded)."""
    return as_number(((run.summary or {}).get("ledger") or {}).get("train_s"))


def run_budget_method(run: StoredRun) -> Optional[str]:
    """How a run's equal-time budget was set: `match` (the measured time of the reference run), `calibration`
    (interleaved step timing), `identity` (the run is the reference), or None (a plain budget)."""
    method = ((run.summary or {}).get("reference_budget") or {}).get("method")
    return str(method) if method else None


def _pair(v: Any) -> Optional[tuple[float, float]]:
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(as_number(x) is not None for x in v):
        return float(v[0]), float(v[1])
    return None


@dataclass(frozen=True)
class RunBudget:
    """How one run's equal-time budget was set and how sure it is, from its `summary.json` `reference_budget`
    (fields in docs/wall-clock.md). Validated here: a field of the wrong type is read as absent."""

    method: str  # match / calibration / identity
    epochs: Optional[float] = None  # the derived budget in epochs
    epochs_ci: Optional[tuple[float, float]] = None  # its 95% CI (calibration)
    ratio: Optional[float] = None  # candidate / reference step-time ratio (calibration)
    ratio_ci: Optional[tuple[float, float]] = None
    blocks: Optional[int] = None  # calibration blocks behind the ratio
    calibration: Optional[str] = None  # the calibration's identity (seeds that share it share its error)
    reference_run: Optional[str] = None  # match: the run whose measured time was replayed
    busy_warning: Optional[str] = None  # the machine was busy while the budget was measured (or the run trained)
    load: Optional[float] = None  # 1-minute load average while this run's budget was set / it trained
    reference_load: Optional[float] = None  # match: the reference run's load average
    loads_differ: Optional[bool] = None  # match: the two loads differ beyond the recorded threshold


def _blocks(rb: dict[str, Any]) -> Optional[int]:
    v = rb.get("blocks")
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, dict) and v:  # {arm: [per-block seconds]}: every arm has one value per block
        lengths = {len(x) for x in v.values() if isinstance(x, list)}
        return lengths.pop() if len(lengths) == 1 else None
    return None


def _load(v: Any) -> Optional[float]:
    """A load average: a number, or the mean of [start, end]."""
    pair = _pair(v)
    return (pair[0] + pair[1]) / 2 if pair is not None else as_number(v)


def run_budget(run: StoredRun) -> Optional[RunBudget]:
    """The run's derived budget (None for a plain epoch/step/time budget). Field names as docs/wall-clock.md
    lists them; runs written before those fields existed (`match_run`, `blocks` as per-arm lists) read too."""
    summary = run.summary or {}
    rb = summary.get("reference_budget")
    if not isinstance(rb, dict) or not isinstance(rb.get("method"), str):
        return None

    def text(*keys: str) -> Optional[str]:
        return next((str(rb[k]) for k in keys if isinstance(rb.get(k), str) and rb[k]), None)

    busy = text("busy_warning")
    if busy is None and isinstance(summary.get("busy_warning"), str) and summary["busy_warning"]:
        busy = summary["busy_warning"]  # the run itself trained under a busy-machine warning
    differ = rb.get("loads_differ")
    return RunBudget(
        method=rb["method"], epochs=as_number(rb.get("derived_epochs")), epochs_ci=_pair(rb.get("derived_epochs_ci")),
        ratio=as_number(rb.get("ratio")), ratio_ci=_pair(rb.get("ratio_ci")), blocks=_blocks(rb),
        calibration=text("calibration_key"), reference_run=text("reference_run", "match_run"), busy_warning=busy,
        load=_load(rb.get("load_avg", summary.get("load_avg"))), reference_load=_load(rb.get("reference_load_avg")),
        loads_differ=differ if isinstance(differ, bool) else None,
    )


def run_epoch_seconds(run: StoredRun) -> Optional[float]:
    """Training (budget-clock) seconds per epoch."""
    done = as_number((run.summary or {}).get("epochs_done"))
    train_s = run_train_seconds(run)
    return train_s / done if done and train_s is not None else None


def run_peak_memory(run: StoredRun) -> Optional[float]:
    return as_number((run.summary or {}).get("peak_memory_bytes"))


# AdaFisher-family runs log the range of F/λ over their preconditioned entries at every evaluation
F_OVER_LAMBDA = ("opt/F_over_lambda_min", "opt/F_over_lambda_max")


def run_curvature_range(run: StoredRun) -> Optional[tuple[float, float, float, float]]:
    """F/λ over training: (lowest min, highest max over the evaluations, final min, final max), or None for runs
    that do not log it. F/λ = 1 everywhere means the curvature term never changed a step."""
    lo_key, hi_key = F_OVER_LAMBDA
    pairs = [(as_number(r.get(lo_key)), as_number(r.get(hi_key))) for r in run.rows()]
    pairs = [(lo, hi) for lo, hi in pairs if lo is not None and hi is not None]
    if not pairs:
        return None
    return min(lo for lo, _ in pairs), max(hi for _, hi in pairs), pairs[-1][0], pairs[-1][1]


def progress_printer(label: str, stream=None) -> Callable[[int, int], None]:
    """`progress(i, n)` for long work: a rewritten line on a terminal, nothing otherwise."""
    stream = stream or sys.stderr

    def progress(i: int, n: int) -> None:
        if n > 1 and stream.isatty():
            print(f"\r[report] {label} {i}/{n}", end="\n" if i >= n else "", file=stream, flush=True)

    return progress

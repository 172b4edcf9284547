"""Where the analysed weights come from: a run's checkpoints, or a short training run with chosen steps.

Both give `Snapshot`s (the model at one optimizer step, plus AdaFisher's running diagonal state when the
optimizer has one) built from a resolved fisherbench config, so the data, model and loss are exactly the
run's. `FactorCallback` collects factors during any training loop that reports evaluation rows (e.g. as
`Trainer.on_eval`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from fisherbench import data as data_pkg
from fisherbench import models as models_pkg
from fisherbench import optim as optim_pkg
from fisherbench.analysis.diagnostics import DEFAULT_DAMPING
from fisherbench.analysis.factors import DEFAULT_MAX_DIM, LayerFactors, Log, collect_factors
from fisherbench.core import checkpoint
from fisherbench.core.env import resolve_device
from fisherbench.core.modules import unwrap
from fisherbench.core.store import CorruptRunError, read_yaml_mapping
from fisherbench.core.tasks import get_task


def _stderr(msg: str) -> None:
    print(f"[fisher_analysis] {msg}", file=sys.stderr, flush=True)


@dataclass
class Setup:
    """Data, model builder and loss of one resolved config (a run's `config.yaml`, or a composed one)."""

    cfg: dict[str, Any]
    bundle: Any  # data.registry.DataBundle
    build_model: Callable[[], nn.Module]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    device: torch.device

    @property
    def optimizer_cfg(self) -> dict[str, Any]:
        return dict(self.cfg.get("optimizer") or {})

    @property
    def damping(self) -> float:
        return float(self.optimizer_cfg.get("damping", DEFAULT_DAMPING))

    @property
    def adafisher_variant(self) -> tuple[str, float]:
        """(variant, gamma) of the run's AdaFisher running average, or the official defaults."""
        opt = self.optimizer_cfg
        if str(opt.get("name", "")).startswith("adafisher"):
            variant = str(opt.get("variant", "default"))
            return ("default" if variant == "constf" else variant), float(opt.get("gamma", 0.8))
        return "default", 0.8

    def batches(self, epoch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Training batches of one epoch (the same ones at every analysed step, so steps are comparable)."""
        return self.bundle.train.iterate(epoch, 0)


def setup_from_config(cfg: dict[str, Any], device: Optional[str] = None) -> Setup:
    dev = resolve_device(device or str(cfg.get("device", "auto")))
    seed = int(cfg.get("seed", 0))
    bundle = data_pkg.build_data(dict(cfg["data"]), data_pkg.BuildContext(seed=seed, device=dev))
    model_opts = dict(cfg["model"])

    def build_model() -> nn.Module:
        torch.manual_seed(seed)
        return models_pkg.create_model(num_classes=bundle.num_classes, input_shape=bundle.input_shape,
                                       vocabulary=bundle.extras.get("vocabulary"), **model_opts).to(dev)

    return Setup(cfg, bundle, build_model, get_task(bundle.task).loss, dev)


@dataclass
class Snapshot:
    step: int
    model: nn.Module
    source: str  # e.g. "checkpoint.pt" or "training"
    adafisher_state: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- run dirs
def load_run(run_dir: Path | str, device: Optional[str] = None) -> tuple[Setup, list[Path]]:
    """The run's setup (from `config.yaml`) and its checkpoint files (none is an error with advice)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a fisherbench run directory (no config.yaml); pass the "
                                "directory `train.py` printed at the end of the run")
    try:  # the store's bounded reader: no link followed, no alias bomb, no nesting past MAX_DEPTH
        cfg = read_yaml_mapping(config_path)
    except CorruptRunError as exc:
        raise ValueError(f"run {run_dir} is corrupt: {exc}") from None
    paths = checkpoint_files(run_dir)
    if not paths:
        raise FileNotFoundError(
            f"run {run_dir} has no checkpoint: checkpoints are deleted at the end of a completed run unless "
            "checkpoint.keep_final=true. Re-run it with `checkpoint.keep_final=true` (and "
            "`checkpoint.every_epochs=N` to keep intermediate ones), or analyse a fresh short run with "
            "--model/--data/--steps."
        )
    return setup_from_config(cfg, device), paths


def checkpoint_files(run_dir: Path) -> list[Path]:
    """checkpoint.pt, checkpoint.prev.pt and any *.pt under `checkpoints/`, in no particular order."""
    found = [p for p in (run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt") if p.exists()]
    extra = run_dir / "checkpoints"
    if extra.is_dir():
        found += sorted(extra.glob("*.pt"))
    return found


def adafisher_state_of(optimizer_state: Any) -> dict[str, tuple[Tensor, Tensor]]:
    """{layer: (H_D, S_D)} from an AdaFisher state dict nested anywhere in a checkpoint's optimizer entry."""
    if isinstance(optimizer_state, dict):
        factors = optimizer_state.get("factors")
        if isinstance(factors, dict) and "variant" in optimizer_state:
            return {n: (f["H"].float().cpu(), f["S"].float().cpu()) for n, f in factors.items()}
        for value in optimizer_state.values():
            found = adafisher_state_of(value)
            if found:
                return found
    return {}


def checkpoint_snapshots(setup: Setup, paths: Sequence[Path], steps: Optional[Sequence[int]] = None,
                         log: Log = _stderr) -> Iterator[Snapshot]:
    """Snapshots of the checkpoints, ordered by step (duplicates and steps not in `steps` skipped)."""
    loaded = []
    for path in paths:
        # weights only: checkpoints come from a store other people can write to (never run code from them)
        payload, why = checkpoint.read_checkpoint(Path(path), map_location="cpu")
        if payload is None:
            log(f"skipping checkpoint {path}: {why}")
            continue
        loaded.append((int(payload["state"]["step"]), path, payload))
    seen: set[int] = set()
    for step, path, payload in sorted(loaded, key=lambda t: t[0]):
        if step in seen or (steps and step not in steps):
            continue
        seen.add(step)
        model = setup.build_model()
        model.load_state_dict(payload["model"])
        yield Snapshot(step, model, path.name, adafisher_state_of(payload.get("optimizer")))


# ------------------------------------------------------------------------------------ short training
def training_snapshots(setup: Setup, steps: Sequence[int], log: Log = _stderr) -> Iterator[Snapshot]:
    """Train with the config's optimizer (base lr, no schedule) and yield the model after each of `steps`
    optimizer steps (0 = at initialisation)."""
    wanted = sorted(set(int(s) for s in steps))
    if not wanted or wanted[0] < 0:
        raise ValueError(f"--steps must be non-negative step counts, got {list(steps)}")
    model = setup.build_model()
    ctx = optim_pkg.BuildContext(device=setup.device, steps_per_epoch=len(setup.bundle.train),
                                 total_steps=wanted[-1])
    adapter = optim_pkg.build_optimizer(setup.optimizer_cfg, model, ctx)
    model.train()
    step, epoch = 0, 0
    batches = setup.bundle.train.iterate(epoch, 0)
    report_every = max(1, wanted[-1] // 10)
    for target in wanted:
        while step < target:
            try:
                inputs, targets = next(batches)
            except StopIteration:
                epoch += 1
                batches = setup.bundle.train.iterate(epoch, 0)
                continue
            out = adapter.train_step(model, inputs, targets, setup.loss_fn)
            step += 1
            if step % report_every == 0 or step == wanted[-1]:
                log(f"training: step {step}/{wanted[-1]} loss {float(out.loss):.4f}")
        state = {}
        if hasattr(adapter.optimizer, "fisher_factors"):
            state = {n: (h.float().cpu(), s.float().cpu()) for n, (h, s) in adapter.optimizer.fisher_factors().items()}
        yield Snapshot(step, model, "training", state)


# ------------------------------------------------------------------------------------------ callback
class FactorCallback:
    """Collect factors whenever an evaluation row reports one of `steps` (all rows if `steps` is None).

    `trainer.on_eval = FactorCallback(trainer.model, lambda: bundle.train.iterate(0), task.loss, layers)`;
    results accumulate in `self.factors[step]`. The model is copied without hooks for each collection, so
    the training run (and an optimizer's own statistics hooks) is unaffected.
    """

    def __init__(self, model: nn.Module, batches: Callable[[], Iterable[tuple[Tensor, Tensor]]],
                 loss_fn: Callable[[Tensor, Tensor], Tensor], layers: Sequence[str], *,
                 steps: Optional[Sequence[int]] = None, num_batches: int = 4, grad_scale: str = "batch",
                 max_dim: int = DEFAULT_MAX_DIM, seed: int = 0, log: Log = _stderr) -> None:
        self.model, self.batches, self.loss_fn, self.layers = model, batches, loss_fn, list(layers)
        self.steps = None if steps is None else set(int(s) for s in steps)
        self.kwargs = dict(num_batches=num_batches, grad_scale=grad_scale, max_dim=max_dim, seed=seed, log=log)
        self.factors: dict[int, dict[str, LayerFactors]] = {}

    def __call__(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        if (self.steps is not None and step not in self.steps) or step in self.factors:
            return
        self.factors[step] = collect_factors(unwrap(self.model), self.batches(), self.loss_fn, self.layers,
                                             **self.kwargs)

#!/usr/bin/env python
"""What the training loop costs: the trainer's step time against a plain loop, and its host syncs per step.

    python scripts/bench_harness.py --device cpu --model resnet18_cifar --data synthetic_cifar --steps 30 --json h.json
    python scripts/bench_harness.py --device cuda --model resnet18_cifar --data synthetic_cifar \\
        --set data.batch_size=256 --set data.num_images=50000 --optimizer adafisher --steps 200 --json h.json

Both loops drive the same model and the same optimizer object, in one process, interleaved (trainer, plain,
plain, trainer, ...: ABBA), each for `--steps` steps per round after an untimed warm-up of both:

* trainer: `engine.trainer.Trainer.fit()` under a `steps` budget, as `train.py` runs it (its budget clock,
  loss window, k-step checks, epoch bookkeeping; data from the run's own batch source). Its time per step
  is the training phase's wall clock less the final evaluation (`wall_s - eval_s - ckpt_s - warmup_s`).
* plain: `for x, y in batches: zero_grad(); loss_fn(model(x), y).backward(); step()` over the same batches,
  fetched beforehand and resident on the device; synchronised once before and once after the loop.
  (Adapters with their own forward/backward: ASDL's K-FAC/Shampoo, AdaHessian/Sophia's create_graph,
  call `adapter.train_step` in that bare loop.)

`overhead` = median over rounds of (trainer s/step) / (plain s/step); the JSON also has every round's
ratio and their spread. The machine may be shared: read the spread before the median. `overhead_cpu_time`
is the same ratio in this process's CPU time (all threads; the trainer's includes its final one-batch
evaluation), which other processes on a shared machine barely move.

Host syncs are counted in one more trainer round, not timed (the counting itself costs time).

Host synchronisations are counted while the trainer runs, by wrapping `torch.cuda.synchronize`,
`torch.cuda.Event.synchronize`, the clock's device sync (`Clock.device_sync`, counted on the CPU too, where
it is a no-op, so the CPU count is the one a GPU would see) and `Tensor.item/__float__/__int__/__bool__/
tolist/cpu`, each counted only when called from this repository's code (torch.optim's `.item()` on its
CPU step counters is not a device sync and is not counted). Calls made inside an evaluation, a checkpoint or
the warm-up, or by `fit()`'s start/stop, are reported apart (`host_syncs_outside_steps`): they happen per
evaluation or per run, not per step. `host_syncs_per_step` = the rest / steps. `host_syncs_by_site` lists
every counted call site.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from fisherbench.core.budget import BudgetPlan
from fisherbench.core.config import validate
from fisherbench.core.distributed import DistInfo
from fisherbench.core.env import (
    configure_runtime,
    load_average,
    resolve_device,
    runtime_settings,
    seed_everything,
    to_channels_last,
)
from fisherbench.core.eta import Eta
from fisherbench.core.ledger import Clock, Ledger
from fisherbench.core.tasks import get_task
from fisherbench.engine.build import build_components, make_adapter
from fisherbench.engine.compose import compose_config
from fisherbench.engine.loggers import NullLogger
from fisherbench.engine.trainer import Trainer, TrainState
from fisherbench.optim.registry import OptimizerAdapter

REPO = Path(__file__).resolve().parent.parent
_SELF = str(Path(__file__).resolve())


class SyncCounter:
    """Counts host synchronisations issued from the repository's own code while `active`."""

    TENSOR_METHODS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu")

    def __init__(self) -> None:
        self.active = False
        self.phase = "steps"  # steps | outside (evaluation, checkpoint, warm-up, fit start/stop)
        self.by_site: Counter = Counter()
        self.by_phase: Counter = Counter()
        self._saved: list[tuple[Any, str, Any]] = []

    def _caller_site(self) -> Optional[str]:
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if name == __file__ or name == _SELF or name.endswith("contextlib.py"):
                frame = frame.f_back
                continue
            if name.startswith(str(REPO)) and "/.venv/" not in name and "site-packages" not in name:
                return f"{os.path.relpath(name, REPO)}:{frame.f_lineno}"
            return None
        return None

    def hit(self, what: str) -> None:
        if not self.active:
            return
        site = self._caller_site()
        if site is not None:
            self.by_site[f"{site} {what}"] += 1
            self.by_phase[self.phase] += 1

    def _patch(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        counter = self

        def wrapper(*args, **kwargs):
            counter.hit(label)
            return original(*args, **kwargs)

        self._saved.append((owner, name, original if name in vars(owner) else None))
        setattr(owner, name, wrapper)

    def install(self) -> None:
        for name in self.TENSOR_METHODS:
            self._patch(torch.Tensor, name, f"Tensor.{name}")
        self._patch(torch.cuda, "synchronize", "torch.cuda.synchronize")
        self._patch(torch.cuda.Event, "synchronize", "Event.synchronize")
        # the clock's own device sync, counted on the CPU as well (there it is a no-op: same code path)
        self._patch(Clock, "device_sync", "Clock.device_sync")
        # everything inside these is per evaluation / per checkpoint / per run, not per step
        for name in ("evaluate", "save_checkpoint", "warm_up"):
            self._phase_wrap(Trainer, name)
        for name in ("start_wall", "stop_wall"):
            self._phase_wrap(Clock, name)

    def _phase_wrap(self, owner: Any, name: str) -> None:
        original = getattr(owner, name)
        counter = self

        def wrapper(*args, **kwargs):
            before, counter.phase = counter.phase, "outside"
            try:
                return original(*args, **kwargs)
            finally:
                counter.phase = before

        self._saved.append((owner, name, original if name in vars(owner) else None))
        setattr(owner, name, wrapper)

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._saved):
            if original is None:  # inherited (e.g. Tensor.item from the C base class): drop the override
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._saved.clear()

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        self.active = True
        try:
            yield
        finally:
            self.active = False


def build(args: argparse.Namespace):
    overrides = [f"model={args.model}", f"data={args.data}", f"optimizer={args.optimizer}", f"device={args.device}",
                 "budget=steps", f"budget.steps={args.steps}", "eval.every_epochs=null", "eval.max_batches=1",
                 "checkpoint.enabled=false", "logger=none", "logger.progress=never", *(args.set or [])]
    cfg = compose_config(overrides)
    validate(cfg)
    device = resolve_device(cfg.device)
    configure_runtime(cfg)
    seed_everything(int(cfg.seed))
    parts = build_components(cfg, device, DistInfo())
    bundle = parts.bundle
    spe = len(bundle.train)
    adapter = make_adapter(cfg, parts.model, device, DistInfo(), spe, args.steps)
    trainer = Trainer(cfg=cfg, model=parts.model, adapter=adapter, bundle=bundle, task=get_task(bundle.task),
                      plan=BudgetPlan("steps", spe, steps=args.steps), device=device, run_dir=None,
                      logger=NullLogger())
    return cfg, device, trainer


def trainer_round(trainer: Trainer, steps: int) -> tuple[float, dict[str, float]]:
    """One `fit()` from step 0 for `steps` steps; returns (s/step of the training loop, ledger)."""
    trainer.state = TrainState()
    trainer.ledger = Ledger()
    trainer.clock = Clock(trainer.ledger, trainer.device.type)
    trainer.plan = BudgetPlan("steps", trainer.steps_per_epoch, steps=steps)
    trainer.fit()
    led = trainer.ledger
    loop_s = led.wall_s - led.eval_s - led.ckpt_s - led.warmup_s
    return loop_s / steps, led.as_dict()


def plain_batches(trainer: Trainer, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches the trainer trains on (epoch 0 onwards), resident on the device."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    epoch = 0
    while len(out) < steps:
        for x, y in trainer.bundle.train.iterate(epoch):
            x = x.to(trainer.device)
            out.append((to_channels_last(x) if trainer.channels_last else x, y.to(trainer.device)))
            if len(out) == steps:
                break
        epoch += 1
    return out


def plain_round(trainer: Trainer, batches: list, sync: Callable[[], None]) -> float:
    model, adapter, loss_fn, autocast = trainer.model, trainer.adapter, trainer.task.loss, trainer.autocast
    opt = adapter.optimizer
    # adapters with their own forward/backward (ASDL's gradient makers, create_graph) run their step as it is
    own = any(getattr(type(adapter), m) is not getattr(OptimizerAdapter, m)
              for m in ("train_step", "forward_backward", "backward"))
    sync()
    t0 = time.perf_counter()
    for x, y in batches:
        if own:
            adapter.train_step(model, x, y, loss_fn, autocast)
            continue
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    sync()
    return (time.perf_counter() - t0) / len(batches)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg, device, trainer = build(args)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = plain_batches(trainer, args.steps)
    load_before = load_average()
    # untimed warm-up of both (kernels, allocator, autotuning, compilation)
    trainer_round(trainer, max(1, args.warmup))
    plain_round(trainer, batches[: max(1, args.warmup)], sync)
    rounds: list[dict[str, Any]] = []
    eta = Eta("bench_harness", args.rounds, unit="rounds", every=0.0)
    for r in range(args.rounds):
        order = ("trainer", "plain") if r % 2 == 0 else ("plain", "trainer")
        row: dict[str, Any] = {"order": list(order)}
        for which in order:
            cpu0 = time.process_time()
            if which == "trainer":
                row["trainer_s_per_step"], row["ledger"] = trainer_round(trainer, args.steps)
            else:
                row["plain_s_per_step"] = plain_round(trainer, batches, sync)
            row[f"{which}_cpu_s_per_step"] = (time.process_time() - cpu0) / args.steps
        row["ratio"] = row["trainer_s_per_step"] / row["plain_s_per_step"]
        row["cpu_ratio"] = row["trainer_cpu_s_per_step"] / row["plain_cpu_s_per_step"]
        rounds.append(row)
        # every round says where the benchmark is and what is left (stderr; the result goes to stdout)
        eta.step(f"trainer {row['trainer_s_per_step'] * 1e3:.2f} ms/step, plain "
                 f"{row['plain_s_per_step'] * 1e3:.2f} ms/step, ratio {row['ratio']:.4f}")
    # syncs are counted in a separate, untimed round: the instrumentation itself costs time
    counter = SyncCounter()
    counter.install()
    try:
        with counter.counting():
            trainer_round(trainer, args.steps)
    finally:
        counter.uninstall()
    ratios = [r["ratio"] for r in rounds]
    total_steps = args.steps
    window = trainer.window
    return {
        "model": args.model, "data": args.data, "optimizer": args.optimizer, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "batch_size": int(cfg.data.batch_size), "steps": args.steps, "rounds": args.rounds,
        "check_every": int(cfg.check_every), "runtime": runtime_settings(cfg),
        "overhead": statistics.median(ratios),
        "overhead_min": min(ratios), "overhead_max": max(ratios),
        "overhead_mean": statistics.fmean(ratios),
        "overhead_stdev": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
        # the same ratio in this process's CPU time (all threads; the trainer's includes its final one-batch
        # evaluation): insensitive to other processes on a shared machine, where the wall-clock ratio is not
        "overhead_cpu_time": statistics.median(r["cpu_ratio"] for r in rounds),
        "overhead_cpu_time_min": min(r["cpu_ratio"] for r in rounds),
        "overhead_cpu_time_max": max(r["cpu_ratio"] for r in rounds),
        "trainer_s_per_step": statistics.median(r["trainer_s_per_step"] for r in rounds),
        "plain_s_per_step": statistics.median(r["plain_s_per_step"] for r in rounds),
        "host_syncs_per_step": counter.by_phase["steps"] / total_steps,
        "host_syncs_outside_steps": counter.by_phase["outside"],
        "host_syncs_by_site": dict(counter.by_site.most_common()),
        "loss_window_event_waits": window.event_waits if window is not None else None,
        "rounds_detail": rounds,
        "load_avg": [load_before, load_average()],
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="resnet18_cifar")
    p.add_argument("--data", default="synthetic_cifar")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--steps", type=int, default=30, help="steps per round and loop")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds (ABBA order)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each loop first")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra config override (repeatable)")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--verbose", action="store_true", help="(kept for old command lines: every round is shown)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    result = run(args)
    keys = ("overhead", "overhead_min", "overhead_max", "overhead_cpu_time", "overhead_cpu_time_min",
            "overhead_cpu_time_max", "host_syncs_per_step", "host_syncs_outside_steps",
            "trainer_s_per_step", "plain_s_per_step")
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

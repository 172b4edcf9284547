"""Step time, peak memory and optimizer-state size of registered optimizer configs, as ratios to a reference.

    python scripts/bench_optimizers.py --model resnet18_cifar --batch-size 32 --threads 2 \\
        --optimizers adam,adamw,adafisher,adafisher_official,adafisher_paper,adafisher_constf --json bench.json

Every name is an option of the `optimizer` config group (`fisherbench/configs/optimizer/<name>.yaml`), composed with
Hydra exactly as a training run would and built through `optim.build_optimizer`; nothing here knows any
particular optimizer.

Timing is the WCT protocol's own measurement, `engine.calibration_measure.measure` (the one `budget=reference` uses,
docs/wall-clock.md): every arm alive in one process, warmed up past its first curvature step, then timed in
blocks of two periods per arm in ABBA order (A B C C B A, rotated per block), a period being whole curvature
periods of the arm's *configured* interval (and at least `--min-period-steps`); steps run back to back as in
the trainer, with step boundaries marked by CUDA events or the host clock. The amortised step time per block is the trimmed mean of
the ordinary steps and the mean of the curvature steps weighted (P - 1) : 1; the report gives its mean over
blocks and, against the reference, the ratio with its 95% interval. So every step-time number here is one the
WCT protocol would compute. A step is `adapter.train_step` (zero_grad, forward, backward, step) on one of four
fixed synthetic batches, plus the trainer's per-step loss bookkeeping.

Peak memory is measured in a separate pass, one arm alive at a time, with periodic arms set to a period of 2
(so that both kinds of steps occur within two steps): on CUDA from the allocator (`max_memory_allocated`
during the step); on CPU from the process's resident-set high-water mark (`/proc/self/clear_refs` + `VmHWM`,
after `malloc_trim`), an approximation (allocator caching). The value reported is the arm's parameter +
gradient + optimizer-state bytes plus the step's growth above what was resident when it started.
Optimizer-state bytes come from `adapter.state_bytes()` after the timing pass.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fisherbench import models, optim
from fisherbench.core.env import compile_model, prepare_model, to_channels_last
from fisherbench.core.eta import Eta
from fisherbench.core.tasks import get_task
from fisherbench.engine import calibration_measure as cal
from fisherbench.engine.compose import load_group_option

MEMORY_PERIOD = 2  # the memory pass runs periodic arms with every other step a curvature step


# ------------------------------------------------------------------------------------------------ inputs
def make_batches(model_name: str, batch: int, input_shape: tuple[int, ...], num_classes: int, count: int,
                 device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    caps = models.MODELS.get(model_name).capabilities
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        if getattr(caps, "input_kind", "image") == "tokens":
            x = torch.randint(0, num_classes, (batch, *input_shape), generator=gen)
            y = torch.randint(0, num_classes, (batch, *input_shape), generator=gen)
        else:
            x = torch.randn(batch, *input_shape, generator=gen)
            y = torch.randint(0, num_classes, (batch,), generator=gen)
        out.append((x.to(device), y.to(device)))
    return out


# ------------------------------------------------------------------------------------------------- arms
class Arm:
    """One optimizer config on its own copy of the model (the memory pass)."""

    def __init__(self, name: str, options: dict[str, Any], build_model: Callable[[], torch.nn.Module],
                 device: torch.device, timing: bool) -> None:
        self.name = name
        caps = optim.OPTIMIZERS.get(options["name"]).capabilities
        key = getattr(caps, "period_option", None)
        self.period = int(options[key]) if key and options.get(key) else None
        if self.period and timing:
            options = {**options, key: MEMORY_PERIOD}
        self.step_period = MEMORY_PERIOD if (self.period and timing) else self.period
        self.options = options
        torch.manual_seed(0)
        self.model = build_model().to(device)
        self.adapter = optim.build_optimizer(options, self.model, optim.BuildContext(device=device))
        self.steps = 0
        self.times: dict[str, list[float]] = {"ordinary": [], "curvature": []}

    def next_kind(self) -> str:
        if self.step_period and self.steps % self.step_period == 0:
            return "curvature"
        return "ordinary"

    def step(self, batch, loss_fn, autocast, sync) -> float:
        x, y = batch
        sync()
        t = time.perf_counter()
        out = self.adapter.train_step(self.model, x, y, loss_fn, autocast)
        float(out.loss)
        sync()
        self.steps += 1
        return time.perf_counter() - t

    def live_bytes(self) -> int:
        tensors = [p for p in self.model.parameters()] + [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors) + self.adapter.state_bytes()


# ----------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Growth of memory during one call above the level at its start (CUDA allocator, or CPU resident set)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.note = "CUDA allocator (max_memory_allocated)" if device.type == "cuda" else None
        if device.type != "cuda":
            try:
                self._libc = ctypes.CDLL("libc.so.6")
                Path("/proc/self/clear_refs").write_text("5")
                self.note = "CPU resident set high-water mark (approximate: allocator caching)"
            except OSError:
                self._libc = None

    @property
    def available(self) -> bool:
        return self.note is not None

    def _rss_hwm(self) -> tuple[int, int]:
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) * 1024
        return fields["VmRSS"], fields["VmHWM"]

    def growth(self, fn: Callable[[], Any]) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - start
        gc.collect()
        self._libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        start, _ = self._rss_hwm()
        fn()
        _, peak = self._rss_hwm()
        return max(0, peak - start)


# --------------------------------------------------------------------------------------------- progress
class ProgressArm(cal.TimedArm):
    """A timed arm that reports each step to an `Eta` (which optimizer, warm-up or which ABBA block)."""

    eta: Optional[Eta] = None
    warmup_steps: int = 0
    visit_steps: int = 1
    blocks: int = 1

    def step(self, loss_fn, autocast, loss_buffer) -> None:
        super().step(loss_fn, autocast, loss_buffer)
        if self.eta is not None:
            timed = self.steps - self.warmup_steps
            where = ("warm-up" if timed <= 0 else
                     f"block {min(self.blocks, (timed - 1) // (2 * self.visit_steps) + 1)}/{self.blocks}")
            self.eta.step(f"timing {self.name}, {where}")


# ---------------------------------------------------------------------------------------- dispatched ops
class DispatchCounter(TorchDispatchMode):
    """Counts the ATen operator calls a piece of code dispatches: each is (at least) one kernel launch on a GPU,
    so the count is a CPU-measurable proxy for the launch overhead of a step. `in_step` counts the calls made
    inside the optimizer's own `step()` (the update), `total` every call of the training step (zero_grad,
    forward, backward, curvature statistics, update, loss bookkeeping)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.in_step = 0
        self.inside_step = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        if self.inside_step:
            self.in_step += 1
        return func(*args, **(kwargs or {}))


def count_dispatches(arm: "Arm", batch, loss_fn, autocast) -> dict[str, Any]:
    """Operator calls of one training step of `arm` (its next step's kind: ordinary or curvature)."""
    counter = DispatchCounter()
    optimizer = arm.adapter.optimizer
    original = optimizer.step

    def counted_step(*a, **k):
        counter.inside_step = True
        try:
            return original(*a, **k)
        finally:
            counter.inside_step = False

    kind = arm.next_kind()
    optimizer.step = counted_step  # an instance attribute: shadows the method for this step only
    try:
        with counter:
            out = arm.adapter.train_step(arm.model, batch[0], batch[1], loss_fn, autocast)
            float(out.loss)
    finally:
        del optimizer.step
    arm.steps += 1
    return {"kind": kind, "total": counter.total, "optimizer_step": counter.in_step}


# ------------------------------------------------------------------------------------------------- bench
def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    reference = args.reference or next((n for n in ("adam", "adamw") if n in names), names[0])
    if reference not in names:
        names.insert(0, reference)
    options = {n: load_group_option("optimizer", n) for n in names}
    for item in args.set or []:
        key, _, value = item.partition("=")
        target, _, option = key.rpartition(".")
        for n in names if not target else [target]:
            if option in options[n]:
                current = options[n][option]
                options[n][option] = type(current)(value) if current is not None else value

    caps = models.MODELS.get(args.model).capabilities
    task = get_task(getattr(caps, "task", "classification"))
    input_shape = tuple(args.input_shape) if args.input_shape else ((256,) if caps.input_kind == "tokens" else (3, 32, 32))

    def build_model() -> torch.nn.Module:
        return models.create_model(args.model, num_classes=args.num_classes, input_shape=input_shape)

    batches = make_batches(args.model, args.batch_size, input_shape, args.num_classes, 4, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    # ---- timing: the WCT protocol's measurement, all arms alive, ABBA blocks
    def timed_arm(name: str) -> cal.TimedArm:
        torch.manual_seed(0)
        model = prepare_model(build_model().to(device), args.channels_last)
        if args.compile:
            model = compile_model(model)
        adapter = optim.build_optimizer(options[name], model, optim.BuildContext(device=device))
        stream = itertools.cycle([(to_channels_last(x) if args.channels_last else x, y) for x, y in batches])
        return ProgressArm(name, model, adapter, stream, cal.period_of(options[name]))

    arms = [timed_arm(n) for n in names]
    blocks, visits = cal.block_layout([a.period for a in arms], args.steps, args.blocks,
                                      args.min_period_steps or cal.MIN_VISIT_STEPS.get(device.type, 1))
    total = 0
    for arm, visit in zip(arms, visits):
        arm.warmup_steps, arm.visit_steps, arm.blocks = max(args.warmup, (arm.period or 1) + 1), visit, blocks
        total += arm.warmup_steps + 2 * visit * blocks
    eta = Eta("bench_optimizers", total, every=args.progress_every)
    eta.say(f"timing {len(arms)} optimizers ({', '.join(names)}) on {args.model}, {device}: {blocks} ABBA blocks, "
            f"{total} steps in all")
    for arm in arms:
        arm.eta = eta
    measured = cal.measure(arms, task.loss, device, steps=args.steps, min_blocks=args.blocks,
                           warmup=args.warmup, min_period_steps=args.min_period_steps, autocast=autocast)
    state_bytes = {arm.name: arm.adapter.state_bytes() for arm in arms}
    timing = {}
    for arm in arms:
        m = measured["arms"][arm.name]
        timing[arm.name] = {"ordinary_s": m["ordinary_s"], "curvature_s": m["curvature_s"],
                            "amortised_s": m["amortised_s"], "period": m["period"],
                            "steps_per_visit": m["steps_per_visit"], "timed_steps": m["timed_steps"],
                            "block_step_s": m["block_step_s"]}
    del arms
    gc.collect()

    # ---- memory: one arm alive at a time
    meter = PeakMemory(device)
    memory: dict[str, dict[str, Optional[int]]] = {}
    if meter.available and not args.skip_memory:
        for i, n in enumerate(names):
            eta.say(f"memory: {n} ({i + 1}/{len(names)})")
            arm = Arm(n, options[n], build_model, device, timing=True)
            for i in range(args.warmup):
                arm.step(batches[i % len(batches)], task.loss, autocast, sync)
            peaks: dict[str, Optional[int]] = {"ordinary": None, "curvature": None}
            for _ in range(2):
                kind = arm.next_kind()
                base = arm.live_bytes()
                growth = meter.growth(lambda arm=arm: arm.step(batches[0], task.loss, autocast, sync))
                peaks[kind] = max(peaks[kind] or 0, base + growth)
            memory[n] = peaks
            del arm
            gc.collect()

    # ---- dispatched operator calls: one arm at a time, periodic arms with a period of 2 (both kinds of step)
    dispatch: dict[str, dict[str, Optional[int]]] = {}
    if not args.skip_dispatch:
        for i, n in enumerate(names):
            eta.say(f"dispatched ops: {n} ({i + 1}/{len(names)})")
            arm = Arm(n, options[n], build_model, device, timing=True)
            for j in range(max(args.warmup, MEMORY_PERIOD + 1)):
                arm.step(batches[j % len(batches)], task.loss, autocast, sync)
            counts: dict[str, Optional[int]] = {}
            for _ in range(MEMORY_PERIOD if arm.step_period else 1):
                c = count_dispatches(arm, batches[0], task.loss, autocast)
                counts[f"{c['kind']}_total"] = c["total"]
                counts[f"{c['kind']}_optimizer_step"] = c["optimizer_step"]
            dispatch[n] = counts
            del arm
            gc.collect()

    ref_t, ref_state = timing[reference], state_bytes[reference]
    ref_peak = memory.get(reference, {}).get("ordinary")
    rows = []
    for n in names:
        t, mem = timing[n], memory.get(n, {})
        vs = cal.ratio_of(t["block_step_s"], ref_t["block_step_s"]) if n != reference else None
        rows.append({
            "optimizer": n,
            **t,
            "amortised_vs_ref_ci": vs["ratio_ci"] if vs else [1.0, 1.0],
            "ordinary_vs_ref": t["ordinary_s"] / ref_t["ordinary_s"],
            "curvature_vs_ref": (t["curvature_s"] / ref_t["ordinary_s"]) if t["curvature_s"] else None,
            "amortised_vs_ref": vs["ratio"] if vs else 1.0,
            "curvature_vs_ordinary": (t["curvature_s"] / t["ordinary_s"]) if t["curvature_s"] else None,
            "state_bytes": state_bytes[n],
            "state_vs_ref": state_bytes[n] / ref_state if ref_state else None,
            "peak_ordinary_bytes": mem.get("ordinary"),
            "peak_curvature_bytes": mem.get("curvature"),
            "peak_curvature_vs_ordinary": (mem["curvature"] / mem["ordinary"]) if mem.get("curvature") else None,
            "peak_vs_ref": (mem["ordinary"] / ref_peak) if mem.get("ordinary") and ref_peak else None,
            "dispatch": dispatch.get(n),
        })
    return {
        "model": args.model, "batch_size": args.batch_size, "input_shape": list(input_shape),
        "device": str(device), "threads": torch.get_num_threads(), "precision": args.precision,
        "blocks": args.blocks, "steps": args.steps, "warmup": args.warmup, "reference": reference,
        "method": measured.get("method", "abba-blocks (engine.calibration_measure.measure)"), "order": measured["order"],
        "load_avg": measured.get("load_avg"),
        "channels_last": args.channels_last, "compile": args.compile, "memory_period": MEMORY_PERIOD,
        "memory_method": meter.note if not args.skip_memory else None,
        "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    def f(x, spec=".2f", suffix=""):
        return "–" if x is None else f"{x:{spec}}{suffix}"

    ref = result["reference"]
    lines = [
        f"{result['model']}, batch {result['batch_size']}, {result['device']}, {result['threads']} threads, "
        f"{result['precision']}, {result['blocks']} ABBA blocks (engine.calibration_measure.measure, the WCT protocol's "
        f"measurement); ratios to `{ref}` (amortised: per-block geometric mean, 95% CI).",
        "",
        f"| optimizer | ordinary step ms | curvature step ms | curvature / ordinary | amortised ms (period) "
        f"| ordinary × {ref} | curvature × {ref} | amortised × {ref} (95% CI) | state MB | state × {ref} "
        "| peak MB ordinary | peak MB curvature | peak curvature / ordinary |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        mb = 1 / 2**20
        lines.append(
            f"| {r['optimizer']} | {r['ordinary_s'] * 1e3:.0f} | {f(r['curvature_s'] and r['curvature_s'] * 1e3, '.0f')} "
            f"| {f(r['curvature_vs_ordinary'])} | {r['amortised_s'] * 1e3:.0f} ({r['period'] or 1}) "
            f"| {r['ordinary_vs_ref']:.3f} | {f(r['curvature_vs_ref'], '.3f')} | {r['amortised_vs_ref']:.3f} "
            f"({r['amortised_vs_ref_ci'][0]:.3f}–{r['amortised_vs_ref_ci'][1]:.3f}) "
            f"| {r['state_bytes'] * mb:.1f} | {f(r['state_vs_ref'], '.3f')} "
            f"| {f(r['peak_ordinary_bytes'] and r['peak_ordinary_bytes'] * mb, '.0f')} "
            f"| {f(r['peak_curvature_bytes'] and r['peak_curvature_bytes'] * mb, '.0f')} "
            f"| {f(r['peak_curvature_vs_ordinary'], '.3f')} |"
        )
    if result.get("memory_method"):
        lines += ["", f"Peak memory: {result['memory_method']}."]
    lines += dispatch_table(result)
    return "\n".join(lines)


def dispatch_table(result: dict[str, Any]) -> list[str]:
    """Dispatched operator calls per step (a proxy for GPU kernel launches; docs/performance.md)."""
    rows = [r for r in result["rows"] if r.get("dispatch")]
    if not rows:
        return []
    ref = result["reference"]
    ref_step = next((r["dispatch"].get("ordinary_optimizer_step") for r in rows if r["optimizer"] == ref), None)

    def f(x):
        return "–" if x is None else str(x)

    lines = ["", f"Dispatched operator calls per step (ATen calls, each at least one kernel launch on a GPU; "
                 f"{result['model']}, batch {result['batch_size']}): the whole training step (forward, backward, "
                 f"statistics, update) and the optimizer's `step()` alone, on an ordinary and on a statistics "
                 f"(curvature) step; `× {ref} step` divides the update's calls by {ref}'s.",
             "",
             "| optimizer | train step, ordinary | train step, statistics | optimizer.step, ordinary "
             f"| optimizer.step, statistics | × {ref} step (ordinary / statistics) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        d = r["dispatch"]
        o, c = d.get("ordinary_optimizer_step"), d.get("curvature_optimizer_step")
        ratio = (f"{o / ref_step:.1f}" if o is not None and ref_step else "–") + (
            f" / {c / ref_step:.1f}" if c is not None and ref_step else "")
        lines.append(f"| {r['optimizer']} | {f(d.get('ordinary_total'))} | {f(d.get('curvature_total'))} "
                     f"| {f(o)} | {f(c)} | {ratio} |")
    return lines


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small_cnn", help="registered model name (default small_cnn)")
    p.add_argument("--optimizers", default="adam,adamw,adafisher",
                   help="comma-separated optimizer config options (fisherbench/configs/optimizer/<name>.yaml)")
    p.add_argument("--reference", default=None, help="config the ratios are relative to (default adam, else adamw)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--input-shape", type=int, nargs="+", default=None, help="per-example shape (default 3 32 32 / 256)")
    p.add_argument("--num-classes", type=int, default=10, help="classes (or vocabulary size for token models)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--blocks", type=int, default=3, help="at least this many ABBA blocks (>= 2; budgets use >= 3)")
    p.add_argument("--steps", type=int, default=120,
                   help="timed steps per arm (at least; periods are whole curvature periods)")
    p.add_argument("--rounds", type=int, default=None, dest="blocks_alias",
                   help="(old name) sets --blocks; timing now follows engine.calibration_measure.measure")
    p.add_argument("--min-period-steps", type=int, default=None,
                   help="shortest run of consecutive steps per arm (default: 32 on CUDA, 1 on CPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per arm first (at least one period + 1)")
    p.add_argument("--channels-last", action="store_true", help="model and batches in NHWC memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile each arm's model (hook-free optimizers)")
    p.add_argument("--set", action="append", metavar="[CONFIG.]KEY=VALUE",
                   help="override an option in every config that has it, or in one config "
                        "(e.g. --set adafisher.implementation=compiled)")
    p.add_argument("--skip-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--skip-dispatch", action="store_true", help="skip counting dispatched operator calls")
    p.add_argument("--progress-every", type=float, default=10.0,
                   help="seconds between progress lines on stderr (default 10)")
    p.add_argument("--json", default=None, help="also write the full result here")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.blocks_alias is not None:
        print("bench_optimizers: --rounds is the old name of --blocks (ABBA blocks of engine.calibration_measure.measure)",
              file=sys.stderr)
        args.blocks = max(2, args.blocks_alias)
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

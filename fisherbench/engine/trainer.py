"""The training loop: one loop for every optimizer, timed by one budget clock.

Read top to bottom: `Trainer.fit()` runs epochs of `adapter.train_step()` until the budget is used up,
evaluating and checkpointing on the cadence the config gives. The loop knows optimizers only through the
adapter, data only through the `BatchSource`s of the bundle, and the store only through `RunDir`.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import signal
import sys
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from tqdm import tqdm

from fisherbench.core import checkpoint as ckpt
from fisherbench.core.budget import BudgetPlan
from fisherbench.core.distributed import DistInfo, all_reduce_max_, all_reduce_sum_
from fisherbench.core.env import to_channels_last
from fisherbench.core.ledger import Clock, Ledger
from fisherbench.core.modules import unwrap
from fisherbench.core.schedule import lr_multiplier, set_lr
from fisherbench.core.status import Status
from fisherbench.core.store import RunDir
from fisherbench.core.tasks import MetricSums, Task, selection_of
from fisherbench.data.registry import DataBundle
from fisherbench.engine.labels import current_label, line_tag
from fisherbench.optim.registry import OptimizerAdapter


@dataclass
class TrainState:
    """Where the run is. Saved in checkpoints; everything else is rebuilt from the config."""

    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # optimizer steps done in total
    evals_done: int = 0  # metric rows in the store
    next_fraction_eval: float = 0.0  # for eval.every_fraction
    last_ckpt_train_s: float = 0.0
    best: Optional[dict[str, Any]] = None  # the evaluation row selected by the task's metric
    last_eval: Optional[dict[str, Any]] = None
    last_eval_step: int = -1
    status: Status = Status.RUNNING  # checkpoints hold its string value
    stop_reason: Optional[str] = None
    diverged: Optional[dict[str, Any]] = None
    train_loss_sum: float = 0.0  # since the last evaluation
    train_count: int = 0
    train_correct: float = 0.0


Learned = tuple[int, int, int, float]  # a step loss the host has read: (step, epoch, batch size, loss)


class Next(Enum):
    """Where the loop goes after a step."""

    BATCH = "batch"  # on with the epoch
    EPOCH = "epoch"  # the epoch is done: start the next one
    STOP = "stop"  # the run ends, with `Decision.status`


@dataclass(frozen=True)
class Decision:
    """What a step calls for, decided before anything is done about it (`Trainer._decide` / `Trainer._act`)."""

    then: Next
    evaluate: bool = False  # evaluate now (an evaluation is due, or the run ends)
    checkpoint: bool = False  # save a checkpoint now (one is due, or a stop signal came)
    status: Optional[Status] = None  # how the run ended, when `then` is STOP
    reason: Optional[str] = None  # the stop reason recorded with `status`


class _StopSignals:
    """SIGTERM / SIGINT (Ctrl-C) / SIGUSR1 set a flag that the loop checks (checkpoint, then stop as preempted).

    Ctrl-C is a stop request like the others: the run checkpoints and records `preempted` (exit 4) instead of
    dying with a traceback; a second Ctrl-C while it does so is not needed and is ignored until it is done.
    """

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGINT", None),
                                getattr(signal, "SIGUSR1", None)) if s)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        try:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


class LossWindow:
    """Per-step training losses kept on the device and read by the host without stalling it.

    Step losses go into a device buffer of `k` slots (a copy kernel, no synchronisation). When the buffer is
    full, its content is copied to host memory asynchronously (pinned memory and a CUDA event on a GPU) and
    the copy queued `k` steps earlier, long finished, is read: the host learns every loss, and the exact step
    of a non-finite one, one window late, without ever draining the device queue. `flush()` reads all that is
    left (one synchronisation); the trainer calls it only where it synchronises anyway (evaluation,
    checkpoint, the end). Each entry is (step, epoch, batch size, loss). With k = 1 every step is read at once
    (one sync per step: the step-synchronous behaviour, kept as the reference the tests compare against).
    """

    def __init__(self, k: int, device: torch.device) -> None:
        self.k = k
        self.device = device
        self.buffer = torch.zeros(k, dtype=torch.float32, device=device)
        self.host = torch.zeros(k, dtype=torch.float32, pin_memory=device.type == "cuda")
        self.entries: list[tuple[int, int, int]] = []  # (step, epoch, n) of the slots filled in this window
        self.pending: Optional[tuple[list[tuple[int, int, int]], Any]] = None  # copied, not yet read
        self.event_waits = 0  # reads that had to wait for the device (a window copy not finished after k steps)
        self.synced = False  # whether the last flush() left the device idle (the clock then needs no sync)

    def record(self, loss: torch.Tensor, step: int, epoch: int, n: int) -> list[tuple[int, int, int, float]]:
        self.buffer[len(self.entries)] = loss
        self.entries.append((step, epoch, n))
        if self.k == 1:  # check_every=1: the step-synchronous reference (a host sync every step)
            return self.flush()
        return self._rotate() if len(self.entries) == self.k else []

    def _rotate(self) -> list[tuple[int, int, int, float]]:
        done = self._read_pending()
        self.host.copy_(self.buffer, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.pending, self.entries = (self.entries, event), []
        return done

    def _read_pending(self) -> list[tuple[int, int, int, float]]:
        if self.pending is None:
            return []
        entries, event = self.pending
        self.pending = None
        if event is not None and not event.query():
            self.event_waits += 1
            event.synchronize()
        # host memory, complete once the event has passed: reading it never waits for the device
        values = self.host.numpy()[: len(entries)].tolist()
        return [(*e, v) for e, v in zip(entries, values)]

    def flush(self) -> list[tuple[int, int, int, float]]:
        """Everything not yet read, in step order (one synchronisation when the current window has entries)."""
        self.synced = self.pending is not None and not self.entries  # the pending copy was queued last
        out = self._read_pending()
        if self.entries:
            self.synced = True
            values = self.buffer[: len(self.entries)].tolist()  # host sync: the caller stops here anyway
            out += [(*e, v) for e, v in zip(self.entries, values)]
            self.entries = []
        return out


class Progress:
    """What a run prints while it trains (`logger.progress`).

    `auto`: a tqdm bar on a terminal; without one (SLURM, `tee`, `nohup`) one plain line per evaluation, which
    reads well in a log file. `always`: the bar, with the same line per evaluation written above it (they stay
    on screen when the bar is cleared at the end); `lines`: the plain lines; `never`: nothing. Only the main rank
    prints. Every line starts with the run's tag (its label inside a multirun, engine/labels.py). The bar is
    updated when the host learns step losses (a window late), never with a device sync.
    """

    def __init__(self, mode: str, plan: BudgetPlan, initial_step: int, is_main: bool,
                 select_key: str = "") -> None:
        if mode == "auto":
            mode = "always" if sys.stderr.isatty() else "lines"
        self.lines = is_main and mode in ("lines", "always")
        self.select_key = select_key
        self.bar = None
        if is_main and mode == "always":
            total = plan.total_steps
            self.bar = tqdm(total=total, initial=initial_step if total else 0, unit="step", dynamic_ncols=True,
                            leave=False, file=sys.stderr, desc=current_label() or None)

    def update(self, steps: int, epoch: int, loss: float) -> None:
        if self.bar is not None and steps:
            self.bar.update(steps)
            self.bar.set_postfix_str(f"epoch {epoch} loss {loss:.4f}", refresh=False)

    def evaluation(self, row: dict[str, Any]) -> None:
        """One line per evaluation: where the run is, its budget clock, the selection metric."""
        if not self.lines:
            return
        parts = [f"eval {row['eval']}", f"epoch {row['epoch']:.2f}", f"step {row['step']}",
                 f"train {row['train_s']:.1f}s"]
        for key in dict.fromkeys([self.select_key, "train/loss", "test/acc1", "val/acc1", "val/ppl"]):
            value = row.get(key)
            if key and isinstance(value, (int, float)):
                parts.append(f"{key} {value:.4f}")
        line = f"{line_tag()} " + " · ".join(parts)
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)  # above the bar, which redraws below it
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Trainer:
    cfg: Any  # the resolved TrainConfig (DictConfig)
    model: nn.Module
    adapter: OptimizerAdapter
    bundle: DataBundle
    task: Task
    plan: BudgetPlan
    device: torch.device
    run_dir: Optional[RunDir]  # None on non-main ranks
    logger: Any
    dist: DistInfo = field(default_factory=DistInfo)
    ledger: Ledger = field(default_factory=Ledger)
    state: TrainState = field(default_factory=TrainState)
    run_id: str = ""
    on_eval: Optional[Callable[[dict[str, Any]], None]] = None  # extra per-evaluation hook (e.g. analysis)
    # called before every write to the store (metrics, checkpoints): raises if this process lost the run's lock
    guard: Callable[[], None] = lambda: None
    # called with the step count after every optimizer step: tests install fault injection here (engine/faults.py)
    after_step: list[Callable[[int], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.clock = Clock(self.ledger, self.device.type)
        self.autocast: Callable[[], Any] = contextlib.nullcontext
        if self.cfg.precision == "bf16":
            self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        self.channels_last = bool(self.cfg.get("channels_last", False))
        self.check_every = int(self.cfg.get("check_every", 16) or 16)
        # a stop signal is a host flag, free to look at every step in one process; under DDP every rank must
        # stop at the same step, which takes a collective, so ranks agree on it at the k-step checks only
        self.signals_every_step = not self.dist.enabled
        self.steps_per_epoch = len(self.bundle.train)
        self.correct_acc: Optional[torch.Tensor] = None
        self.window: Optional[LossWindow] = None
        self._exact = False  # in the last steps of a seconds budget: read the clock exactly every step

    # ------------------------------------------------------------------------------------------- loop
    def fit(self) -> TrainState:
        st, plan, cfg = self.state, self.plan, self.cfg
        self.model.train()
        self.progress = Progress(cfg.logger.progress, plan, st.step, self.dist.is_main, self.selection[0])
        self.window = LossWindow(self.check_every, self.device)
        self._exact = False
        with _StopSignals() as signals:
            self.clock.start_wall()
            if st.step == 0 and self._warmup_steps() > 0:
                self.warm_up(self._warmup_steps())
            try:
                self._loop(signals)
            finally:
                self.progress.close()
                self.clock.stop_wall(st.step)
        return st

    def _warmup_steps(self) -> int:
        """Configured warm-up steps; at least 2 with compile=true, so compilation never lands in the budget, and
        at least 1 otherwise: one-off first-step costs (lazy initialisation, allocation, autotuning) are excluded
        from train_s as a calibration excludes them, so equal time means the same thing in `budget=match` and
        `budget=reference` (docs/wall-clock.md)."""
        steps = int(self.cfg.budget.warmup_steps)
        return max(steps, 2) if self.cfg.get("compile", False) else max(steps, 1)

    def _loop(self, signals: _StopSignals) -> None:
        """Fetch a batch, take a step, decide what the step calls for, act on it; until a decision stops the run."""
        if self.plan.exhausted(self.state.step, self.ledger.train_s):
            self.state.status = Status.COMPLETED
            return
        batches = self._start_epoch()
        while True:
            batch = self._fetch_batch(batches)
            if batch is None:  # the source ran out before the epoch's step count: iterate it again from here
                batches = self._start_epoch()
                continue
            decision = self._decide(*self._train_step(*batch), signals)
            self._act(decision)
            if decision.then is Next.STOP:
                return
            if decision.then is Next.EPOCH:
                batches = self._start_epoch()

    def _start_epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The current epoch's batches from where the run is; an epoch-interval schedule sets the lr here."""
        st = self.state
        if self.cfg.schedule.interval == "epoch":
            progress = self.plan.progress(st.step, self.clock.train_s_estimate(st.step), epoch_start=st.epoch)
            self._set_lr(progress)
        return self.bundle.train.iterate(st.epoch, st.batch)

    def _fetch_batch(
        self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The next batch on the device, or None when `batches` ran out. Opens a timed segment unless one is
        open: the wait for the batch is budget time (and also counted in data_s)."""
        clock = self.clock
        clock.open_segment(self.state.step)
        t0 = clock.timer()
        try:
            inputs, targets = next(batches)
        except StopIteration:
            return None
        inputs, targets = self._to_device(inputs), self._to_device(targets)
        self.ledger.data_s += clock.timer() - t0  # the wait for this batch (host clock, no sync)
        return inputs, targets

    def _train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[list[Learned], bool]:
        """One optimizer step (timed), then the `after_step` hooks. Returns the step losses the host has learned
        (a window late, no sync) and whether this step ended the epoch (the position has then moved on)."""
        st, window = self.state, self.window
        assert window is not None  # fit() sets it
        if self.cfg.schedule.interval == "step":
            self._set_lr(self.plan.progress(st.step, self.clock.train_s_estimate(st.step)))
        out = self.adapter.train_step(self.model, inputs, targets, self.task.loss, self.autocast)
        self._accumulate_correct(out.outputs, targets)
        st.step += 1
        st.batch += 1
        self.clock.step_done(st.step)
        learned = window.record(out.loss, st.step, st.epoch, int(targets.shape[0]))
        for hook in self.after_step:  # fault injection (engine/faults.py); empty in a normal run
            hook(st.step)
        epoch_done = st.batch >= self.steps_per_epoch
        if epoch_done:
            st.epoch, st.batch = st.epoch + 1, 0
        return learned, epoch_done

    def _decide(self, learned: list[Learned], epoch_done: bool, signals: _StopSignals) -> Decision:
        """What the step just taken calls for, from what the host knows without waiting for the device, except
        at a sync point (an evaluation, a checkpoint or a stop is due), where the loop waits anyway."""
        st, plan = self.state, self.plan
        # k-step checks; under DDP the only steps where ranks exchange flags (same steps on every rank)
        check = st.step % self.check_every == 0 or self._exact or epoch_done
        stop_requested, budget_done, train_s = self._stop_and_budget(check, signals)
        eval_due = self._eval_due(epoch_done, plan.progress(st.step, train_s))
        ckpt_due = self._checkpoint_due(epoch_done, train_s)
        sync_point = stop_requested or budget_done or eval_due or ckpt_due
        nonfinite, budget_done = self._read_losses(learned, sync_point, check, budget_done, train_s)
        if nonfinite:
            return Decision(Next.STOP, evaluate=True, status=Status.DIVERGED, reason="non-finite training loss")
        if stop_requested:  # checkpoint first, so that the run resumes from here
            return Decision(Next.STOP, evaluate=eval_due or budget_done, checkpoint=True, status=Status.PREEMPTED,
                            reason=f"signal {signals.received}")
        if budget_done:
            status = Status.BUDGET_EXHAUSTED if plan.mode == "seconds" else Status.COMPLETED
            return Decision(Next.STOP, evaluate=True, status=status)
        return Decision(Next.EPOCH if epoch_done else Next.BATCH, evaluate=eval_due, checkpoint=ckpt_due)

    def _stop_and_budget(self, check: bool, signals: _StopSignals) -> tuple[bool, bool, float]:
        """(stop requested, budget used up, train_s) after the step; under DDP what every rank knows alike."""
        stop_requested = signals.received is not None and (self.signals_every_step or check)
        budget_done, train_s = self._budget_state(check)
        if not self.dist.enabled:
            return stop_requested, budget_done, train_s
        if not check:  # decide only on what every rank knows alike
            return False, budget_done, getattr(self, "_agreed_train_s", self.ledger.train_s)
        _, stop_requested, train_s = self._agree(False, stop_requested, train_s)
        self._agreed_train_s = train_s
        if self.plan.mode == "seconds":
            budget_done = self.plan.exhausted(self.state.step, train_s)
        return stop_requested, budget_done, train_s

    def _read_losses(self, learned: list[Learned], sync_point: bool, check: bool, budget_done: bool,
                     train_s: float) -> tuple[bool, bool]:
        """Fold the learned step losses in: (a loss was non-finite, budget used up). At a sync point every loss
        and the exact clock are read (the loop stops there anyway); under DDP ranks agree on both."""
        st, plan, window = self.state, self.plan, self.window
        assert window is not None  # fit() sets it
        nonfinite = self._learn(learned)
        if sync_point:
            nonfinite = self._learn(window.flush()) or nonfinite
            self.clock.close_segment(st.step, synced=window.synced)
            train_s = self.ledger.train_s
            budget_done = plan.exhausted(st.step, train_s)
        if self.dist.enabled and (check or sync_point):
            nonfinite, _, train_s = self._agree(nonfinite, False, train_s)
            budget_done = plan.exhausted(st.step, train_s)
        return nonfinite, budget_done

    def _act(self, decision: Decision) -> None:
        """Evaluate, checkpoint and record the run's end as `decision` says (outside the budget clock)."""
        st = self.state
        if decision.status is Status.DIVERGED:
            self._record_divergence()  # before the evaluation, which records where the run stopped
        if decision.evaluate:
            self.evaluate()
        if decision.checkpoint:
            self.save_checkpoint()  # before the status changes: the checkpoint holds a running run
        if decision.status is not None:
            st.status = decision.status
            st.stop_reason = decision.reason if decision.reason is not None else st.stop_reason

    def _record_divergence(self) -> None:
        """Read the losses still on the device, close the clock and note where the run diverged."""
        st, window = self.state, self.window
        assert window is not None  # fit() sets it
        self._learn(window.flush())
        self.clock.close_segment(st.step, synced=window.synced)
        st.status, st.stop_reason = Status.DIVERGED, "non-finite training loss"
        if st.diverged is None:  # another rank diverged: this one's losses were finite
            st.diverged = {"step": st.step, "epoch": st.epoch, "train_s": self.ledger.train_s, "loss": math.nan}
        st.diverged["detected_at_step"] = st.step

    def _budget_state(self, check: bool) -> tuple[bool, float]:
        """(budget used up, train_s) after the step just launched, without a host sync where possible.

        Steps/epochs budgets are host arithmetic (exact). A seconds budget uses the clock's lazy estimate
        until the estimate comes within two long steps of the budget (in one process: at any step; under
        DDP: at a k-step check, where the ranks agree); from then on every step reads the clock exactly (one
        sync per step, for the last few steps only), so the run stops at the first boundary past the budget.
        """
        st, plan, clock = self.state, self.plan, self.clock
        if plan.mode != "seconds":
            return plan.exhausted(st.step, 0.0), clock.train_s_estimate(st.step)
        if not self._exact:
            estimate = clock.train_s_estimate(st.step)
            ahead = clock.margin_s() * (1 if not self.dist.enabled else self.check_every + 1)
            assert plan.seconds is not None  # a seconds budget has its seconds
            near = estimate + ahead >= plan.seconds
            if self.dist.enabled:
                if not check:
                    return False, estimate
                near = self._agree_flag(near)
            if not near:
                return False, estimate
            self._exact = True
        train_s = clock.read_exact(st.step)
        return plan.exhausted(st.step, train_s), train_s

    def _learn(self, learned: list[tuple[int, int, int, float]]) -> bool:
        """Fold step losses the host has just learned into the running sums; True at a non-finite one."""
        st = self.state
        nonfinite = False
        for step, epoch, n, loss in learned:
            st.train_loss_sum += loss * n
            st.train_count += n
            if not math.isfinite(loss):
                nonfinite = True
                if st.diverged is None:
                    st.diverged = {"step": step, "epoch": epoch, "loss": loss,
                                   "train_s": self.clock.train_s_at(step)}
        if learned:
            self.progress.update(len(learned), learned[-1][1], learned[-1][3])
        return nonfinite

    def _agree_flag(self, flag: bool) -> bool:
        t = torch.tensor([float(flag)], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        all_reduce_max_(t, self.dist)
        return bool(t[0] > 0)

    def _agree(self, nonfinite: bool, stop: bool, train_s: float) -> tuple[bool, bool, float]:
        """Under DDP every rank must take the same decision: max over ranks of the flags and the clock."""
        if not self.dist.enabled:
            return nonfinite, stop, train_s
        t = torch.tensor([float(nonfinite), float(stop), train_s], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        all_reduce_max_(t, self.dist)
        return bool(t[0] > 0), bool(t[1] > 0), float(t[2])

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Batches of host-side loaders move here (a no-op for device-resident data); NHWC for channels_last."""
        t = t.to(self.device, non_blocking=True)
        return to_channels_last(t) if self.channels_last else t

    def _set_lr(self, progress: float) -> None:
        set_lr(self.adapter.param_groups, lr_multiplier(self.cfg.schedule, progress))

    def _accumulate_correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Correct predictions summed on the device (read at evaluation time)."""
        if self.task.name == "classification" and outputs.ndim == 2:
            correct = (outputs.argmax(1) == targets).sum()
            self.correct_acc = correct if self.correct_acc is None else self.correct_acc + correct

    def _eval_due(self, epoch_done: bool, fraction: float) -> bool:
        e, st = self.cfg.eval, self.state
        due = bool(epoch_done and e.every_epochs and st.epoch % e.every_epochs == 0)
        if e.every_fraction:
            if fraction + 1e-12 >= st.next_fraction_eval + e.every_fraction:
                st.next_fraction_eval = math.floor((fraction + 1e-12) / e.every_fraction) * e.every_fraction
                due = True
        return due

    def _checkpoint_due(self, epoch_done: bool, train_s: float) -> bool:
        c = self.cfg.checkpoint
        if not c.enabled:
            return False
        if epoch_done and c.every_epochs and self.state.epoch % c.every_epochs == 0:
            return True
        return bool(c.every_seconds and train_s - self.state.last_ckpt_train_s >= c.every_seconds)

    # -------------------------------------------------------------------------------------- warm-up
    def warm_up(self, steps: int) -> None:
        """Untimed steps (cudnn autotune, allocator, lazy init, compilation) whose effects are then undone.

        With compile=true the epoch's last batch is also taken when its size differs from the others, so the
        second compilation (a new shape) happens here too, not inside the budget.
        """
        with self.clock.section("warmup_s"):
            model_state = copy.deepcopy(self.model.state_dict())
            opt_state = copy.deepcopy(self.adapter.state_dict())
            rng = ckpt.rng_state()
            source = self.bundle.train
            batches = list(itertools.islice(source.iterate(0, 0), min(steps, self.steps_per_epoch)))
            if self.cfg.get("compile", False) and self.steps_per_epoch > len(batches):
                last = next(source.iterate(0, self.steps_per_epoch - 1))
                if batches and last[0].shape != batches[0][0].shape:
                    batches.append(last)
            for inputs, targets in batches:
                inputs, targets = self._to_device(inputs), self._to_device(targets)
                self.adapter.train_step(self.model, inputs, targets, self.task.loss, self.autocast)
            self.model.load_state_dict(model_state)
            self.adapter.load_state_dict(opt_state)
            ckpt.set_rng_state(rng)

    # ----------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def _evaluate_splits(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        limit = self.cfg.eval.max_batches
        # the inner module: a DDP wrapper may issue collectives in forward, and ranks' eval shards can differ
        model = unwrap(self.model)
        self.model.eval()
        try:
            with self.adapter.eval_weights(), self.autocast():
                for split, source in self.bundle.evals.items():
                    sums = MetricSums(self.task)
                    for i, (inputs, targets) in enumerate(source.iterate(0)):
                        if limit is not None and i >= limit:
                            break
                        inputs, targets = self._to_device(inputs), self._to_device(targets)
                        sums.add(model(inputs), targets)
                    if self.dist.enabled:
                        for v in sums.sums.values():
                            all_reduce_sum_(v, self.dist)
                    metrics.update({f"{split}/{k}": v for k, v in sums.compute().items()})
        finally:
            self.model.train()
        return metrics

    def _train_metrics(self) -> dict[str, float]:
        st = self.state
        if st.train_count == 0:
            return {}
        out = {"train/loss": st.train_loss_sum / st.train_count}
        if self.task.name == "classification":
            self._flush_correct()
            out["train/acc1"] = st.train_correct / st.train_count
        st.train_loss_sum, st.train_count, st.train_correct = 0.0, 0, 0.0
        return out

    def evaluate(self) -> dict[str, Any]:
        st = self.state
        if st.last_eval_step == st.step:
            return st.last_eval or {}
        with self.clock.section("eval_s"):
            metrics = self._evaluate_splits()
        with self.clock.section("log_s"):
            row: dict[str, Any] = {
                "eval": st.evals_done,
                "step": st.step,
                "epoch": st.epoch + st.batch / max(1, self.steps_per_epoch),
                "train_s": self.ledger.train_s,
                "data_s": self.ledger.data_s,  # part of train_s spent waiting for batches (cumulative)
                "wall_s": self.clock.wall_so_far(),
                "lr": self.adapter.param_groups[0]["lr"],
                **self._train_metrics(),
                **metrics,
                **{f"opt/{k}": v for k, v in self.adapter.diagnostics().items()},
            }
            st.evals_done += 1
            st.last_eval, st.last_eval_step = row, st.step
            if self._is_better(row):
                st.best = row
            if self.run_dir is not None:
                self.guard()
                self.run_dir.append_metrics(row)
                self.logger.log(row, step=st.step)
            if getattr(self, "progress", None) is not None:  # evaluations outside fit() print nothing
                self.progress.evaluation(row)
            if self.on_eval is not None:
                self.on_eval(row)
        return row

    @property
    def selection(self) -> tuple[str, bool]:
        """(row key, higher is better) of the metric that picks the best evaluation (`selection.*`)."""
        sel = self.cfg.get("selection") or {}
        return selection_of(self.task, sel.get("metric"), sel.get("mode"))

    def _is_better(self, row: dict[str, Any]) -> bool:
        key, higher_is_better = self.selection
        value = row.get(key)
        if value is None or not math.isfinite(value):
            return False
        if self.state.best is None or not math.isfinite(self.state.best.get(key, math.nan)):
            return True
        best = self.state.best[key]
        return bool(value > best if higher_is_better else value < best)

    # ---------------------------------------------------------------------------------- checkpoints
    def checkpoint_payload(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "data_fingerprint": self.bundle.fingerprint,  # resuming on other data is refused (core/checkpoint.py)
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.adapter.state_dict(),
            "state": asdict(self.state) | {"status": self.state.status.value},  # weights-only loadable
            "ledger": self.ledger.as_dict() | {"wall_s": self.clock.wall_so_far()},
            "rng": ckpt.rng_state(),
            "wandb_id": self.run_id,
        }

    def save_checkpoint(self) -> None:
        if self.run_dir is None or not self.cfg.checkpoint.enabled:
            return
        with self.clock.section("ckpt_s"):
            self._flush_correct()
            self.guard()
            ckpt.save(self.run_dir.checkpoint_path, self.checkpoint_payload())
            self.state.last_ckpt_train_s = self.ledger.train_s

    def _flush_correct(self) -> None:
        if self.correct_acc is not None:
            self.state.train_correct += float(self.correct_acc)
            self.correct_acc = None

    def restore(self, payload: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(payload["model"])
        self.adapter.load_state_dict(payload["optimizer"])
        saved = payload["state"]
        self.state = TrainState(**(saved | {"status": Status.parse(saved.get("status", Status.RUNNING))}))
        restored = Ledger.from_dict(payload["ledger"])
        for k in restored.__dataclass_fields__:
            setattr(self.ledger, k, getattr(restored, k))
        ckpt.set_rng_state(payload["rng"])

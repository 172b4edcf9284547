"""Fault injection: hooks a `Trainer` calls with the step count after each optimizer step (`after_step`).

Tests install them to make a real run fail in a controlled place. In-process, append a hook to
`trainer.after_step` (e.g. from `run(cfg, on_trainer=...)`); for a `train.py` subprocess, set
`FISHERBENCH_FAULT_AT_STEP=N` (hard exit after step N: no cleanup, no checkpoint, like kill -9) or
`FISHERBENCH_SIGNAL_AT_STEP=N[:SIGNAME]` (this process sends itself the signal after step N, so the real
signal handling runs); `hooks_from_env()` turns them into hooks when a run is built. A run without either
variable has no hook and the loop pays nothing.
"""
from __future__ import annotations

import os
import signal
from typing import Callable, Mapping, Optional

FAULT_ENV = "FISHERBENCH_FAULT_AT_STEP"
SIGNAL_ENV = "FISHERBENCH_SIGNAL_AT_STEP"
CRASH_EXIT_CODE = 86  # what a simulated hard crash exits with

StepHook = Callable[[int], None]


def crash_at(step: int) -> StepHook:
    """Exit at once, without cleanup, once the step count reaches `step`."""

    def hook(done: int) -> None:
        if done >= step:
            os._exit(CRASH_EXIT_CODE)

    return hook


def signal_at(step: int, signum: int = signal.SIGTERM) -> StepHook:
    """Send this process `signum` right after optimizer step `step`."""

    def hook(done: int) -> None:
        if done == step:
            os.kill(os.getpid(), signum)

    return hook


def hooks_from_env(environ: Optional[Mapping[str, str]] = None) -> list[StepHook]:
    """The hooks `FISHERBENCH_FAULT_AT_STEP` / `FISHERBENCH_SIGNAL_AT_STEP` ask for (none when unset)."""
    env = os.environ if environ is None else environ
    hooks = []
    if env.get(FAULT_ENV):
        hooks.append(crash_at(int(env[FAULT_ENV])))
    if env.get(SIGNAL_ENV):
        step, _, name = env[SIGNAL_ENV].partition(":")
        hooks.append(signal_at(int(step), int(getattr(signal, name or "SIGTERM"))))
    return hooks

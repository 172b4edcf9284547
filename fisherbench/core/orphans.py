"""Children that stop when the process that started them dies (issue 19: a SIGKILLed sweep left its runs
training, holding their locks and the GPUs, with nobody to read their outcome).

Two mechanisms, because neither covers every case alone:

* `die_with_parent_kwargs()` gives `subprocess.Popen` a `preexec_fn` that, in the child before it runs the
  command, asks Linux to send the child SIGTERM when its parent dies (`prctl(PR_SET_PDEATHSIG)`), then exits
  at once if the parent is already gone (it may die between fork and prctl). SIGTERM is the suite's stop
  signal: a run checkpoints and exits 4 (preempted), and relaunching the sweep resumes it. Linux delivers the
  signal when the *thread* that forked the child ends; the sweep forks each run from the worker thread that
  waits for it, so the thread outlives the run.
* `watch_parent()` is the fallback elsewhere (no prctl, e.g. macOS) and for grandchildren (the workers of
  `torchrun`): a daemon thread in the child polls its parent pid and sends itself SIGTERM once the parent
  has gone (the child was re-parented). `fisherbench.train` starts it when `PARENT_WATCH_ENV` is set, which
  `die_with_parent_kwargs()` sets for the child.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

PARENT_WATCH_ENV = "FISHERBENCH_WATCH_PARENT"  # set to "1" in a child that must stop when its parent dies
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 1.0


def _prctl() -> Optional[Callable[..., int]]:
    """libc's prctl, looked up in the parent (nothing may be loaded between fork and exec); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


def _death_signal_preexec(parent: int, prctl: Callable[..., int]) -> Callable[[], None]:
    sig = ctypes.c_ulong(int(signal.SIGTERM))

    def preexec() -> None:  # runs in the child between fork and exec: no imports, no allocation-heavy work
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: the signal will never come
            os._exit(128 + int(signal.SIGTERM))

    return preexec


def die_with_parent_kwargs() -> dict[str, Any]:
    """`subprocess.Popen` keyword arguments that make the child stop (SIGTERM) when this process dies; merge
    `env` with `PARENT_WATCH_ENV` yourself (see `child_env`)."""
    prctl = _prctl()
    return {"preexec_fn": _death_signal_preexec(os.getpid(), prctl)} if prctl is not None else {}


def child_env(env: dict[str, str]) -> dict[str, str]:
    """`env` plus the flag that makes a `fisherbench.train` child watch its parent (the fallback)."""
    return {**env, PARENT_WATCH_ENV: "1"}


def watch_parent(poll_s: float = POLL_S, on_orphaned: Optional[Callable[[], None]] = None) -> threading.Thread:
    """Start a daemon thread that calls `on_orphaned` (default: SIGTERM to this process) once this process's
    parent has died, i.e. once `os.getppid()` differs from what it is now."""
    parent = os.getppid()

    def orphaned() -> None:
        print(f"[fisherbench] the parent process {parent} has gone: stopping (the run checkpoints and can be "
              "resumed)", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    action = on_orphaned or orphaned

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        action()

    thread = threading.Thread(target=watch, name="fisherbench-parent-watch", daemon=True)
    thread.start()
    return thread


def watch_parent_from_env() -> Optional[threading.Thread]:
    """`watch_parent()` when this process was started with `PARENT_WATCH_ENV=1` (by a sweep)."""
    if os.environ.get(PARENT_WATCH_ENV) == "1":
        return watch_parent()
    return None

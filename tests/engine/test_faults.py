"""Fault injection is a hook the trainer calls after each step; tests install it, the loop knows nothing of it."""
from __future__ import annotations

import signal

from fisherbench.core.status import Status
from fisherbench.engine.faults import FAULT_ENV, SIGNAL_ENV, crash_at, hooks_from_env, signal_at


def test_an_installed_hook_stops_a_real_run_where_it_says(tmp_path):
    from fisherbench.engine.compose import compose_config
    from fisherbench.engine.lifecycle import run
    from tests.conftest import TINY

    seen: list[int] = []

    def install(trainer):
        trainer.after_step += [seen.append, signal_at(3, signal.SIGTERM)]

    cfg = compose_config([*TINY, f"results_dir={tmp_path}", "budget=steps", "budget.steps=8"])
    result = run(cfg, on_trainer=install)
    assert result.status is Status.PREEMPTED and result.summary["steps"] == 3
    assert seen == [1, 2, 3]


def test_a_run_without_the_variables_has_no_hook():
    assert hooks_from_env({}) == []
    hooks = hooks_from_env({FAULT_ENV: "7", SIGNAL_ENV: "5:SIGUSR1"})
    assert len(hooks) == 2
    crash_at(10)(9)  # before its step: nothing happens

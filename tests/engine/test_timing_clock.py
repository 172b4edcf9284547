"""The asynchronous hot loop on a fake clock: the lazy budget clock against the step-synchronous one, the
seconds-budget overshoot bound, divergence found at its exact step under the lazy check, k-step signal
handling, and the host-sync counter of scripts/bench_harness.py (which must see the per-step sync of
check_every=1 and none per step otherwise)."""
import importlib.util
import math
import signal
import sys
from pathlib import Path

import pytest
import torch

from fisherbench.core.ledger import PARTS, Clock, Ledger
from fisherbench.core.store import RunDir
from fisherbench.engine.compose import compose_config
from fisherbench.engine.lifecycle import run
from fisherbench.optim.registry import StepOutput
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[2]


class FakeTime:
    """A clock that moves only when told: each training step costs `step_cost(step)`, every reading 1 us."""

    def __init__(self, step_cost):
        self.t = 100.0
        self.step_cost = step_cost
        self.steps = 0

    def __call__(self) -> float:
        self.t += 1e-6  # the loop's own bookkeeping between readings
        return self.t

    def step(self) -> None:
        self.steps += 1
        self.t += self.step_cost(self.steps)


def _fake_timed(fake: FakeTime, nan_at=None):
    """on_trainer hook: the trainer's clock reads `fake`, and each train_step advances it."""

    def hook(trainer):
        trainer.clock = Clock(trainer.ledger, "cpu", timer=fake)
        trainer.warm_up = lambda steps: None  # the fake clock and `nan_at` count training steps only
        real = trainer.adapter.train_step

        def train_step(*args, **kwargs):
            out = real(*args, **kwargs)
            fake.step()
            if nan_at is not None and fake.steps >= nan_at:
                return StepOutput(torch.full_like(out.loss, math.nan), out.outputs)
            return out

        trainer.adapter.train_step = train_step

    return hook


def _run(tmp_path, name, *overrides, hook=None):
    cfg = compose_config([*TINY, f"results_dir={tmp_path / name}", *overrides])
    return run(cfg, on_trainer=hook)


def _curvature_like(step: int) -> float:
    return 0.05 if step % 10 == 0 else 0.01  # every 10th step five times longer


def test_lazy_clock_ledger_matches_the_step_synchronous_one(tmp_path):
    runs = {}
    for k in (1, 16):
        fake = FakeTime(_curvature_like)
        r = _run(tmp_path, f"k{k}", "budget=epochs", "budget.epochs=5", "eval.every_fraction=0.3",
                 f"check_every={k}", hook=_fake_timed(fake))
        runs[k] = r.summary["ledger"]
        led = runs[k]
        assert abs(sum(led[p] for p in PARTS) - led["wall_s"]) <= 1e-6 + 1e-9 * led["wall_s"]  # adds up
    lazy, sync = runs[16], runs[1]
    expected = sum(_curvature_like(s) for s in range(1, 21))  # 5 epochs x 4 steps
    for led in (lazy, sync):
        assert led["train_s"] == pytest.approx(expected, rel=0.01)  # only the 1-us readings differ
    assert lazy["train_s"] == pytest.approx(sync["train_s"], rel=0.05)
    assert lazy["wall_s"] == pytest.approx(sync["wall_s"], rel=0.05)


@pytest.mark.parametrize("check_every", [1, 16])
def test_seconds_budget_overshoot_stays_below_one_step_and_half_a_percent(tmp_path, check_every):
    fake = FakeTime(lambda step: 0.004 if step % 10 else 0.009)  # steps of 4 ms, every 10th 9 ms
    r = _run(tmp_path, "a", "budget=seconds", "budget.seconds=2.0", "data.num_train=512",
             f"check_every={check_every}", hook=_fake_timed(fake))
    s = r.summary
    assert s["status"] == "budget_exhausted"
    train_s = s["ledger"]["train_s"]
    assert 2.0 <= train_s <= 2.0 + 0.009 + 1e-3  # stopped at the first step boundary past the budget
    assert train_s - 2.0 <= 0.005 * 2.0
    steps_before_budget = 0
    t = 0.0
    while t < 2.0:
        steps_before_budget += 1
        t += 0.004 if steps_before_budget % 10 else 0.009
    # the first boundary at or past the budget (the loop's 1-us readings count as training time: one step less)
    assert s["steps"] in (steps_before_budget - 1, steps_before_budget)


def test_lazy_seconds_budget_reads_the_clock_exactly_only_near_the_end(tmp_path):
    fake = FakeTime(lambda step: 0.004)
    clocks = []

    def hook(trainer):
        _fake_timed(fake)(trainer)
        clocks.append(trainer.clock)

    r = _run(tmp_path, "a", "budget=seconds", "budget.seconds=2.0", "data.num_train=512", "eval.every_epochs=null",
             "checkpoint.enabled=false", hook=hook)
    assert r.summary["steps"] == 500
    # start/stop of the wall clock, the final evaluation's sections, and exact reads in the last few steps
    assert clocks[0].syncs <= 12


def test_divergence_is_found_at_its_exact_step_under_the_lazy_check(tmp_path):
    fake = FakeTime(lambda step: 0.01)
    r = _run(tmp_path, "a", "budget=steps", "budget.steps=60", "data.num_train=512", "check_every=8",
             hook=_fake_timed(fake, nan_at=23))
    s = r.summary
    assert s["status"] == "diverged" and s["stop_reason"] == "non-finite training loss"
    assert s["diverged"]["step"] == 23 and s["diverged"]["epoch"] == 0  # 32 steps per epoch here
    assert math.isnan(s["diverged"]["loss"])
    assert s["diverged"]["train_s"] == pytest.approx(0.23, rel=0.01)
    assert 23 <= s["steps"] < 23 + 2 * 8
    assert s["diverged"]["detected_at_step"] == s["steps"]
    assert RunDir(r.run_dir).metrics()[-1]["step"] == s["steps"]


def test_stop_signal_at_k_step_checks_checkpoints_there_and_resumes_bitwise(tmp_path, monkeypatch):
    """The DDP path (signals looked at only at k-step checks): a signal after step 5 stops the run at the
    check of step 6 (check_every=3), checkpointed mid-epoch; resuming ends where a clean run ends."""
    def every_k(trainer):
        trainer.signals_every_step = False

    base = ["deterministic=true", "budget=epochs", "budget.epochs=3", "check_every=3", "optimizer=adamw"]
    monkeypatch.setenv("FISHERBENCH_SIGNAL_AT_STEP", "5:SIGUSR1")
    stopped = _run(tmp_path, "a", *base, hook=every_k)
    monkeypatch.delenv("FISHERBENCH_SIGNAL_AT_STEP")
    s = stopped.summary
    assert s["status"] == "preempted" and s["steps"] == 6 and str(int(signal.SIGUSR1)) in s["stop_reason"]
    payload = torch.load(RunDir(stopped.run_dir).checkpoint_path, weights_only=True)
    assert payload["state"]["step"] == 6 and payload["state"]["batch"] == 2
    resumed = _run(tmp_path, "a", *base, hook=every_k)
    clean = _run(tmp_path, "b", *base)
    assert resumed.status == "completed"
    assert resumed.summary["final_params_sha256"] == clean.summary["final_params_sha256"]
    strip = lambda rows: [{k: v for k, v in row.items() if k not in ("train_s", "data_s", "wall_s")} for row in rows]
    assert strip(RunDir(resumed.run_dir).metrics()) == strip(RunDir(clean.run_dir).metrics())


def test_stop_signal_in_one_process_is_seen_at_the_very_next_step(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERBENCH_SIGNAL_AT_STEP", "5:SIGUSR1")
    r = _run(tmp_path, "a", "budget=epochs", "budget.epochs=3", "check_every=16")
    assert r.summary["status"] == "preempted" and r.summary["steps"] == 5


def test_clock_without_a_segment_is_exact_and_sections_add_up():
    fake = FakeTime(lambda step: 0.0)
    led = Ledger()
    clock = Clock(led, "cpu", timer=fake)
    clock.start_wall()
    clock.open_segment(0)
    for step in range(1, 6):
        fake.t += 0.1
        clock.step_done(step)
    assert clock.train_s_estimate(5) == pytest.approx(0.5, abs=1e-4)
    assert clock.train_s_estimate(7) == pytest.approx(0.7, abs=1e-3)  # two steps ahead: the mean step
    with clock.section("eval_s"):
        fake.t += 0.25
    assert led.train_s == pytest.approx(0.5, abs=1e-4) and led.eval_s == pytest.approx(0.25, abs=1e-4)
    clock.stop_wall(5)
    assert led.parts_sum() == pytest.approx(led.wall_s, abs=1e-9)
    assert clock.train_s_at(3) == pytest.approx(0.3, abs=1e-4)


# ---------------------------------------------------------------------------------------- sync counter
def _harness():
    spec = importlib.util.spec_from_file_location("bench_harness", REPO / "scripts" / "bench_harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_harness"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("check_every,low,high", [(1, 1.0, 1.1), (16, 0.0, 0.1)])
def test_sync_counter_sees_per_step_syncs_only_when_there_are_some(check_every, low, high):
    h = _harness()
    args = h.parse_args(["--device", "cpu", "--model", "small_cnn", "--data", "synthetic_image", "--steps", "24",
                         "--set", "model.width=4", "--set", "model.hidden=16", "--set", "data.shape=[3,8,8]",
                         "--set", f"check_every={check_every}"])
    _, _, trainer = h.build(args)
    counter = h.SyncCounter()
    counter.install()
    try:
        with counter.counting():
            h.trainer_round(trainer, 24)
    finally:
        counter.uninstall()
    per_step = counter.by_phase["steps"] / 24
    assert low <= per_step <= high, counter.by_site
    assert counter.by_phase["outside"] > 0  # the final evaluation and the wall clock's edges
    # the instrumentation is gone again
    assert torch.Tensor.item is torch._C.TensorBase.item


def test_sync_counter_ignores_torch_internals_and_counts_repository_code():
    h = _harness()
    counter = h.SyncCounter()
    counter.install()
    try:
        with counter.counting():
            t = torch.ones(3)
            float(t.sum())  # from this test file: part of the repository
            _ = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))]).state  # nothing synchronises
    finally:
        counter.uninstall()
    assert sum(counter.by_site.values()) == 1
    assert next(iter(counter.by_site)).startswith("tests/engine/test_timing_clock.py:")

"""The CUDA paths of the asynchronous loop: the event-timed lazy clock against a synchronised reading, the
loss window's pinned-memory reads, and no per-step host sync in a real CUDA run (scripts/gpu_check runs
these with `pytest -m gpu`)."""
import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

from fisherbench.core.ledger import PARTS, Clock, Ledger

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
REPO = Path(__file__).resolve().parents[2]


def _busy(ms: float) -> None:
    """Queue a few milliseconds of GPU work (a spin kernel of ms x 2e6 cycles) without waiting for it."""
    torch.cuda._sleep(int(ms * 2_000_000))


def test_event_clock_matches_a_synchronised_host_reading():
    ledger = Ledger()
    clock = Clock(ledger, "cuda")
    clock.start_wall()
    clock.open_segment(0)
    host0 = time.perf_counter()
    for step in range(1, 21):
        _busy(5.0)
        clock.step_done(step)  # no synchronisation: the host runs ahead of the GPU
    lag_estimate = clock.train_s_estimate(20)
    torch.cuda.synchronize()
    host = time.perf_counter() - host0
    clock.poll()
    known_step, known_s = clock._known
    assert known_step == 20 and known_s == pytest.approx(host, rel=0.05)  # events agree with the host clock
    assert lag_estimate <= host * 1.05
    clock.close_segment(20)
    assert ledger.train_s == pytest.approx(host, rel=0.05)
    clock.stop_wall(20)
    assert sum(getattr(ledger, p) for p in PARTS) == pytest.approx(ledger.wall_s, rel=1e-6)


def test_loss_window_reads_pinned_copies_one_window_late_without_waiting():
    from fisherbench.engine.trainer import LossWindow

    window = LossWindow(4, torch.device("cuda"))
    assert window.host.is_pinned()
    learned = []
    for step in range(1, 13):
        loss = torch.full((), float(step), device="cuda")
        if step == 7:
            loss = loss * float("nan")
        learned += window.record(loss, step, 0, 1)
    assert [e[0] for e in learned] == list(range(1, 9))  # windows 1-4 and 5-8; 9-12 still pending
    learned += window.flush()
    values = [e[3] for e in learned]
    assert [e[0] for e in learned] == list(range(1, 13))
    assert values[6] != values[6] and values[:6] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_cuda_training_has_no_per_step_host_sync(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_harness", REPO / "scripts" / "bench_harness.py")
    h = importlib.util.module_from_spec(spec)
    sys.modules["bench_harness"] = h
    spec.loader.exec_module(h)
    args = h.parse_args(["--device", "cuda", "--model", "small_cnn", "--data", "synthetic_image", "--steps", "64"])
    _, _, trainer = h.build(args)
    h.trainer_round(trainer, 8)
    counter = h.SyncCounter()
    counter.install()
    try:
        with counter.counting():
            _, ledger = h.trainer_round(trainer, 64)
    finally:
        counter.uninstall()
    assert counter.by_phase["steps"] / 64 <= 0.1, counter.by_site
    assert abs(sum(ledger[p] for p in PARTS) - ledger["wall_s"]) <= 0.05 * ledger["wall_s"]


def test_seconds_budget_on_cuda_overshoots_less_than_one_step(run_train):
    r = run_train("device=cuda", "budget=seconds", "budget.seconds=3", "data.num_train=4096", "checkpoint.enabled=false")
    s = r.summary
    per_step = s["ledger"]["train_s"] / s["steps"]
    assert 3.0 <= s["ledger"]["train_s"] <= 3.0 + 2 * per_step + 0.015

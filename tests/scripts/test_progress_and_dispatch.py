"""Long scripts say what they do (which optimizer, which block, time left), and bench_optimizers counts the
operator calls a step dispatches (the proxy for GPU kernel launches)."""
from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def scripts_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))


def test_eta_says_what_how_far_and_how_long(monkeypatch):
    from fisherbench.core.eta import Eta

    clock = iter([0.0, 10.0, 12.0, 30.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    eta = Eta("bench", 4, unit="steps", every=10.0, out=out)
    eta.step("timing adam, block 1/2")  # t = 10: the first step always prints
    eta.step("timing adam, block 1/2")  # t = 12: within 10 s of the last line, quiet
    eta.step("timing kfac, block 2/2", n=2)  # t = 30: the last step always prints
    lines = out.getvalue().splitlines()
    assert lines == ["[bench] timing adam, block 1/2: 1/4 steps (25%), 10 s elapsed, ~30 s left",
                     "[bench] timing kfac, block 2/2: 4/4 steps (100%), 30 s elapsed, ~0 s left"]


def test_dispatch_counts_separate_the_update_from_the_step(scripts_on_path):
    import bench_optimizers as bench

    from fisherbench.core.tasks import get_task
    from fisherbench.engine.compose import load_group_option

    def build_model():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))

    task = get_task("classification")
    batch = (torch.randn(8, 12), torch.randint(0, 3, (8,)))
    counts = {}
    for name in ("adam", "sgd"):
        arm = bench.Arm(name, load_group_option("optimizer", name), build_model, torch.device("cpu"), timing=True)
        counts[name] = bench.count_dispatches(arm, batch, task.loss, lambda: torch.autocast("cpu", enabled=False))
        assert arm.steps == 1 and not hasattr(arm.adapter.optimizer, "__dict__") or \
            "step" not in arm.adapter.optimizer.__dict__  # the counting wrapper is gone again
    for c in counts.values():
        assert 0 < c["optimizer_step"] < c["total"] and c["kind"] == "ordinary"
    # Adam's foreach update does more than SGD-momentum's (two moments, bias correction) on the same model
    assert counts["adam"]["optimizer_step"] > counts["sgd"]["optimizer_step"]
    assert counts["adam"]["total"] - counts["adam"]["optimizer_step"] == \
        counts["sgd"]["total"] - counts["sgd"]["optimizer_step"]  # same forward and backward

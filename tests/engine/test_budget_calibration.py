"""Calibration on a fake timer: ABBA block order, whole curvature periods after a steady-state warm-up, the
per-block estimates, the ratio and its 95% interval, step-derived budgets (no silent extra time), the cache
(its key holds every runtime setting) and the printed line."""
import itertools
import math
import statistics

import pytest
import torch

from fisherbench.core.env import runtime_settings
from fisherbench.engine import calibrate as cal
from fisherbench.engine.compose import compose_config
from fisherbench.optim.registry import StepOutput


class FakeTime:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class FakeAdapter:
    """Costs `ordinary` per step and `curvature` on every step whose counter is a multiple of `period`."""

    def __init__(self, clock, ordinary, curvature=None, period=None, drift=0.0):
        self.clock, self.ordinary, self.curvature, self.period, self.drift = clock, ordinary, curvature, period, drift
        self.count = 0

    def train_step(self, model, x, y, loss_fn, autocast):
        curv = self.period and self.count % self.period == 0
        cost = self.curvature if curv else self.ordinary
        self.clock.t += cost * (1.0 + self.drift * self.clock.t)  # the machine slows down linearly
        self.count += 1
        return StepOutput(torch.zeros(()), torch.zeros(1, 2))


def _arm(name, clock, **kw):
    adapter = FakeAdapter(clock, **kw)
    batches = itertools.repeat((torch.zeros(1), torch.zeros(1, dtype=torch.long)))
    return cal.TimedArm(name, torch.nn.Linear(1, 1), adapter, batches, kw.get("period")), adapter


def test_blocks_run_in_abba_order_over_whole_periods_after_a_steady_state_warm_up():
    clock = FakeTime()
    ref, ref_ad = _arm("reference", clock, ordinary=1.0)
    cand, cand_ad = _arm("candidate", clock, ordinary=1.0, curvature=11.0, period=5)
    out = cal.measure([ref, cand], None, torch.device("cpu"), steps=24, min_blocks=4, warmup=2,
                      min_period_steps=1, timer=clock)
    assert out["order"] == [["reference", "candidate", "candidate", "reference"],
                            ["candidate", "reference", "reference", "candidate"]] * 2
    r, c = out["arms"]["reference"], out["arms"]["candidate"]
    assert r["warmup_steps"] == 2 and c["warmup_steps"] == 6  # one curvature period + 1: its first curvature step
    assert r["steps_per_period"] == 3 and c["steps_per_period"] == 5  # 24 / (2 x 4) rounded up to whole periods
    assert r["timed_steps"] == 4 * 2 * 3 and c["timed_steps"] == 4 * 2 * 5 >= 2 * 5 + 1
    assert ref_ad.count == 2 + 24 and cand_ad.count == 6 + 40
    # every period of the candidate holds exactly one curvature step: amortised (11 + 4 x 1) / 5 = 3
    assert c["block_step_s"] == pytest.approx([3.0] * 4)
    assert c["block_wall_step_s"] == pytest.approx([3.0] * 4)
    assert c["curvature_s"] == pytest.approx(11.0) and c["ordinary_s"] == pytest.approx(1.0)
    assert r["block_step_s"] == pytest.approx([1.0] * 4)
    stats = cal.ratio_interval(c["block_step_s"], r["block_step_s"])
    assert stats["ratio"] == pytest.approx(3.0) and stats["ratio_ci"] == pytest.approx([3.0, 3.0])


def test_abba_cancels_a_linear_drift_that_biases_a_fixed_order():
    def ratio(order_blocks):
        clock = FakeTime()
        ref, _ = _arm("reference", clock, ordinary=1.0, drift=1e-3)
        cand, _ = _arm("candidate", clock, ordinary=1.0, drift=1e-3)
        out = cal.measure([ref, cand], None, torch.device("cpu"), steps=80, min_blocks=order_blocks,
                          warmup=1, min_period_steps=10, timer=clock)
        return cal.ratio_interval(out["arms"]["candidate"]["block_step_s"],
                                  out["arms"]["reference"]["block_step_s"])["ratio"]

    # equal arms on a machine that slows down 0.1% per second: ABBA keeps the ratio at 1 (to second order)
    assert ratio(4) == pytest.approx(1.0, abs=2e-3)
    # the same periods in a fixed reference-then-candidate order see the drift
    clock = FakeTime()
    a = FakeAdapter(clock, 1.0, drift=1e-3)
    b = FakeAdapter(clock, 1.0, drift=1e-3)
    ta = tb = 0.0
    for _ in range(8):
        for adapter in (a, b):
            t0 = clock.t
            for _ in range(10):
                adapter.train_step(None, None, None, None, None)
            if adapter is a:
                ta += clock.t - t0
            else:
                tb += clock.t - t0
    assert tb / ta > 1.0 + 5e-3


def test_a_burst_of_other_work_does_not_decide_a_block():
    clock = FakeTime()
    ref, ref_ad = _arm("reference", clock, ordinary=1.0)
    cand, _ = _arm("candidate", clock, ordinary=1.0)
    real = ref_ad.train_step

    def bursty(*args):
        out = real(*args)
        if ref_ad.count == 30:
            clock.t += 50.0  # another process took the CPU for a while
        return out

    ref_ad.train_step = bursty
    out = cal.measure([ref, cand], None, torch.device("cpu"), steps=60, min_blocks=3, warmup=1,
                      min_period_steps=10, timer=clock)
    r = out["arms"]["reference"]
    assert max(r["block_wall_step_s"]) > 2.0  # the burst is in the wall time of its block ...
    assert r["block_step_s"] == pytest.approx([1.0] * 3)  # ... not in the trimmed estimate


def test_ratio_interval_is_student_t_on_log_ratios():
    from scipy import stats as sstats

    for df in (1, 2, 3, 4, 9, 29, 30, 31, 60, 200):
        assert cal.t975(df) == pytest.approx(sstats.t.ppf(0.975, df), abs=2e-3)
    cand, ref = [1.1, 0.9, 1.05, 1.0], [1.0, 1.0, 1.0, 1.0]
    out = cal.ratio_interval(cand, ref)
    logs = [math.log(c) for c in cand]
    m, sd = statistics.fmean(logs), statistics.stdev(logs)
    half = sstats.t.ppf(0.975, 3) * sd / 2
    assert out["ratio"] == pytest.approx(math.exp(m))
    assert out["ratio_ci"] == pytest.approx([math.exp(m - half), math.exp(m + half)], rel=1e-3)
    assert out["ratio_ci"][0] < 1.0 < out["ratio_ci"][1]


def _calib(ref_blocks, cand_blocks):
    return {"arms": {"reference": {"block_step_s": ref_blocks}, "candidate": {"block_step_s": cand_blocks}}}


def test_schedule_lays_out_whole_periods_and_as_many_blocks_as_the_steps_allow():
    # Adam against Adam on a CPU: single-step periods, 160 blocks of A B B A
    assert cal.schedule([None, None], 320, 3, 1) == (160, [1, 1])
    # on a GPU periods of at least 32 steps
    assert cal.schedule([None, None], 320, 3, 32) == (5, [32, 32])
    # a period-100 arm: whole periods of 100, three blocks, the other arm at least 320 / 6 steps per period
    assert cal.schedule([None, 100], 320, 3, 1) == (3, [54, 100])
    blocks, (m_ref, m_cand) = cal.schedule([None, 100], 320, 3, 1)
    assert 2 * blocks * m_cand >= 2 * 100 + 1 and 2 * blocks * m_ref >= 320


def test_derived_budget_is_in_steps_with_its_interval():
    d = cal.derive_from_calibration(_calib([1.0, 1.0, 1.0], [1.2, 1.25, 1.3]), 10, 63)
    ratio = math.exp(statistics.fmean(math.log(x) for x in (1.2, 1.25, 1.3)))
    assert d["derived_steps"] == math.floor(630 / ratio)
    assert d["derived_epochs"] == d["derived_steps"] / 63  # fractional epochs
    lo, hi = d["derived_epochs_ci"]
    assert lo < d["derived_epochs"] < hi
    assert d["extra_time_fraction"] == 0.0
    # never more time than the reference unless one step already is; then it is recorded
    slow = cal.derive_from_calibration(_calib([1.0, 1.0, 1.0], [1.38, 1.38, 1.38]), 1, 1)
    assert slow["derived_steps"] == 1 and slow["extra_time_fraction"] == pytest.approx(0.38)
    small = cal.derive_from_calibration(_calib([1.0, 1.0, 1.0], [1.38, 1.38, 1.38]), 1, 10)
    assert small["derived_steps"] == 7 and small["extra_time_fraction"] == 0.0  # not 1 epoch = 10 steps
    assert small["derived_steps"] * 1.38 <= 10 * 1.0


def test_describe_prints_epochs_with_their_interval_and_says_when_cached():
    calib = {"blocks": 3, "arms": {"reference": {"timed_steps": 60, "steps_per_period": 10},
                                    "candidate": {"timed_steps": 60, "steps_per_period": 10}}}
    derived = {"method": "calibration", "reference_optimizer": "adam", "reference_epochs": 10.0,
               **cal.derive_from_calibration(_calib([1.0, 1.0, 1.0], [1.0, 1.02, 0.98]), 10, 63),
               "calibration": calib, "from_cache": True, "calibration_file": "runs/_calibration/x.json"}
    line = cal.describe(derived, "adam")
    assert "epochs of adam" in line and "95% CI" in line and "read from the calibration cache" in line
    assert "measured" not in line
    derived["from_cache"] = False
    assert "measured: 3 ABBA blocks" in cal.describe(derived, "adam")


def test_calibration_key_holds_every_runtime_setting():
    base = ["model=small_cnn", "data=synthetic_image", "optimizer=sgd", "budget=reference",
            "budget.reference_optimizer=adamw", "budget.reference_epochs=2"]
    ref = {"name": "adamw"}
    device = torch.device("cpu")
    key = cal.calibration_key(compose_config(base), ref, device)
    for override in ("deterministic=true", "cudnn_benchmark=false", "precision=bf16", "channels_last=true",
                     "compile=true", "threads=3", "budget.calibration_blocks=7", "budget.calibration_steps=8",
                     "budget.calibration_warmup=9"):
        assert cal.calibration_key(compose_config([*base, override]), ref, device) != key, override
    # settings that do not change a step's time do not change the key
    assert cal.calibration_key(compose_config([*base, "seed=3", "budget.recalibrate=true"]), ref, device) == key
    settings = runtime_settings(compose_config([*base, "deterministic=true"]))
    assert settings["deterministic"] is True and settings["cudnn_benchmark"] is False


def test_a_calibrated_run_stores_blocks_ratio_interval_and_says_cached(run_train, capsys):
    args = ("optimizer=sgd", "budget=reference", "budget.reference_optimizer=adamw", "budget.reference_epochs=2",
            "budget.calibration_steps=4", "budget.calibration_blocks=3", "budget.calibration_warmup=1")
    first = run_train(*args).summary["reference_budget"]
    err = capsys.readouterr().err
    assert "measured: 3 ABBA blocks" in err and "95% CI" in err
    assert first["from_cache"] is False and len(first["blocks"]["candidate"]) == 3
    assert first["ratio_ci"][0] <= first["ratio"] <= first["ratio_ci"][1]
    assert first["derived_epochs_ci"][0] <= first["derived_epochs"] <= first["derived_epochs_ci"][1] + 1 / 4
    again = run_train(*args, "seed=1").summary["reference_budget"]
    assert again["from_cache"] is True and again["derived_steps"] == first["derived_steps"]
    assert "read from the calibration cache" in capsys.readouterr().err

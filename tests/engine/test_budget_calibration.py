"""Calibration on a fake timer and end to end: ABBA block order over whole periods after a steady-state
warm-up, block values that charge every step (a slow tail, a burst), step budgets by the one rule, the
printed line, the cache key, the run's calibration.json, an untrusted cache (tampered, damaged, implausible)
and the exit-2 refusals of a calibration that cannot reach its tolerance."""
import itertools
import json
import math
import random

import pytest
import torch

from fisherbench.core import calibration_stats as cs
from fisherbench.core.env import runtime_settings
from fisherbench.core.errors import UserError
from fisherbench.engine import calibrate as cal
from fisherbench.engine import calibration_measure as cm
from fisherbench.engine.compose import compose_config
from fisherbench.optim.registry import StepOutput


class FakeTime:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class FakeAdapter:
    """Costs `ordinary` per step, `curvature` on every step whose counter is a multiple of `period`, and
    `tail_x` times as much on a random `tail_p` of its steps."""

    def __init__(self, clock, ordinary, curvature=None, period=None, drift=0.0, tail_p=0.0, tail_x=1.0, seed=0):
        self.clock, self.ordinary, self.curvature, self.period, self.drift = clock, ordinary, curvature, period, drift
        self.tail_p, self.tail_x, self.rng = tail_p, tail_x, random.Random(seed)
        self.count = 0

    def train_step(self, model, x, y, loss_fn, autocast):
        curv = self.period and self.count % self.period == 0
        cost = self.curvature if curv else self.ordinary
        if self.rng.random() < self.tail_p:
            cost *= self.tail_x
        self.clock.t += cost * (1.0 + self.drift * self.clock.t)  # the machine slows down linearly
        self.count += 1
        return StepOutput(torch.zeros(()), torch.zeros(1, 2))


def _arm(name, clock, **kw):
    adapter = FakeAdapter(clock, **kw)
    batches = itertools.repeat((torch.zeros(1), torch.zeros(1, dtype=torch.long)))
    return cm.TimedArm(name, torch.nn.Linear(1, 1), adapter, batches, kw.get("period")), adapter


def test_blocks_run_in_abba_order_over_whole_periods_after_a_steady_state_warm_up():
    clock = FakeTime()
    ref, ref_ad = _arm("reference", clock, ordinary=1.0)
    cand, cand_ad = _arm("candidate", clock, ordinary=1.0, curvature=11.0, period=5)
    out = cm.measure([ref, cand], None, torch.device("cpu"), steps=24, min_blocks=4, warmup=2,
                     min_period_steps=1, timer=clock)
    assert out["order"] == [["reference", "candidate", "candidate", "reference"],
                            ["candidate", "reference", "reference", "candidate"]] * 2
    assert cm.abba_order(["a", "b", "c"], 1) == ["b", "c", "a", "a", "c", "b"]
    r, c = out["arms"]["reference"], out["arms"]["candidate"]
    assert r["warmup_steps"] == 2 and c["warmup_steps"] == 6  # one curvature period + 1: its first curvature step
    assert r["steps_per_visit"] == 5 and c["steps_per_visit"] == 5  # one whole period; the other arm as long
    assert r["timed_steps"] == 4 * 2 * 5 and c["timed_steps"] == 4 * 2 * 5 >= 2 * 5 + 1
    assert ref_ad.count == 2 + 40 and cand_ad.count == 6 + 40
    # every visit of the candidate holds exactly one curvature step: (11 + 4 x 1) / 5 = 3 per step
    assert c["block_step_s"] == pytest.approx([3.0] * 4)
    assert c["curvature_s"] == pytest.approx(11.0) and c["ordinary_s"] == pytest.approx(1.0)
    assert r["block_step_s"] == pytest.approx([1.0] * 4)
    assert cm.ratio_of(c["block_step_s"], r["block_step_s"])["ratio"] == pytest.approx(3.0)


def test_abba_cancels_a_linear_drift_that_biases_a_fixed_order():
    clock = FakeTime()
    ref, _ = _arm("reference", clock, ordinary=1.0, drift=1e-3)
    cand, _ = _arm("candidate", clock, ordinary=1.0, drift=1e-3)
    out = cm.measure([ref, cand], None, torch.device("cpu"), steps=80, min_blocks=4, warmup=1,
                     min_period_steps=10, timer=clock)
    a, b = out["arms"]["reference"]["block_step_s"], out["arms"]["candidate"]["block_step_s"]
    # equal arms on a machine that slows down 0.1% per second: ABBA keeps the ratio at 1 (to second order)
    assert sum(b) / sum(a) == pytest.approx(1.0, abs=2e-3)
    # the same visits in a fixed reference-then-candidate order see the drift
    clock = FakeTime()
    fa, fb = FakeAdapter(clock, 1.0, drift=1e-3), FakeAdapter(clock, 1.0, drift=1e-3)
    ta = tb = 0.0
    for _ in range(8):
        for adapter in (fa, fb):
            t0 = clock.t
            for _ in range(10):
                adapter.train_step(None, None, None, None, None)
            ta, tb = (ta + clock.t - t0, tb) if adapter is fa else (ta, tb + clock.t - t0)
    assert tb / ta > 1.0 + 5e-3


def test_a_burst_of_other_work_is_charged_to_its_block_not_dropped():
    clock = FakeTime()
    ref, ref_ad = _arm("reference", clock, ordinary=1.0)
    cand, _ = _arm("candidate", clock, ordinary=1.0)
    real = ref_ad.train_step

    def bursty(*args):
        out = real(*args)
        if ref_ad.count == 30:
            clock.t += 50.0  # another process took the CPU for a while: a run would have paid it too
        return out

    ref_ad.train_step = bursty
    out = cm.measure([ref, cand], None, torch.device("cpu"), steps=60, min_blocks=3, warmup=1,
                     min_period_steps=10, timer=clock)
    r = out["arms"]["reference"]
    assert max(r["block_step_s"]) == pytest.approx(1.0 + 50.0 / 20)  # the whole burst, over the block's 20 steps
    assert r["amortised_s"] == pytest.approx((60 + 50) / 60)


def test_a_slow_tail_is_charged_in_full_by_the_calibration_measurement():
    """8% of the candidate's steps 3.5x slower, true mean-time ratio 1.268: the measured ratio (block wall
    times, BlockMeter + the sequential rule) is within 2% and its interval contains it. The old per-block
    10%-trimmed mean returned 1.047 here, with an interval that excluded 1.268."""
    clock = FakeTime()
    ref, _ = _arm("reference", clock, ordinary=1.0)
    base = 1.268 / (0.92 + 0.08 * 3.5)
    cand, _ = _arm("candidate", clock, ordinary=base, tail_p=0.08, tail_x=3.5, seed=5)
    meter = cm.BlockMeter([ref, cand], None, torch.device("cpu"), visit_steps=[10, 10], timer=clock)
    meter.warm_up(1)
    result = cs.sequential_ratio(lambda n: (lambda d: (d["reference"], d["candidate"]))(meter.measure(n)),
                                 first_look=400, tolerance=0.02, cap_s=math.inf, elapsed=lambda: meter.elapsed)
    est = result.estimate
    assert est.ratio == pytest.approx(1.268, rel=0.02)
    assert est.ci[0] <= 1.268 <= est.ci[1]
    assert result.reached and est.blocks == 400


def test_block_layout_lays_out_whole_periods_and_as_many_blocks_as_the_steps_allow():
    # Adam against Adam on a CPU: single-step visits, 160 blocks of A B B A
    assert cm.block_layout([None, None], 320, 6, 1) == (160, [1, 1])
    # on a GPU visits of at least 32 steps
    assert cm.block_layout([None, None], 320, 6, 32) == (6, [32, 32])
    # a period-100 arm: whole periods of 100, six blocks; the other arm's visits are as long (equal per-visit
    # costs per step), not just 320 / 12 = 27 steps
    assert cm.block_layout([None, 100], 320, 6, 1) == (6, [100, 100])
    assert cm.block_layout([3, 5], 24, 4, 1) == (4, [6, 5])  # whole periods of each arm's own


def _record(ref_walls, cand_walls, visit=(1, 1), spe=10):
    return {"method": cal.METHOD, "steps_per_epoch": spe, "look_level": 0.95, "tolerance": 0.02,
            "looks": [len(ref_walls)], "load_avg": [0.5, 0.7], "busy_warning": None,
            "arms": {"reference": {"steps_per_visit": visit[0]}, "candidate": {"steps_per_visit": visit[1]}},
            "block_wall_s": {"reference": ref_walls, "candidate": cand_walls}}


def test_derived_budget_is_in_steps_by_the_one_rule_with_its_interval():
    rec = _record([2.0] * 6, [2.4, 2.5, 2.6, 2.4, 2.5, 2.6])
    d = cal.derive_from_calibration(rec, 10, 63, key="k", reference_optimizer="adam")
    assert d.method == "calibration" and d.ratio == pytest.approx(1.25)
    assert d.steps == round(630 / 1.25) and d.derived_epochs == d.steps / 63  # fractional epochs
    lo, hi = d.derived_epochs_ci
    assert lo < d.derived_epochs < hi and d.ratio_ci[0] < 1.25 < d.ratio_ci[1]
    assert d.extra_time_fraction == 0.0 and d.blocks == 6 and d.load_avg == pytest.approx(0.6)
    # E = 2.5 reference epochs of 3 steps: the reference's round(7.5) = 8 steps, the candidate 8 / 1.25
    frac = cal.derive_from_calibration(rec, 2.5, 3)
    assert frac.steps == round(8 / 1.25) and frac.reference_seconds == pytest.approx(8 * 2.0 / 2)
    # one step more than the reference's whole time: one step, the excess recorded
    slow = cal.derive_from_calibration(_record([1.0] * 6, [1.38] * 6), 1, 1)
    assert slow.steps == 1 and slow.extra_time_fraction == pytest.approx(0.38)
    # the summary form round-trips through the typed record
    from fisherbench.core.budget import DerivedBudget

    again = DerivedBudget.from_dict(json.loads(json.dumps(d.as_dict())))
    assert again == d and "record" not in d.as_dict()


def test_describe_prints_epochs_with_their_interval_and_says_when_shared():
    d = cal.derive_from_calibration(_record([1.0] * 6, [1.0, 1.02, 0.98, 1.0, 1.01, 0.99]), 10, 63, key="abc",
                                    shared=True, reference_optimizer="adam")
    line = cal.describe(d, "adam")
    assert "epochs of adam" in line and "95% CI" in line and "read from the calibration cache" in line
    assert "measured" not in line and "key abc" in line
    fresh = cal.derive_from_calibration(d.record, 10, 63, reference_optimizer="adam")
    assert "measured: 6 ABBA blocks" in cal.describe(fresh, "adam")


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
    same = [*base, "seed=3", "budget.recalibrate=true", "budget.calibration_tolerance=0.05",
            "budget.calibration_max_s=99"]
    assert cal.calibration_key(compose_config(same), ref, device) == key
    settings = runtime_settings(compose_config([*base, "deterministic=true"]))
    assert settings["deterministic"] is True and settings["cudnn_benchmark"] is False


@pytest.mark.parametrize("damage", [
    [1, 2],
    "not a record",
    {"method": "abba-blocks-v2"},
    "nan-block",
    "string-block",
    "bool-visit",
])
def test_damaged_cache_records_are_named_not_crashed_on(damage):
    rec = _record([1.0] * 6, [1.2] * 6)
    if damage == "nan-block":
        rec["block_wall_s"]["candidate"][2] = float("nan")
    elif damage == "string-block":
        rec["block_wall_s"]["reference"][0] = "1.0"
    elif damage == "bool-visit":
        rec["arms"]["candidate"]["steps_per_visit"] = True
    else:
        rec = damage
    assert isinstance(cal.record_problem(rec), str)
    assert cal.epochs_from_calibration(rec, 2, 10) is None
    assert cal.record_problem(_record([1.0] * 6, [1.2] * 6)) is None


# ------------------------------------------------------------------------------------------- end to end
# tiny CPU steps (~1 ms) on a shared 2-core box can vary by 100% from block to block: accept any finite interval
LOOSE = ("budget.calibration_tolerance=10", "budget.calibration_max_s=120")
ARGS = ("optimizer=sgd", "budget=reference", "budget.reference_optimizer=adamw", "budget.reference_epochs=2",
        "budget.calibration_steps=4", "budget.calibration_warmup=1", *LOOSE)


def _cache_file(run):
    return run.run_dir.parent / cal.CALIBRATION_SUBDIR / f"{run.summary['reference_budget']['calibration_key']}.json"


def test_a_calibrated_run_stores_its_record_and_says_when_it_is_shared(run_train, capsys):
    first = run_train(*ARGS)
    rb = first.summary["reference_budget"]
    err = capsys.readouterr().err
    assert rb["method"] == "calibration" and rb["calibration_shared"] is False and rb["blocks"] in (6, 12, 24, 48)
    assert f"measured: {rb['blocks']} ABBA blocks" in err and "95% CI" in err
    assert rb["ratio_ci"][0] <= rb["ratio"] <= rb["ratio_ci"][1] and rb["ratio_half_width"] <= 10
    assert rb["derived_epochs_ci"][0] <= rb["derived_epochs"] + 1 / 4 and rb["steps"] == first.summary["steps"]
    assert first.summary["load_avg"][1] is not None and first.summary["step_s"] > 0
    # the raw per-block wall times are in the run directory, the same record as the cache
    record = json.loads((first.run_dir / "calibration.json").read_text())
    assert record == json.loads(_cache_file(first).read_text())
    assert len(record["block_wall_s"]["reference"]) == len(record["block_wall_s"]["candidate"]) == rb["blocks"]
    again = run_train(*ARGS, "seed=1").summary["reference_budget"]
    assert again["calibration_shared"] is True and again["steps"] == rb["steps"]
    assert again["calibration_key"] == rb["calibration_key"]
    assert "read from the calibration cache" in capsys.readouterr().err


def test_a_tampered_cache_is_checked_against_a_fresh_measurement(run_train, capsys):
    """A candidate step time of 1e-9 s in the cache once gave a budget of 190 million steps."""
    first = run_train(*ARGS)
    cache = _cache_file(first)
    steps = first.summary["reference_budget"]["steps"]
    record = json.loads(cache.read_text())
    record["block_wall_s"]["candidate"] = [1e-9] * len(record["block_wall_s"]["candidate"])
    cache.write_text(json.dumps(record))
    capsys.readouterr()
    again = run_train(*ARGS, "seed=1")
    rb = again.summary["reference_budget"]
    assert "more than 10x apart): calibrating again" in capsys.readouterr().err
    assert rb["calibration_shared"] is False and rb["steps"] < 20 * steps  # not 190 million
    assert json.loads(cache.read_text())["block_wall_s"]["candidate"][0] > 1e-6  # measured again
    # a cache holding [1, 2] is a damaged cache: measured again, with a message, not a bug
    cache.write_text("[1, 2]")
    third = run_train(*ARGS, "seed=2")
    assert "holds a JSON list, not an object: calibrating again" in capsys.readouterr().err
    assert third.status == "completed" and third.summary["reference_budget"]["calibration_shared"] is False


def test_a_calibration_that_cannot_reach_its_tolerance_stops_with_exit_2(run_train, tmp_path):
    with pytest.raises(UserError) as exc:
        run_train(*ARGS, "budget.calibration_tolerance=0.000001", "budget.calibration_max_s=3")
    msg = str(exc.value)
    assert "calibration stopped short of its tolerance" in msg and "95% CI" in msg and "ABBA blocks" in msg
    assert "budget.calibration_tolerance=" in msg and "budget=match" in msg and "Why:" in msg
    # nothing trained and nothing cached: no run directory, no calibration that missed its tolerance
    runs = tmp_path / "runs"
    assert not [p for p in runs.iterdir() if not p.name.startswith(("_", "."))]
    assert not list((runs / cal.CALIBRATION_SUBDIR).glob("*.json"))


def test_a_calibration_whose_first_look_exceeds_the_cap_does_not_start(run_train):
    with pytest.raises(UserError, match="more than its cap") as exc:
        run_train(*ARGS[:-2], "budget.calibration_max_s=0.000001")
    assert "budget=match" in str(exc.value) and "budget.calibration_max_s=" in str(exc.value)


def test_calibration_options_are_checked():
    from fisherbench.core.config import validate

    base = ["budget=reference", "budget.reference_optimizer=adam", "budget.reference_epochs=2"]
    for bad, what in (("budget.calibration_tolerance=0", "calibration_tolerance"),
                      ("budget.calibration_tolerance=nan", "calibration_tolerance"),
                      ("budget.calibration_max_s=-1", "calibration_max_s"),
                      ("budget.calibration_blocks=3", "calibration_blocks"),
                      ("budget.reference_epochs=inf", "reference_epochs")):
        with pytest.raises(UserError, match=what):
            validate(compose_config([*base, bad]))


def test_calibrating_leaves_the_runs_random_state_as_it_was(tmp_path):
    """Building the arms (seeded) and stepping them draws random numbers: a run must draw the same ones
    afterwards whether its calibration was measured or read from the cache."""
    from fisherbench.core.distributed import DistInfo
    from fisherbench.engine.build import build_components
    from tests.conftest import TINY

    cfg = compose_config([*TINY, f"results_dir={tmp_path}", *ARGS])
    device = torch.device("cpu")
    parts = build_components(cfg, device, DistInfo())
    torch.manual_seed(123)
    before = torch.get_rng_state()
    derived = cal.reference_budget(cfg, parts.bundle, parts.build_model, device)
    assert derived.method == "calibration"
    assert torch.equal(torch.get_rng_state(), before)

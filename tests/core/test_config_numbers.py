"""Every numeric option is finite and in range when a config is composed (issue 19, item 7): `budget.seconds=nan`
trained 11,670 steps and was never going to stop. Refused with exit 2 before anything runs."""
import subprocess
import sys

import pytest

from fisherbench.core.config import OPTIMIZER_OPTION_RANGES, check_numbers, validate
from fisherbench.core.errors import UserError
from fisherbench.engine.compose import compose_config, group_options

TINY = ["model=small_cnn", "model.width=4", "model.hidden=16", "data=synthetic_image", "data.shape=[3,8,8]",
        "data.num_train=32", "data.num_test=16", "data.batch_size=16", "logger=none", "optimizer=adam"]


@pytest.mark.parametrize("overrides,message", [
    (["budget=seconds", "budget.seconds=nan"], "budget.seconds=nan is not a finite number"),
    (["budget=seconds", "budget.seconds=inf"], "budget.seconds=inf is not a finite number"),
    (["budget=seconds", "budget.seconds=1e999"], "budget.seconds=inf is not a finite number"),
    (["budget=reference", "budget.reference_optimizer=sgd", "budget.reference_epochs=-inf"],
     "budget.reference_epochs=-inf is not a finite number"),
    (["budget=steps", "budget.steps=0"], r"budget.steps=0 is out of range: it must be in \(0, inf\)"),
    (["optimizer.lr=nan"], "optimizer.lr=nan is not a finite number"),
    (["optimizer.lr=-0.1"], r"optimizer.lr=-0.1 is out of range: it must be in \[0, inf\)"),
    (["optimizer.weight_decay=-1"], "optimizer.weight_decay=-1"),
    (["optimizer.betas=[0.9,inf]"], r"optimizer.betas\[1\]=inf is not a finite number"),
    (["optimizer.betas=[0.9,1.5]"], r"optimizer.betas\[1\]=1.5 is out of range: it must be in \[0, 1\)"),
    (["optimizer.eps=0"], r"optimizer.eps=0.0 is out of range: it must be in \(0, inf\)"),
    (["optimizer=sgd", "optimizer.momentum=1.5"], "optimizer.momentum=1.5 is out of range"),
    (["optimizer.grad_clip=nan"], "optimizer.grad_clip=nan"),
    (["schedule.warmup_fraction=nan"], "schedule.warmup_fraction=nan is not a finite number"),
    (["checkpoint.every_seconds=inf"], "checkpoint.every_seconds=inf"),
])
def test_non_finite_and_out_of_range_numbers_are_refused(overrides, message):
    cfg = compose_config([*TINY, "budget=steps", "budget.steps=2", *overrides])
    with pytest.raises(UserError, match=message):
        validate(cfg)


def test_a_registry_schema_number_is_checked_too():
    cfg = compose_config([*TINY, "budget=steps", "budget.steps=2", "data.noise=nan"])
    with pytest.raises(UserError, match="data.noise=nan is not a finite number"):
        check_numbers(cfg)


@pytest.mark.parametrize("optimizer", group_options("optimizer"))
def test_every_optimizer_config_is_in_range_as_shipped(optimizer):
    cfg = compose_config([*TINY[:-1], f"optimizer={optimizer}", "budget=steps", "budget.steps=2"])
    check_numbers(cfg)  # the ranges refuse no default of any optimizer the suite ships


def test_optimizer_ranges_name_options_that_exist():
    names = set()
    for optimizer in group_options("optimizer"):
        names |= set(compose_config([*TINY[:-1], f"optimizer={optimizer}"]).optimizer.keys())
    assert set(OPTIMIZER_OPTION_RANGES) - names <= {"beta", "dampening"}, set(OPTIMIZER_OPTION_RANGES) - names


def test_train_exits_2_on_budget_seconds_nan_before_training(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fisherbench", "train", *TINY, "budget=seconds", "budget.seconds=nan",
                        f"results_dir={tmp_path / 'runs'}"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "budget.seconds=nan is not a finite number" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())

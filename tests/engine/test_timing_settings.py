"""Throughput settings: recorded in meta.json, refused where they cannot work, applied to model and inputs."""
import pytest
import torch

from fisherbench.core.errors import UserError
from fisherbench.core.store import RunDir


def test_runtime_settings_are_recorded_and_threads_applied(run_train):
    before = torch.get_num_threads()
    try:
        r = run_train("budget=steps", "budget.steps=2", "threads=2", "channels_last=true")
        runtime = RunDir(r.run_dir).meta()["runtime"]
        assert runtime == {"deterministic": False, "cudnn_benchmark": True, "precision": "fp32",
                           "channels_last": True, "compile": False, "threads": 2}
        assert r.status == "completed"
    finally:
        torch.set_num_threads(before)


def test_throughput_settings_are_not_part_of_the_run_identity(run_train):
    a = run_train("budget=steps", "budget.steps=2")
    b = run_train("budget=steps", "budget.steps=2", "channels_last=true", "cudnn_benchmark=false", "check_every=4")
    assert b.skipped and b.run_dir == a.run_dir


def test_channels_last_reaches_model_and_batches(tmp_path):
    from fisherbench.engine.compose import compose_config
    from fisherbench.engine.lifecycle import run
    from tests.conftest import TINY

    seen = {}

    def hook(trainer):
        conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
        seen["weight"] = conv.weight.is_contiguous(memory_format=torch.channels_last)
        real = trainer.adapter.train_step

        def train_step(model, inputs, *args, **kwargs):
            seen["input"] = inputs.is_contiguous(memory_format=torch.channels_last) and not inputs.is_contiguous()
            return real(model, inputs, *args, **kwargs)

        trainer.adapter.train_step = train_step

    cfg = compose_config([*TINY, "budget=steps", "budget.steps=2", "channels_last=true", f"results_dir={tmp_path}"])
    result = run(cfg, on_trainer=hook)
    assert result.status == "completed" and seen == {"weight": True, "input": True}


def test_compile_is_refused_for_optimizers_that_hook_the_model(run_train):
    for optimizer in ("adafisher", "kfac", "adahessian"):
        with pytest.raises(UserError, match="compile=false"):
            run_train(f"optimizer={optimizer}", "budget=steps", "budget.steps=1", "compile=true")


def test_cudnn_benchmark_with_deterministic_is_refused(run_train):
    with pytest.raises(UserError, match="deterministic"):
        run_train("budget=steps", "budget.steps=1", "deterministic=true", "cudnn_benchmark=true")


def test_capability_supports_compile_marks_the_hooking_optimizers():
    from fisherbench.optim import OPTIMIZERS

    refused = {e.name for e in OPTIMIZERS.entries() if not e.capabilities.supports_compile}
    assert refused == {"adafisher", "adafisherw", "kfac", "shampoo", "adahessian", "sophia"} | (
        refused & {"sgd_biascorrected"})


@pytest.mark.slow
def test_compile_trains_with_compile_time_in_warmup_not_budget(run_train):
    r = run_train("budget=steps", "budget.steps=4", "compile=true", "optimizer=adamw")
    s = r.summary
    assert s["status"] == "completed"
    assert s["ledger"]["warmup_s"] > s["ledger"]["train_s"]  # compilation happened in the untimed warm-up


def test_synthetic_num_images_sizes_the_training_set():
    from fisherbench.data import DATASETS, BuildContext, build_data

    bundle = build_data({"name": "synthetic_image", "shape": [3, 4, 4], "num_images": 1000, "batch_size": 250},
                        BuildContext())
    assert bundle.num_train == 1000 and len(bundle.train) == 4
    assert "n=1000/" in bundle.fingerprint
    small = build_data({"name": "synthetic_image", "shape": [3, 4, 4]}, BuildContext())
    assert small.num_train == 256  # num_train when num_images is not set
    assert DATASETS.get("synthetic_image").schema.num_images is None

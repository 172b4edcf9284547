"""Composition of every config group, and the errors users get for bad values (in-process)."""

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from fisherbench.core.config import CONFIG_DIR
from fisherbench.core.errors import UserError, explain_compose_error
from fisherbench.core.store import RunDir, iter_run_dirs
from fisherbench.engine.compose import compose_config
from fisherbench.engine.lifecycle import run

GROUPS = ("model", "data", "optimizer", "budget", "logger", "experiment")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", [g for g in GROUPS if g != "experiment"])
def test_every_option_of_every_group_composes(group):
    assert options(group), f"configs/{group}/ is empty"
    for option in options(group):
        cfg = compose_config([f"{group}={option}"])
        node = cfg[group]
        if group in ("model", "data", "optimizer"):
            # the node is typed by its registry entry's schema
            from omegaconf import OmegaConf

            from fisherbench.core.config import schema_fields

            assert "name" in node and schema_fields(OmegaConf.get_type(node)), option
        assert cfg._choices[group] == option


def test_every_experiment_preset_composes():
    presets = [o for o in options("experiment") if not o.startswith("_")]  # _*.yaml: shared bases
    assert presets
    for option in presets:
        cfg = compose_config([f"experiment={option}"])
        assert cfg.model.name and cfg.data.name and cfg.optimizer.name


def test_top_level_keys():
    cfg = compose_config([])
    for key in ("seed", "results_dir", "deterministic", "device"):
        assert key in cfg
    assert cfg.device == "auto" and cfg.results_dir == "runs"


def test_typo_in_a_group_key_fails_at_compose_time_with_valid_keys():
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(["optimizer=adam", "optimizer.lrr=0.1"])
    message = explain_compose_error(info.value)
    assert isinstance(info.value.__cause__, (ConfigKeyError, ConfigAttributeError))
    assert "Valid keys in optimizer:" in message and "lr" in message and "betas" in message


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(["budget.epochs=ten"])
    assert isinstance(info.value.__cause__, ValidationError)
    assert "must be of type" in explain_compose_error(info.value)


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(MissingConfigException) as info:
        compose_config(["model=resnet_nope"])
    assert "Available options in 'model'" in str(info.value) and "small_cnn" in str(info.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["budget=steps", "budget.steps=-5"], "budget.steps=-5 is out of range: it must be in (0, inf)"),
        (["budget=seconds", "budget.seconds=0"], "budget.seconds=0.0 is out of range: it must be in (0, inf)"),
        (["budget=epochs", "budget.epochs=null"], "needs budget.epochs"),
        (["budget=reference", "budget.reference_optimizer=null"], "needs budget.reference_optimizer"),
        (["budget=reference", "budget.reference_optimizer=nope", "budget.reference_epochs=1"],
         "budget.reference_optimizer='nope'"),
        (["schedule.name=step"], "schedule.name must be cosine|constant|linear"),
        (["eval.every_fraction=1.5"], "eval.every_fraction must be in (0, 1]"),
        (["precision=fp16"], "precision must be fp32|bf16"),
        (["device=cuda:0"], "CUDA is not available"),
        (["optimizer.lr=-1.0"], "optimizer.lr=-1.0 is out of range: it must be in [0, inf)"),
        (["data.batch_size=0"], "data.batch_size must be >= 1"),
        (["optimizer=kfac", "precision=bf16"], "runs in fp32 only"),
    ],
)
def test_bad_values_raise_config_error_before_any_run_dir(tmp_path, overrides, message):
    from tests.conftest import TINY

    cfg = compose_config([*TINY, f"results_dir={tmp_path / 'runs'}", *overrides])
    with pytest.raises(UserError) as info:
        run(cfg)
    assert message in str(info.value)
    assert not list(iter_run_dirs(tmp_path / "runs"))


def test_model_and_data_kinds_must_match(tmp_path):
    cfg = compose_config(["model=small_cnn", "data=synthetic_tokens", f"results_dir={tmp_path / 'runs'}"])
    with pytest.raises(UserError, match="takes image inputs but data 'synthetic_tokens' provides tokens"):
        run(cfg)
    assert not list(iter_run_dirs(tmp_path / "runs"))


def test_a_bug_in_a_builder_is_recorded_as_failed_not_as_a_configuration_error(tmp_path, monkeypatch):
    """Only UserError is the user's mistake: any other builder exception is a bug, recorded with its traceback."""
    from fisherbench import models
    from tests.conftest import TINY

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in a model builder")

    monkeypatch.setattr(models, "create_model", broken)
    result = run(compose_config([*TINY, f"results_dir={tmp_path / 'runs'}"]))
    assert result.status == "failed" and "a bug in a model builder" in result.summary["error"]
    rd = RunDir(result.run_dir)
    assert "Traceback" in rd.error_path.read_text() and rd.summary()["status"] == "failed"
    monkeypatch.undo()
    assert run(compose_config([*TINY, f"results_dir={tmp_path / 'runs'}"])).status == "completed"  # retried

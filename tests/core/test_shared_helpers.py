"""One home for each shared helper: the selection direction rule, atomic file writes, paper values, dict
flattening and OmegaConf -> dict conversion live in fisherbench/core and are imported, not re-written."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fisherbench.core.config import flatten, plain_dict
from fisherbench.core.errors import UserError
from fisherbench.core.scores import higher_is_better, selection_direction
from fisherbench.core.tasks import TASKS, selection_of

PACKAGE = Path(__file__).resolve().parents[2] / "fisherbench"


@pytest.mark.parametrize("key", ["val/acc1", "test/Acc5", "val/loss", "val/ppl", "test/err1", "train/LOSS"])
def test_the_selection_direction_is_the_scores_rule(key):
    """tasks.selection_of used to decide by `startswith("acc")` alone (case-sensitive, everything else
    minimised); it now follows scores.higher_is_better."""
    task = next(iter(TASKS.values()))
    assert selection_of(task, key) == (key, higher_is_better(key))


def test_a_selection_metric_of_unknown_direction_needs_a_mode():
    task = next(iter(TASKS.values()))
    with pytest.raises(UserError, match="selection.mode=max"):
        selection_of(task, "val/f1")  # was silently minimised
    assert selection_of(task, "val/f1", "max") == ("val/f1", True)
    assert selection_direction("val/acc1", "min") is False


def test_an_unknown_direction_is_a_configuration_error_before_anything_runs():
    from fisherbench.core.config import validate
    from fisherbench.engine.compose import compose_config

    with pytest.raises(UserError, match="selection.mode"):
        validate(compose_config(["selection.metric=val/bleu"]))
    validate(compose_config(["selection.metric=val/bleu", "selection.mode=max"]))


def test_paper_values_are_one_type():
    from fisherbench.core.scores import PaperValue
    from fisherbench.results.report import PaperValue as ReportPaperValue
    from fisherbench.sweep.spec import PaperValue as SpecPaperValue
    from fisherbench.sweep.spec import parse_paper_value

    assert ReportPaperValue is SpecPaperValue is PaperValue
    assert parse_paper_value("94.1 ± 0.2") == PaperValue(94.1, 0.2, "94.1 ± 0.2")


def test_flatten_and_plain_dict():
    nested = {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}, "f": "x"}
    assert flatten(nested) == {"a.b": 1, "a.c.d": [1, 2], "e": {}, "f": "x"}
    cfg = OmegaConf.create({"x": 1, "y": "${x}", "z": {"w": 2}})
    assert plain_dict(cfg) == {"x": 1, "y": 1, "z": {"w": 2}} and plain_dict({"k": 3}) == {"k": 3}
    with pytest.raises(TypeError):
        plain_dict(OmegaConf.create([1, 2]))


def test_temporary_file_renames_live_in_the_core_writers():
    """Whole-file writes go through core.store.atomic_write_* (fsync, umask mode, unique temp names); only the
    streamed token-id cache (fsynced), downloads, checkpoint rotation and run-directory promotion rename files
    themselves."""
    allowed = {"core/store.py", "core/checkpoint.py", "data/token_ids.py", "data/download.py", "engine/lifecycle.py"}
    found = [f"{p.relative_to(PACKAGE)}:{n}" for p in PACKAGE.rglob("*.py")
             if p.relative_to(PACKAGE).as_posix() not in allowed
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if any(call in line for call in ("mkstemp(", "os.replace(", "os.rename(", ".rename("))]
    assert not found, found


def test_top_level_defaults_live_only_in_the_schema():
    """configs/train.yaml used to repeat TrainConfig's top-level defaults (two places to change one default)."""
    import dataclasses

    import yaml

    from fisherbench.core.config import CONFIG_DIR, TrainConfig
    from fisherbench.engine.compose import compose_config

    raw = yaml.safe_load((CONFIG_DIR / "train.yaml").read_text())
    schema = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not set(raw) & schema, set(raw) & schema
    cfg = compose_config([])
    assert (cfg.seed, cfg.results_dir, cfg.device, cfg.threads, cfg.compile) == (0, "runs", "auto", "auto", False)

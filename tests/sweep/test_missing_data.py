"""Paper tables fail fast: a sweep looks for each dataset once before it starts anything (its dry run too),
names the command that fetches it, and exits 2 unless told to go on."""
from __future__ import annotations

import pytest

from fisherbench.sweep import cli

SPEC = """
title: two CIFAR runs
overrides: [data=cifar10, data.root={root}, model=small_cnn, budget=steps, budget.steps=1]
seeds: [0, 1]
rows: {{r: {{}}}}
arms: {{main: {{A: [optimizer=adam], B: [optimizer=sgd]}}}}
"""


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "cifar.yaml"
    path.write_text(SPEC.format(root=tmp_path / "no_data"))
    return path


@pytest.fixture
def builds(monkeypatch):
    """Count the data builds the check makes (one per dataset, whatever the number of runs)."""
    from fisherbench.data import registry

    calls = []
    real = registry.build_data

    def counting(options, context=None):
        calls.append(dict(options))
        return real(options, context)

    monkeypatch.setattr(registry, "build_data", counting)
    return calls


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_missing_dataset_stops_the_sweep_before_anything_runs(tmp_path, capsys, spec, builds, dry_run):
    runs = tmp_path / "runs"
    rc = cli.main([str(spec), "--results-dir", str(runs), "--gpus", "none", *(["--dry-run"] if dry_run else [])])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"python -m fisherbench prepare-data cifar10 --root {tmp_path / 'no_data'}" in err
    assert "4 of 4 runs need it" in err and "--allow-missing-data" in err
    assert len(builds) == 1 and builds[0]["download"] is False  # checked once, never downloading
    assert not runs.exists()


def test_allow_missing_data_goes_on_with_a_warning(tmp_path, capsys, spec, builds):
    rc = cli.main([str(spec), "--results-dir", str(tmp_path / "runs"), "--gpus", "none", "--dry-run",
                   "--allow-missing-data"])
    captured = capsys.readouterr()
    assert rc == 0 and "launching anyway; 4 run(s) will end as configuration errors" in captured.err
    assert "4 runs" in captured.out


def test_offline_datasets_are_not_checked(tmp_path, builds):
    path = tmp_path / "digits.yaml"
    path.write_text("overrides: [data=digits]\nrows: {r: {}}\narms: {main: {A: [optimizer=adam]}}\n")
    assert cli.main([str(path), "--results-dir", str(tmp_path / "runs"), "--gpus", "none", "--dry-run"]) == 0
    assert builds == []

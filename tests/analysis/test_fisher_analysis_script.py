"""scripts/fisher_analysis.py end to end on CPU: a short run on an offline dataset, a run directory's
checkpoint (with AdaFisher's running state), W&B offline logging, and the no-checkpoint message."""
from __future__ import annotations

import csv
import importlib.util
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ("gershgorin", "spectrum", "fft", "heatmap")


def _script():
    spec = importlib.util.spec_from_file_location("fisher_analysis_script", ROOT / "scripts" / "fisher_analysis.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _read_when_complete(path: Path, timeout_s: float = 60.0) -> dict:
    """W&B's service process may still be writing the offline file when `finish()` returns: poll."""
    from fisherbench.results.wandb_offline import read_run

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            record = read_run(path)
            if record["run_id"] and "fisher_analysis/table/nrows" in record["summary"]:
                return record
        except ValueError:  # torn record while being written
            record = None
        if time.monotonic() > deadline:
            return record or {}
        time.sleep(0.2)


def test_short_run_on_digits_writes_table_and_figures(tmp_path):
    out = tmp_path / "fa"
    rc = _script().main(["--model", "small_cnn", "--data", "digits", "--steps", "0,2", "--batches", "2",
                         "--out", str(out), "--figure-layers", "head.3", "model.width=4", "model.hidden=16",
                         "data.batch_size=32"])
    assert rc == 0
    for name in ("fisher_table.csv", "fisher_table.md", "fisher_table.json"):
        assert (out / name).stat().st_size > 0
    assert not list(out.glob("*features_4*"))  # figures only for --figure-layers
    for layer in ("head_3",):
        for fig in FIGURES:
            for ext in ("png", "pdf"):
                assert (out / f"{fig}_{layer}.{ext}").stat().st_size > 1000, (fig, layer, ext)
    rows = _rows(out / "fisher_table.csv")
    assert [(r["step"], r["layer"], r["kind"]) for r in rows] == [
        ("0", "features.4", "Conv2d"), ("0", "head.3", "Linear"), ("2", "features.4", "Conv2d"),
        ("2", "head.3", "Linear")]
    for r in rows:
        assert r["H_dim"] == str(4 * 9) if r["kind"] == "Conv2d" else r["H_dim"] == "17"  # bias: appended 1
        for key in ("H_diag_energy_ratio", "S_diag_energy_ratio", "kron_diag_error", "H_frac_eig_above_damping"):
            assert 0.0 <= float(r[key]) <= 1.0, key
        assert float(r["kron_diag_error"]) == pytest.approx(
            (1 - float(r["H_diag_energy_ratio"]) * float(r["S_diag_energy_ratio"])) ** 0.5, rel=1e-6)
        # official numerics: the steady state never beats lambda = 1e-3 (F / lambda <= 1 + (0.008/0.92)^2 / 1e-3)
        assert float(r["official_frac_above_damping"]) == 0.0
        assert float(r["official_F_over_lambda_max"]) == pytest.approx(1 + (0.008 / 0.92) ** 2 / 1e-3, rel=1e-4)
    # the live AdaFisher state: ones before the first step, 0.08 * 1 + 0.008 * minmax after it
    assert [float(r["state_F_over_lambda_max"]) for r in rows if r["step"] == "0"] == [pytest.approx(1001.0)] * 2
    assert [float(r["state_F_over_lambda_max"]) for r in rows if r["step"] == "2"] == [
        pytest.approx(1 + 0.088**2 / 1e-3, rel=1e-4)] * 2
    assert "| step | layer |" in (out / "fisher_table.md").read_text()


def test_run_dir_checkpoint_with_wandb_offline(run_train, tmp_path, capsys):
    result = run_train("optimizer=adafisher", "budget=steps", "budget.steps=3", "checkpoint.keep_final=true")
    assert result.status == "completed" and (result.run_dir / "checkpoint.pt").exists()
    rc = _script().main(["--run-dir", str(result.run_dir), "--no-figures", "--layers", "all", "--max-dim", "20",
                         "--batches", "1", "--wandb", "--wandb-mode", "offline"])
    assert rc == 0
    out = result.run_dir / "fisher_analysis"
    rows = _rows(out / "fisher_table.csv")
    assert [r["layer"] for r in rows] == ["features.0", "features.4", "head.1", "head.3"]
    assert {r["step"] for r in rows} == {"3"}
    wide = next(r for r in rows if r["layer"] == "head.1")  # Linear(4*2*2*2 -> 16): H is 33 > --max-dim 20
    assert (wide["H_dim"], wide["H_analysed_dim"]) == ("33", "20")
    err = capsys.readouterr().err
    assert "'head.1': H is 33x33 (more than --max-dim 20)" in err
    assert "head.1 H is 33x33 but averages only 16 rows" in err  # one batch of 16: rank-deficient estimate
    assert all(r["state_F_over_lambda_max"] not in ("", "nan") for r in rows)  # AdaFisher state from checkpoint
    assert not list(out.glob("*.png"))
    (wandb_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    record = _read_when_complete(wandb_file)
    assert record["run_id"] == result.run_dir.name  # logged to the training run's W&B id
    logged = {k for h in record["history"] for k in h}
    assert "fisher_analysis/table/nrows" in logged and record["summary"]["fisher_analysis/table/nrows"] == 4


def test_run_dir_without_checkpoint_explains_what_to_do(run_train, capsys):
    result = run_train("budget=steps", "budget.steps=1")
    assert not (result.run_dir / "checkpoint.pt").exists()
    assert _script().main(["--run-dir", str(result.run_dir)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.keep_final=true" in err and "--model/--data/--steps" in err

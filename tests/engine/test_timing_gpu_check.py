"""scripts/gpu_check: the dry run prints the whole plan anywhere, and the report's checks judge results."""
import importlib.machinery
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check"


def _module():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_dry_run_prints_the_plan_and_exits_0(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for step in ("pytest_gpu", "harness_adamw", "harness_adafisher", "bench_optimizers", "calibration_a_vs_a",
                 "run_bf16", "run_compile", "bench_data_loaders"):
        assert f"- {step} " in text
    assert "-m gpu" in text and "tests/engine/test_timing_gpu.py" in text
    assert "data.num_images=50000" in text and "data.batch_size=256" in text
    assert "precision=bf16" in text and "compile=true" in text
    assert "--target /tmp/site .whl/*.whl" in text
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_every_registered_optimizer_is_benchmarked():
    from fisherbench import optim

    names = _module().registered_optimizers()
    assert names[0] == "adamw" and sorted(names) == sorted(e.name for e in optim.OPTIMIZERS.entries())


def test_checks_judge_the_targets_and_the_report_renders():
    g = _module()
    harness = {"overhead": 1.01, "overhead_min": 1.0, "overhead_max": 1.02, "host_syncs_per_step": 0.02,
               "trainer_s_per_step": 0.0101, "plain_s_per_step": 0.01}
    ledger = {"train_s": 20.01, "eval_s": 0.5, "log_s": 0.01, "ckpt_s": 0.0, "warmup_s": 3.0, "wall_s": 23.52}
    rows = [{"optimizer": n, "amortised_s": t, "amortised_vs_ref": t / 0.01, "amortised_vs_ref_ci": [0.9, 1.1],
             "state_bytes": 2**20, "peak_ordinary_bytes": 2**21}
            for n, t in (("adamw", 0.01), ("adam", 0.01), ("adafisher", 0.0105))]
    results = {
        "harness_adamw": {"rc": 0, "seconds": 30, "data": harness},
        "harness_adafisher": {"rc": 0, "seconds": 30, "data": {**harness, "overhead": 1.04}},
        "bench_optimizers": {"rc": 0, "seconds": 100, "data": {"rows": rows}},
        "calibration_a_vs_a": {"rc": 0, "seconds": 40, "data": {"ratio_ci": [0.99, 1.02]}},
        "run_bf16": {"rc": 0, "seconds": 30, "data": {"status": "budget_exhausted", "ledger": ledger}},
    }
    checks = g.checks(results)
    by = {c["check"]: c["ok"] for c in checks}
    assert by["harness_adamw: overhead <= 1.03 (median trainer/plain)"] is True
    assert by["harness_adafisher: overhead <= 1.03 (median trainer/plain)"] is False
    assert by["bench_optimizers: AdaFisher amortised step <= 1.03 x Adam (batch 256)"] is False  # 1.05
    assert by["A-vs-A calibration: 95% CI of the ratio contains 1"] is True
    assert [c["ok"] for c in checks if c["check"].startswith("run_bf16")] == [True]
    assert [c["ok"] for c in checks if c["check"].startswith("run_compile")] == [None]  # not measured
    report = {"gpu": "NVIDIA H100", "date": "2026-11-26", "torch": "2.11.0", "cuda": "13.0", "python": "3.12.3",
              "git": "abc", "total_s": 400.0, "steps": results, "checks": checks}
    md = g.markdown(report)
    assert "| adafisher | 10.50 | 1.050" in md and "**no**" in md and "not measured" in md

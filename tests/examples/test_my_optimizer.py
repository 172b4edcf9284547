"""examples/my_optimizer: the sign-SGD plug-in's numerics, and its run.sh from a copy outside the repository."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "my_optimizer"


def load_signsgd():
    spec = importlib.util.spec_from_file_location("example_signsgd", EXAMPLE / "signsgd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SignSGD


@pytest.mark.parametrize("foreach", [False, True])
def test_signsgd_matches_its_formula(foreach):
    """m = β m + (1-β)(g + wd p); p -= lr sign(m), against a hand-written loop over 3 steps of a tiny model."""
    SignSGD = load_signsgd()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    lr, beta, wd = 0.01, 0.8, 0.1
    expect = [p.detach().clone() for p in model.parameters()]
    moments = [torch.zeros_like(p) for p in expect]
    opt = SignSGD(model.parameters(), lr=lr, momentum=beta, weight_decay=wd, foreach=foreach)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for i, (p, g) in enumerate(zip(expect, grads)):
            moments[i] = beta * moments[i] + (1 - beta) * (g + wd * p)
            expect[i] = p - lr * torch.sign(moments[i])
    for p, e in zip(model.parameters(), expect):
        torch.testing.assert_close(p.detach(), e)
    # state_dict round-trips (checkpoints)
    again = SignSGD(model.parameters(), lr=lr)
    again.load_state_dict(opt.state_dict())
    torch.testing.assert_close(again.state[next(model.parameters())]["momentum_buffer"], moments[0])


def copy_example(tmp_path: Path) -> Path:
    where = tmp_path / "somewhere else" / "my_optimizer"  # a space in the path, far from the repository
    shutil.copytree(EXAMPLE, where, ignore=shutil.ignore_patterns("runs", "report", "__pycache__"))
    return where


def run_sh(folder: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    # the suite is on PYTHONPATH (tests/conftest.py), as the example says; the working directory is the tmp dir
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(folder / "run.sh"), *args], cwd=folder.parent, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_run_sh_plans_the_equal_time_comparison_from_a_copy(tmp_path):
    folder = copy_example(tmp_path)
    p = run_sh(folder, "--dry-run", timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "3 runs (3 cells" in p.stdout and str(folder / "runs") in p.stdout, p.stdout
    assert "optimizer=signsgd" in p.stdout or "sign-SGD" in p.stdout


# not marked slow: CI runs the whole worked example (three short trainings and the report, about a minute on two
# idle cores), as the docs promise
def test_run_sh_compares_signsgd_with_adam_and_adafisher_and_writes_the_report(tmp_path):
    folder = copy_example(tmp_path)
    p = run_sh(folder, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    table = (folder / "report" / "tables" / "signsgd_equal_time.md").read_text()
    csv = (folder / "report" / "tables" / "signsgd_equal_time.csv").read_text()
    assert "| small CNN |" in table and all(c in table for c in ("AdaFisher", "Adam", "sign-SGD"))
    assert "sign-SGD" in csv
    # Adam and sign-SGD trained for AdaFisher's time (marked as matched or calibrated in the epochs table)
    epochs_row = next(line for line in table.splitlines() if line.startswith("| small CNN | 2 |"))
    assert epochs_row.count("ᵐ") + epochs_row.count("ᶜ") == 2, epochs_row

"""The library never switches the user's matplotlib backend; the command-line entry points choose Agg."""
from __future__ import annotations

import os
import subprocess
import sys

FIGURE_MODULES = ["fisherbench.analysis.plotting", "fisherbench.analysis.figures", "fisherbench.analysis.trajectories",
                  "fisherbench.results.figures", "fisherbench.results.trials"]


def test_importing_the_figure_modules_keeps_the_users_backend():
    code = ("import matplotlib; matplotlib.use('svg'); import importlib; "
            f"[importlib.import_module(m) for m in {FIGURE_MODULES!r}]; "
            "from fisherbench.results.trials import figure; "
            "import matplotlib; print(matplotlib.get_backend())")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().lower() == "svg"


def test_the_entry_points_choose_agg_unless_the_user_did(monkeypatch):
    from fisherbench import use_files_only_backend

    monkeypatch.delenv("MPLBACKEND", raising=False)
    use_files_only_backend()
    assert os.environ["MPLBACKEND"] == "Agg"
    monkeypatch.setenv("MPLBACKEND", "pdf")
    use_files_only_backend()
    assert os.environ["MPLBACKEND"] == "pdf"

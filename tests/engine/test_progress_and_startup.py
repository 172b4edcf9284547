"""What a run prints: every line names its run inside a multirun, a terminal keeps one line per evaluation
above the bar; and a configuration error arrives before the heavy stack (torch, ...) is imported."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fisherbench.core.budget import BudgetPlan
from fisherbench.engine.labels import line_tag, run_label
from fisherbench.engine.trainer import Progress

REPO = Path(__file__).resolve().parents[2]
ROW = {"eval": 2, "epoch": 3.0, "step": 189, "train_s": 5.5, "test/acc1": 0.925, "train/loss": 0.7}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _plan() -> BudgetPlan:
    return BudgetPlan(mode="steps", steps_per_epoch=10, steps=100)


@pytest.mark.parametrize("mode", ["lines", "always", "auto"])
def test_every_evaluation_prints_one_line_naming_the_run(monkeypatch, mode):
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    with run_label("adafisher_paper s1 3/12"):
        progress = Progress(mode, _plan(), 0, True, "test/acc1")
        progress.update(10, 0, 1.5)
        progress.evaluation(ROW)
        progress.close()
    text = err.getvalue()
    lines = [line for line in text.replace("\r", "\n").splitlines() if "eval 2" in line]
    assert len(lines) == 1, text
    assert lines[0].startswith("[adafisher_paper s1 3/12] eval 2 · epoch 3.00 · step 189")
    assert "test/acc1 0.9250" in lines[0]
    if mode != "lines":  # the bar was drawn on the terminal, and the eval line stays when it is cleared
        assert "adafisher_paper s1 3/12:" in text  # the bar shows the label too


def test_without_a_label_the_tag_is_fisherbench(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    Progress("lines", _plan(), 0, True, "test/acc1").evaluation(ROW)
    assert err.getvalue().startswith("[fisherbench] eval 2")
    assert line_tag() == "[fisherbench]"


def test_other_ranks_print_nothing(monkeypatch):
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    progress = Progress("always", _plan(), 0, False, "test/acc1")
    progress.evaluation(ROW)
    progress.close()
    assert err.getvalue() == ""


def test_summary_line_names_the_run():
    from fisherbench.engine.summary import summary_line

    result = SimpleNamespace(skipped=True, summary={"status": "completed"}, run_dir="runs/x")
    with run_label("adam s0 1/4"):
        assert summary_line(result).startswith("[adam s0 1/4] skipped")
    assert summary_line(result).startswith("[fisherbench] skipped")


def test_job_labels_name_what_varies():
    from fisherbench import train

    swept, jobs = train._multirun_plan(["optimizer=adafisher,adafisher_paper", "seed=0,1,2", "optimizer.lr=0.1,0.2",
                                        "budget.epochs=3"])
    assert swept == ["optimizer", "seed", "optimizer.lr"] and len(jobs) == 12
    train._multirun.update(swept=swept, total=len(jobs))
    assert train._job_label(jobs[9], 9) == "adafisher_paper s1 lr=0.2 10/12"


def _train_in_a_subprocess(*args: str) -> dict:
    """Run train.main() with `args`; report its exit code and whether torch had been imported by then."""
    code = ("import json, sys\n"
            f"sys.argv = ['train.py', *{list(args)!r}]\n"
            "from fisherbench import train\n"
            "try:\n    train.main(); rc = 0\nexcept SystemExit as e:\n    rc = e.code\n"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["stderr"] = out.stderr
    return result


@pytest.mark.parametrize("args, message", [
    (["optimizer=banana"], "Could not find 'optimizer/banana'"),
    (["-m", "optimizer=adam,banana", "seed=0,1"], "Could not find 'optimizer/banana'"),
    (["sed=1"], "Could not override 'sed'"),
    (["seed=abc"], "seed"),
])
def test_a_config_error_arrives_before_torch_is_imported(args, message):
    result = _train_in_a_subprocess(*args)
    assert result["rc"] == 2 and message in result["stderr"] and "Traceback" not in result["stderr"]
    assert result["torch"] is False


def test_the_early_check_has_no_false_alarms():
    """Keys only a registry schema knows (Adam's `eps` is in its dataclass, not its YAML) pass the early check;
    a wrong key inside a group is then still refused by the real composition."""
    result = _train_in_a_subprocess("--cfg", "job", "optimizer=adam", "optimizer.eps=1.0e-07")
    assert result["rc"] == 0, result["stderr"]
    result = _train_in_a_subprocess("optimizer=adam", "optimizer.epss=1")
    assert result["rc"] == 2 and "Key 'epss' not in" in result["stderr"] and result["torch"] is True


def test_warnings_are_one_line_of_ours_and_torch_jit_is_silent(capsys):
    import warnings

    from fisherbench import train

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        train.quiet_third_party_warnings()
        warnings.warn("shampoo: not preconditioning head.1.weight (128, 3136)", UserWarning, stacklevel=1)
        warnings.warn("`torch.jit.script` is deprecated. Please switch to `torch.compile`", FutureWarning,
                      stacklevel=1)
    err = capsys.readouterr().err
    assert err == "[fisherbench] warning: shampoo: not preconditioning head.1.weight (128, 3136) (UserWarning)\n"

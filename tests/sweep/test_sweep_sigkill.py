"""SIGKILL to `python -m fisherbench sweep` (issue 19, Low): its running train.py notices the sweep's death
(PR_SET_PDEATHSIG, or the parent watchdog), checkpoints, records `preempted` and exits, instead of training on
with nobody to read its outcome."""
import os
import signal
import subprocess
import sys
import time

import pytest

from fisherbench.core.store import RunDir
from tests.core.test_orphans import _alive
from tests.sweep.test_faults import REPO, _env, _spec, _wait_for


@pytest.mark.slow
def test_a_sigkilled_sweep_leaves_no_run_training(tmp_path):
    spec = _spec(tmp_path, "budget=steps", "budget.steps=1000000", "eval.every_epochs=1",
                 columns="{Adam: [optimizer=adam]}", seeds="[0]")
    root = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "fisherbench", "sweep", str(spec), "--results-dir", str(root),
                             "--threads", "1", "--gpus", "none"], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def training() -> bool:
            return any(RunDir(d).metrics() for d in root.glob("*") if d.is_dir() and not d.name.startswith("_"))

        _wait_for(training, 240, "the first run to train", proc)
        (run_dir,) = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith("_")]
        child = int((root / f".{run_dir.name}.lock").read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        t0 = time.time()
        while _alive(child) and time.time() - t0 < 120:
            time.sleep(0.2)
        alive = _alive(child)
        if alive:
            os.kill(child, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not alive, "train.py kept training after its sweep was SIGKILLed"
    rd = RunDir(run_dir)
    assert rd.summary()["status"] == "preempted" and rd.checkpoint_path.exists()  # resumable

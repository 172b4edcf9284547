"""A full disk while a run writes (issue 19, Low): a message saying so and that the run is resumable, exit 4
(like a preempted run: launch the same command again), no traceback; the next launch resumes."""
import subprocess
import sys
import textwrap

import pytest

from fisherbench.core.status import EXIT_PREEMPTED
from fisherbench.core.store import RunDir, iter_run_dirs

TINY = ["model=small_cnn", "model.width=4", "model.hidden=16", "data=synthetic_image", "data.shape=[3,8,8]",
        "data.num_train=32", "data.num_test=16", "data.batch_size=16", "logger=none", "optimizer=adam",
        "budget=epochs", "budget.epochs=3", "checkpoint.every_epochs=1"]

# train.py with the second checkpoint write failing as on a full disk (the first one succeeds)
FULL_AT_SECOND_CHECKPOINT = textwrap.dedent("""
    import errno, sys
    import fisherbench.core.checkpoint as ckpt
    from fisherbench.train import main
    real, calls = ckpt.save, []
    def save(path, payload):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, payload)
    ckpt.save = save
    sys.argv = ["train.py", *sys.argv[1:]]
    main()
""")


@pytest.mark.slow
def test_a_full_disk_mid_run_stops_with_a_message_and_the_run_resumes(tmp_path):
    args = [*TINY, f"results_dir={tmp_path / 'runs'}"]
    p = subprocess.run([sys.executable, "-c", FULL_AT_SECOND_CHECKPOINT, *args], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == EXIT_PREEMPTED, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert "disk full while writing" in p.stderr and "checkpoint.pt" in p.stderr
    assert "the run is resumable" in p.stderr and "launch the same command again" in p.stderr
    (rd,) = list(iter_run_dirs(tmp_path / "runs"))
    assert rd.summary() is None and rd.checkpoint_path.exists()  # not recorded as a failed run: resumable
    assert not (rd.path / "error.txt").exists()
    again = subprocess.run([sys.executable, "-m", "fisherbench", "train", *args], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming run" in again.stderr and RunDir(rd.path).summary()["status"] == "completed"

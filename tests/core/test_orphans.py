"""Children stop when the process that started them dies, even of SIGKILL (issue 19, Low: a SIGKILLed sweep
left its runs training). Each test starts a parent process, has it start a child the way the suite does,
SIGKILLs the parent and waits for the child to go."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _orphan_and_wait(parent_code: str, tmp_path: Path, timeout: float = 30.0) -> tuple[int, float]:
    """Run `parent_code` (which starts a child and writes its pid to argv[1]), SIGKILL the parent, and return
    (child pid, seconds until the child was gone)."""
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(parent_code), str(pid_file)],
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 120
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert parent.poll() is None, "the parent died before starting its child"
            assert time.time() < deadline, "the child never started"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        t0 = time.time()
        while _alive(child) and time.time() - t0 < timeout:
            time.sleep(0.1)
        gone = time.time() - t0
        if _alive(child):
            os.kill(child, signal.SIGKILL)
        return child, gone
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_started_with_the_death_signal_stops_when_its_parent_is_killed(tmp_path):
    child, gone = _orphan_and_wait("""
        import subprocess, sys, time
        from fisherbench.core.orphans import die_with_parent_kwargs
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                             **die_with_parent_kwargs())
        open(sys.argv[1], "w").write(str(p.pid))
        time.sleep(120)
    """, tmp_path)
    assert gone < 10, f"child {child} outlived its SIGKILLed parent"


def test_without_it_the_child_would_have_kept_running(tmp_path):
    child, gone = _orphan_and_wait("""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(8)"], start_new_session=True)
        open(sys.argv[1], "w").write(str(p.pid))
        time.sleep(120)
    """, tmp_path, timeout=3.0)
    assert gone >= 3.0  # the test above can fail: an ordinary child outlives its killed parent


def test_the_parent_watchdog_stops_a_child_without_the_death_signal(tmp_path):
    child, gone = _orphan_and_wait("""
        import os, subprocess, sys, time
        from fisherbench.core.orphans import child_env
        code = ("from fisherbench.core.orphans import watch_parent_from_env; import time; "
                "assert watch_parent_from_env() is not None; time.sleep(120)")
        p = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, env=child_env(dict(os.environ)))
        time.sleep(3)  # let the child start its watchdog
        open(sys.argv[1], "w").write(str(p.pid))
        time.sleep(120)
    """, tmp_path)
    assert gone < 10, f"child {child} outlived its SIGKILLed parent"

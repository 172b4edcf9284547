#!/usr/bin/env python
"""How long a configuration error takes to appear, as a ratio to the time `import torch` alone takes.

    python scripts/bench_startup.py                    # 7 interleaved rounds
    python scripts/bench_startup.py --rounds 11 --command "python train.py optimizer=banana"

A mistyped option should be reported before the heavy stack (torch, timm, datasets, wandb, ...) is even
loaded: the goal is a ratio <= 1. Each round runs, in alternating order, `python -c "import torch"` and the
failing command, and times each from the start of the process to the first line on stderr that contains
`--marker` (default "configuration error"; for the torch arm: to its exit). On a shared machine single
timings are noisy, so the arms are interleaved (ABBA), the rounds repeated, and the report gives the
median of each arm, the median of the per-round ratios with their range, and the sample standard deviation.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def time_to_marker(cmd: list[str], marker: str | None, timeout: float) -> tuple[float, int]:
    """Seconds from process start until `marker` appears on stderr (None: until exit), and the exit code."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    seen = None
    try:
        assert proc.stderr is not None
        if marker is not None:
            for line in proc.stderr:
                if marker in line:
                    seen = time.perf_counter() - start
                    break
        proc.stderr.read()
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    elapsed = time.perf_counter() - start
    if marker is not None and seen is None:
        raise SystemExit(f"bench_startup: {shlex.join(cmd)} exited {rc} without printing {marker!r}")
    return (seen if seen is not None else elapsed), rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    p.add_argument("--command", default="python train.py optimizer=banana",
                   help="the command whose error is timed (run from the repository root)")
    p.add_argument("--marker", default="configuration error", help="the stderr text that marks the error")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before one process is given up")
    args = p.parse_args(argv)
    cmd = shlex.split(args.command)
    if cmd and cmd[0] == "python":
        cmd[0] = sys.executable
    torch_cmd = [sys.executable, "-c", "import torch"]
    times: dict[str, list[float]] = {"import torch": [], "error": []}
    ratios = []
    for r in range(args.rounds):
        order = [("import torch", torch_cmd, None), ("error", cmd, args.marker)]
        if r % 2:
            order.reverse()
        got = {}
        for name, c, marker in order:
            t, rc = time_to_marker(c, marker, args.timeout)
            if name == "error" and rc != 2:
                print(f"bench_startup: warning: {args.command} exited {rc}, not 2", file=sys.stderr)
            got[name] = t
            times[name].append(t)
        ratios.append(got["error"] / got["import torch"])
        print(f"[bench_startup] round {r + 1}/{args.rounds}: import torch {got['import torch']:.2f}s, "
              f"error after {got['error']:.2f}s, ratio {ratios[-1]:.2f}", file=sys.stderr, flush=True)

    def spread(xs: list[float]) -> str:
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"median {statistics.median(xs):.2f} (min {min(xs):.2f}, max {max(xs):.2f}, sd {sd:.2f})"

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"command: {args.command}")
    print(f"{args.rounds} interleaved rounds, {os.cpu_count()} cores, load average {load:.1f} at the end")
    print(f"python -c 'import torch'       s: {spread(times['import torch'])}")
    print(f"time to '{args.marker}' s: {spread(times['error'])}")
    print(f"ratio error / import torch      : {spread(ratios)}  (goal: <= 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

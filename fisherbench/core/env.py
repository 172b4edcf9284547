"""Device selection, seeding, determinism flags and the facts `meta.json` records about the environment."""
from __future__ import annotations

import os
import platform
import random
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, cast

import numpy as np
import torch

from fisherbench.core.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout (for its git SHA), if this is one
VERSIONED_PACKAGES = (
    "torch", "torchvision", "numpy", "hydra-core", "omegaconf", "timm", "asdfghjkl", "pytorch-optimizer",
    "wandb", "datasets", "tokenizers", "fisherbench",
)


def resolve_device(name: str) -> torch.device:
    """The torch device for the `device` setting; UserError for a name torch does not know or cannot use."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device={name!r}: fisherbench runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={name} requested but CUDA is not available here; use device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def set_determinism(enabled: bool, cudnn_benchmark: Optional[bool] = None) -> None:
    """Deterministic kernels (torch, cuDNN, cuBLAS) and cuDNN autotuning. Must run before CUDA work starts.

    `cudnn_benchmark` None means: autotune unless deterministic (autotuning picks kernels by timing them,
    which is not reproducible, so config.validate refuses it together with deterministic=true).
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = (not enabled) if cudnn_benchmark is None else bool(cudnn_benchmark)
    torch.use_deterministic_algorithms(enabled, warn_only=False)


def configure_runtime(cfg: Any) -> dict[str, Any]:
    """Process-wide settings a run (and its calibration) trains under: threads, determinism, cuDNN autotuning.

    Returns them as `runtime_settings` records them (meta.json `runtime`, the calibration key).
    """
    threads = resolve_threads(cfg.get("threads"))
    if threads:
        torch.set_num_threads(threads)
    set_determinism(bool(cfg.deterministic), cfg.get("cudnn_benchmark"))
    return runtime_settings(cfg)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a SLURM or `taskset` allocation), else all."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def idle_cores() -> tuple[int, int, Optional[float]]:
    """(usable cores, cores not busy with other processes, the 1-minute load average): at least one idle core.

    Oversubscribed OpenMP threads spin against each other: on a 2-core machine with two busy processes a small
    CNN step took 1.0 s with 2 threads and 0.047 s with 1, so the cores left idle, not all cores, should set a
    CPU run's thread count. The load average stands for the other processes (a process that is starting has
    added little to it yet). Sweeps share these cores among their CPU workers; `threads=auto` takes them all.
    """
    cores, load = usable_cores(), load_average()
    if load is None:
        return cores, cores, None
    return cores, max(1, min(cores, int(cores - load + 0.5))), load


_auto_threads: Optional[int] = None  # resolved once per process: the run and its calibration agree


def auto_threads() -> Optional[int]:
    """`threads=auto`: OMP_NUM_THREADS when the environment sets it (a sweep worker, torchrun, the user: torch
    then already uses it, so None), else the idle cores. Says so, once, when that is fewer than the cores."""
    global _auto_threads
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    if _auto_threads is None:
        cores, idle, load = idle_cores()
        _auto_threads = idle
        if idle < cores:
            print(f"[fisherbench] threads=auto: {idle} thread{'s' if idle > 1 else ''} for {cores} cores (load "
                  f"average {load:.1f} from other processes); threads=N sets the count", file=sys.stderr, flush=True)
    return _auto_threads


def resolve_threads(setting: Any) -> Optional[int]:
    """The torch thread count a `threads` setting asks for (None: leave torch's default)."""
    if setting == "auto":
        return auto_threads()
    return int(setting) if setting else None


def runtime_settings(cfg: Any) -> dict[str, Any]:
    """Everything besides model, data and optimizer that changes a step's time, as `cfg` sets it on this
    machine (computed from the config, so a sweep's dry run finds the same calibration key as the run)."""
    bench = cfg.get("cudnn_benchmark")
    return {
        "deterministic": bool(cfg.deterministic),
        "cudnn_benchmark": (not bool(cfg.deterministic)) if bench is None else bool(bench),
        "precision": str(cfg.precision),
        "channels_last": bool(cfg.get("channels_last", False)),
        "compile": bool(cfg.get("compile", False)),
        "threads": resolve_threads(cfg.get("threads")) or torch.get_num_threads(),
    }


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """Image batches (N, C, H, W) in NHWC memory format; anything else unchanged."""
    return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 and t.is_floating_point() else t


def prepare_model(model: torch.nn.Module, channels_last: bool = False) -> torch.nn.Module:
    """Memory format of a built model (in place). torch.compile is applied after any DDP wrapping:
    see `compile_model`."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile with static shapes: every batch of a run has the same shape except possibly the last
    of an epoch (one extra compilation, once); compilation itself happens in the untimed warm-up."""
    return cast(torch.nn.Module, torch.compile(model, dynamic=False))  # an OptimizedModule


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": device.type,
        "host": socket.gethostname(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 2), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    else:
        info["name"] = f"cpu ({platform.machine()})"
    return info


def machine_key(device: torch.device) -> str:
    """Identifies 'this machine' for cached calibrations: device name, thread count and torch version."""
    info = device_info(device)
    return f"{info['name']}|threads={info['cpu_threads']}|torch={torch.__version__}"


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS does not say)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def busy_machine_warning(threads: int) -> Optional[str]:
    """A warning when the CPU is (over-)subscribed: 1-minute load average above 3/4 of the cores (+0.5).

    Timing on a busy machine measures the other work too (a busy 2-core box gave 9-22 steps per arm for two
    3-s budgets); the calibration still runs but says so.
    """
    load, cores = load_average(), os.cpu_count() or 1
    if load is None or load <= max(1.0, 0.75 * cores) + 0.5:
        return None
    return (f"this machine is busy (load average {load:.1f} on {cores} cores, this process uses {threads} "
            f"thread(s)): timings include that load; calibrate on an idle machine for stable budgets")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated device memory (CUDA); on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource  # lazy: POSIX-only module (the ImportError below covers Windows)

        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss_kb * 1024) if sys.platform != "darwin" else int(rss_kb)
    except (ImportError, OSError):
        return None

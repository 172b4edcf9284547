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
from typing import Any

import numpy as np
import torch

from fisherbench.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
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


def set_determinism(enabled: bool) -> None:
    """Deterministic kernels (torch, cuDNN, cuBLAS). Must run before CUDA work starts."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled
    torch.use_deterministic_algorithms(enabled, warn_only=False)


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
    """Identifies 'this machine' for cached calibrations: device name and thread count."""
    info = device_info(device)
    return f"{info['name']}|threads={info['cpu_threads']}|torch={torch.__version__}"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated device memory (CUDA); on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss_kb * 1024) if sys.platform != "darwin" else int(rss_kb)
    except (ImportError, OSError):
        return None

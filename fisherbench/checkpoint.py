"""Checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint holds the model, the optimizer adapter's state (second-order state included), the training
position (epoch, batch within the epoch, step), the time ledger and budget consumed, every RNG, the
training-metric sums of the current epoch, the number of metric rows already in the store, and the W&B run
id. It is written to a temporary file and renamed; the previous checkpoint is kept as `*.prev.pt` until the
new one is complete, so a torn or corrupted latest checkpoint falls back to the previous one.
"""
from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prev_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def save(path: Path, payload: dict[str, Any]) -> None:
    """Atomically write `payload`; the old checkpoint becomes `*.prev.pt` and the one before is removed."""
    payload = {**payload, "format_version": FORMAT_VERSION}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            buf = io.BytesIO()
            torch.save(payload, buf)
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, prev_path(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _try_load(path: Path, map_location: Any) -> Optional[dict[str, Any]]:
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception:  # noqa: BLE001 - any unreadable file is "corrupted" here
        return None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        return None
    return payload


def load_latest(path: Path, run_id: str, map_location: Any = "cpu") -> tuple[Optional[dict[str, Any]], list[str]]:
    """The newest readable checkpoint for `run_id`, and messages about what was skipped and why.

    A checkpoint written by a run with another identity is refused (CheckpointError): resuming it would
    silently mix two experiments.
    """
    notes: list[str] = []
    for candidate in (path, prev_path(path)):
        if not candidate.exists():
            continue
        payload = _try_load(candidate, map_location)
        if payload is None:
            notes.append(f"checkpoint {candidate} is corrupted or truncated; ignoring it")
            continue
        if payload.get("run_id") != run_id:
            raise CheckpointError(
                f"checkpoint {candidate} belongs to run {payload.get('run_id')!r}, not {run_id!r} (its config "
                "differs). Delete it or choose another results_dir."
            )
        if candidate != path:
            notes.append(f"resuming from the previous checkpoint {candidate}")
        return payload, notes
    return None, notes


def remove(path: Path) -> None:
    for p in (path, prev_path(path)):
        if p.exists():
            p.unlink()

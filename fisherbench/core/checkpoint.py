"""Checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint holds the model, the optimizer adapter's state (second-order state included), the training
position (epoch, batch within the epoch, step), the time ledger and budget consumed, every RNG, the
training-metric sums of the current epoch, the number of metric rows already in the store, and the W&B run
id. It is written to a temporary file and renamed; the previous checkpoint is kept as `*.prev.pt` until the
new one is complete, so a torn or corrupted latest checkpoint falls back to the previous one.

Loading never runs code from the file: a run directory can come from anyone who can write to a shared
store, and a pickle can execute anything when it is unpickled. Checkpoints are therefore written with
tensors and plain Python values only (RNG states included), and read with `torch.load(weights_only=True)`,
whose unpickler accepts tensors, containers, numbers and strings and refuses every other global. A file that
does not load that way, or does not hold what this module writes, is treated as corrupt: the loader falls
back to `.prev`, then to a fresh start, and says so.
"""
from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from fisherbench.core.store import atomic_write_bytes, finite_number, remove_stale_temps

FORMAT_VERSION = 2  # 2: weights-only payloads (RNG states as tensors and plain values)
REQUIRED_KEYS = ("run_id", "model", "optimizer", "state", "ledger", "rng", "format_version")


class CheckpointError(Exception):
    """A checkpoint belongs to another run: resuming it would silently mix two experiments."""


def rng_state() -> dict[str, Any]:
    """Every RNG the suite draws from, as tensors and plain values (loadable with weights_only=True)."""
    version, mt_state, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state({
        "bit_generator": npst["bit_generator"],
        "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": int(npst["pos"])},
        "has_gauss": int(npst["has_gauss"]),
        "gauss": float(npst["gauss"]),
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prev_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def save(path: Path, payload: dict[str, Any]) -> None:
    """Atomically write `payload`; the old checkpoint becomes `*.prev.pt` and the one before is removed.

    The payload is checked by loading it back the way `load_latest` will (weights only) before anything on
    disk changes: a component that put a non-plain object in its state is a bug, found at the first
    checkpoint rather than at the first resume.
    """
    payload = {**payload, "format_version": FORMAT_VERSION}
    buf = io.BytesIO()
    torch.save(payload, buf)
    try:
        torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError or RuntimeError here
        raise TypeError(f"checkpoint payload holds a value that is not a tensor or plain data: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new")
    # only the run's lock holder writes its checkpoints: every temporary file of an earlier write that was
    # killed (`..checkpoint.pt.new.*.tmp`) is stale, whatever its age
    atomic_write_bytes(tmp, buf.getbuffer(), stale_temps_after=0)
    if path.exists():
        os.replace(path, prev_path(path))
    os.replace(tmp, path)


def read_checkpoint(path: Path, map_location: Any = "cpu") -> tuple[Optional[dict[str, Any]], str]:
    """(payload, "") for a valid checkpoint; (None, why) otherwise. Never unpickles arbitrary objects."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable or non-weights-only file is corrupt here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"unreadable or holds objects other than tensors and plain data ({first[:200]})"
    if not isinstance(payload, dict):
        return None, f"holds a {type(payload).__name__}, not a checkpoint"
    if payload.get("format_version") != FORMAT_VERSION:
        return None, f"format version {payload.get('format_version')!r}, this version reads {FORMAT_VERSION}"
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        return None, f"lacks {missing}"
    if not isinstance(payload["run_id"], str) or not isinstance(payload["state"], dict):
        return None, "has a malformed run id or training state"
    if not isinstance(payload.get("data_fingerprint", ""), str):
        return None, "has a malformed data fingerprint"
    ledger = payload["ledger"]  # the budget used so far: a NaN or negative time would never (or wrongly) stop
    if not isinstance(ledger, dict) or not all(finite_number(v, 0) for v in ledger.values()):
        return None, "has a ledger whose times are not finite non-negative numbers"
    return payload, ""


def load_latest(path: Path, run_id: str, map_location: Any = "cpu", data_fingerprint: Optional[str] = None
                ) -> tuple[Optional[dict[str, Any]], list[str]]:
    """The newest valid checkpoint for `run_id`, and messages about what was skipped and why.

    A checkpoint written by a run with another identity is refused (CheckpointError): resuming it would
    silently mix two experiments. So is one trained on other data: each checkpoint records the fingerprint
    of the data it was trained on (the `data_fingerprint` entry, as meta.json's `dataset.fingerprint`), and
    with `data_fingerprint` given it must match. (The run id covers the data's content too; this check is the
    second line, against a checkpoint copied or left in place while the files changed.) A checkpoint written
    before fingerprints were recorded has none and is resumed.
    """
    notes: list[str] = []
    for candidate in (path, prev_path(path)):
        if not candidate.exists():
            continue
        payload, why = read_checkpoint(candidate, map_location)
        if payload is None:
            notes.append(f"ignoring checkpoint {candidate}: {why}")
            continue
        if payload["run_id"] != run_id:
            raise CheckpointError(
                f"checkpoint {candidate} belongs to run {payload['run_id']!r}, not {run_id!r} (its config "
                "differs). Delete it or choose another results_dir."
            )
        trained_on = payload.get("data_fingerprint")
        if data_fingerprint is not None and trained_on is not None and trained_on != data_fingerprint:
            raise CheckpointError(
                f"checkpoint {candidate} was trained on other data ({trained_on}) than this run reads now "
                f"({data_fingerprint}): resuming would continue that training on these files. Restore the "
                "original data to resume, or delete the run directory to train on this data from the start."
            )
        if candidate != path:
            notes.append(f"resuming from the previous checkpoint {candidate}")
        return payload, notes
    if notes:
        notes.append("no valid checkpoint: starting the run from the beginning")
    return None, notes


def remove(path: Path) -> None:
    """Remove the checkpoint, its previous one and the temporary files of killed writes of either."""
    for p in (path, prev_path(path)):
        p.unlink(missing_ok=True)
    remove_stale_temps(path.parent, f".{path.name}.new", 0)

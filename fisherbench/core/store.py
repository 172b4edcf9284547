"""The results store: one directory per run, named by a hash of the resolved config + seed.

Layout of `<results_dir>/<run_id>/`:
  config.yaml    resolved config (written at start)
  meta.json      git SHA/dirty, versions, device, dataset fingerprint, config choices (written at start)
  metrics.jsonl  one JSON object per evaluation, appended and flushed
  summary.json   written atomically at the end: status, best/final metrics, ledger, budget, memory, ...
  error.txt      traceback of a failed run
  checkpoint.pt  latest checkpoint while a run is unfinished (see fisherbench.core.checkpoint)
and `<results_dir>/.<run_id>.lock`, the lock of the process that runs it.

A directory without `summary.json` is an unfinished (running or interrupted) run. The store is the source
of truth; W&B mirrors it and reports read only the store.

Nothing read from a store is trusted: stores are shared between people and machines. Every reader here
validates what it reads (types and required fields) and raises `CorruptRunError` naming the file and the
problem; `RunDir.status()` turns that into `Status.CORRUPT`, so that sweeps and reports carry on and list
the run by path. Every file is written with the process umask's permissions (as `open()` would), so a
store shared by a group stays readable by it.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from fisherbench.core.status import RECORDED, Status

ID_LENGTH = 16


class CorruptRunError(Exception):
    """A file of a run directory does not hold what the suite writes there."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = Path(path), problem


class LockLostError(RuntimeError):
    """This process's run lock no longer names the lock file (deleted or replaced by someone else)."""


# ---------------------------------------------------------------------------------------------- identity
def canonical(obj: Any) -> Any:
    """A JSON-ready form in which equal settings are equal (sorted keys; 1.0 and 1 the same)."""
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, float):
        if math.isfinite(obj) and obj == int(obj) and abs(obj) < 2**53:
            return int(obj)  # 1.0 and 1 are the same setting
        return repr(obj)
    return obj


def run_id(identity: dict[str, Any]) -> str:
    """Stable hash of the identity part of a resolved config (which must include the seed)."""
    if "seed" not in identity:
        raise ValueError("a run identity must include the seed")
    blob = json.dumps(canonical(identity), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:ID_LENGTH]


# ------------------------------------------------------------------------------------------------ writing
def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so readers never mistake them for numbers (or for 0)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # what open() would give a new file in this process


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`.

    `mkstemp` creates its file with mode 0600; it gets the umask's mode before the rename so that atomically
    written files have the same permissions as appended ones.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(obj), indent=2, sort_keys=True, default=_json_default) + "\n")


# ------------------------------------------------------------------------------------------------ reading
def read_json(path: Path) -> Optional[Any]:
    """The parsed JSON in `path`, or None when the file is missing or not JSON. The caller checks its type."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_json_object(path: Path) -> Optional[dict[str, Any]]:
    """`read_json` for files that must hold a JSON object: None when missing; CorruptRunError otherwise."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptRunError(path, f"unreadable ({exc})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptRunError(path, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(obj, dict):
        raise CorruptRunError(path, f"holds a JSON {type(obj).__name__}, not an object")
    return obj


_NUMBER = (int, float)
_OPTIONAL_NUMBER = (int, float, type(None), str)  # "nan"/"inf" are written as strings
# summary.json: key -> accepted types. `run_id` and `status` are required; the rest are checked when present.
SUMMARY_FIELDS: dict[str, tuple[type, ...]] = {
    "run_id": (str,),
    "status": (str,),
    "stop_reason": (str, type(None)),
    "choices": (dict,),
    "experiment": (str, type(None)),
    "model": (str,),
    "data": (str,),
    "optimizer": (str,),
    "seed": (int,),
    "task": (str,),
    "select_metric": (str,),
    "higher_is_better": (bool,),
    "best": (dict, type(None)),
    "final": (dict, type(None)),
    "epochs_done": _NUMBER,
    "steps": (int,),
    "steps_per_epoch": (int,),
    "ledger": (dict,),
    "budget": (dict,),
    "peak_memory_bytes": (int, type(None)),
    "optimizer_state_bytes": (int, type(None)),
    "param_count": (int, type(None)),
    "diverged": (dict, type(None)),
    "error": (str, type(None)),
    "reference_budget": (dict,),
}
REQUIRED_SUMMARY_FIELDS = ("run_id", "status")


def validate_summary(path: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """`summary` if it has the fields and types the suite writes; CorruptRunError naming the first problem."""
    for key in REQUIRED_SUMMARY_FIELDS:
        if key not in summary:
            raise CorruptRunError(path, f"has no '{key}'")
    for key, types in SUMMARY_FIELDS.items():
        value = summary.get(key)
        if key in summary and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
            raise CorruptRunError(path, f"'{key}' is a {type(value).__name__}, expected {' or '.join(t.__name__ for t in types)}")
    try:
        status = Status.parse(summary["status"])
    except ValueError as exc:
        raise CorruptRunError(path, str(exc)) from None
    if status not in RECORDED:  # running/unfinished/corrupt are states a reader infers, never written
        raise CorruptRunError(path, f"status '{status}' is never written to a summary")
    for key in ("ledger",):
        bad = [k for k, v in summary.get(key, {}).items() if not isinstance(v, _OPTIONAL_NUMBER)]
        if bad:
            raise CorruptRunError(path, f"'{key}' has non-numeric entries {bad}")
    for key in ("best", "final"):
        row = summary.get(key)
        if isinstance(row, dict):
            _check_row_values(path, row, key)
    return summary


def _check_row_values(path: Path, row: dict[str, Any], where: str) -> None:
    bad = [k for k, v in row.items() if not isinstance(v, (*_OPTIONAL_NUMBER, bool))]
    if bad:
        raise CorruptRunError(path, f"'{where}' has non-numeric metrics {bad[:5]}")


def metric_value(value: Any) -> float:
    """A metric as a float: numbers as they are; "nan"/"inf"/"-inf" (how the store writes them) as floats."""
    if isinstance(value, bool):
        raise TypeError("a boolean is not a metric")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(value)
    raise TypeError(f"not a metric value: {value!r}")


# ------------------------------------------------------------------------------------------------- a run
class RunDir:
    """Writer/reader for one run directory. Readers validate; see the module docstring."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def run_id(self) -> str:
        return self.path.name

    config_path = property(lambda self: self.path / "config.yaml")
    meta_path = property(lambda self: self.path / "meta.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    summary_path = property(lambda self: self.path / "summary.json")
    error_path = property(lambda self: self.path / "error.txt")
    checkpoint_path = property(lambda self: self.path / "checkpoint.pt")

    def exists(self) -> bool:
        return self.config_path.exists()

    # -- writing (only the process that holds the run's lock writes) -------------------------------------
    def create(self, config: dict[str, Any], meta: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))
        atomic_write_json(self.meta_path, meta)

    def update_meta(self, **fields: Any) -> None:
        meta = self.meta() or {}
        meta.update(fields)
        atomic_write_json(self.meta_path, meta)

    def append_metrics(self, row: dict[str, Any]) -> None:
        line = json.dumps(_clean(row), sort_keys=True, default=_json_default)
        fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        with os.fdopen(fd, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_metrics(self, keep_rows: int) -> None:
        """Keep the rows of the first `keep_rows` evaluations (resume: drop rows written after the checkpoint)."""
        lines = [line for line, row in self._metric_lines() if row["eval"] < keep_rows]
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in lines))

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary_path, summary)

    # -- reading -------------------------------------------------------------------------------------------
    def _metric_lines(self) -> list[tuple[str, dict[str, Any]]]:
        """(line, row) for every valid row, one per evaluation index (the last one written), in index order.

        A torn last line (a process killed mid-write) and rows that are not objects with an integer `eval`
        are skipped; two processes that once wrote the same run are de-duplicated by evaluation index.
        """
        try:
            text = self.metrics_path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise CorruptRunError(self.metrics_path, f"unreadable ({exc})") from None
        by_index: dict[int, tuple[str, dict[str, Any]]] = {}
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or not isinstance(row.get("eval"), int) or isinstance(row["eval"], bool):
                continue
            if row["eval"] < 0:
                continue
            by_index[row["eval"]] = (line, row)
        return [by_index[i] for i in sorted(by_index)]

    def metrics(self) -> list[dict[str, Any]]:
        return [row for _, row in self._metric_lines()]

    def summary(self) -> Optional[dict[str, Any]]:
        """The validated summary, None when the run has none (unfinished); CorruptRunError when invalid."""
        s = read_json_object(self.summary_path)
        return None if s is None else validate_summary(self.summary_path, s)

    def meta(self) -> Optional[dict[str, Any]]:
        return read_json_object(self.meta_path)

    def config(self) -> Optional[dict[str, Any]]:
        """The resolved config; None when missing; CorruptRunError when it is not a YAML mapping."""
        try:
            text = self.config_path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise CorruptRunError(self.config_path, f"unreadable ({exc})") from None
        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise CorruptRunError(self.config_path, f"not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(cfg, dict):
            raise CorruptRunError(self.config_path, f"holds a YAML {type(cfg).__name__}, not a mapping")
        return cfg

    def status(self) -> Status:
        """Status from the summary; UNFINISHED when there is none; CORRUPT when it does not validate."""
        try:
            s = self.summary()
        except CorruptRunError:
            return Status.CORRUPT
        return Status.parse(s["status"]) if s else Status.UNFINISHED

    def problem(self) -> Optional[str]:
        """Why this run directory is corrupt (the first problem found), or None if its files validate."""
        for read in (self.config, self.meta, self.summary):
            try:
                read()
            except CorruptRunError as exc:
                return str(exc)
        return None

    def is_final(self) -> bool:
        return self.status().is_final


def iter_run_dirs(root: Path | str) -> Iterator[RunDir]:
    """Run directories under `root` (directories with a config.yaml; hidden names are the store's own)."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if not p.name.startswith((".", "_")) and p.is_dir() and (p / "config.yaml").exists():
            yield RunDir(p)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- locks
class RunLock:
    """An exclusive, non-blocking lock per run id: `flock` on `<root>/.<run_id>.lock`.

    The OS releases a flock when its process dies, so a crashed run never blocks a later one. A lock file
    can be deleted or replaced by hand while a run holds it, and a second process would then lock a new
    file of the same name; so `acquire` checks that the path still names the file it locked (same inode),
    and the holder calls `verify()` before it writes checkpoints, metrics and the summary, and stops with
    `LockLostError` when the check fails. `release` removes the file (no lock files are left behind); that
    is safe because an acquirer that locked the removed file sees the inode change and tries again.
    """

    def __init__(self, root: Path, rid: str) -> None:
        self.path = Path(root) / f".{rid}.lock"
        self._fd: Optional[int] = None
        self._ino: Optional[tuple[int, int]] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock if it is free; False if another process holds it."""
        for _ in range(100):  # retried only while other processes release/replace the file under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return False
                raise
            st = os.fstat(fd)
            try:
                on_disk = os.stat(self.path)
            except FileNotFoundError:
                on_disk = None
            if on_disk is not None and (on_disk.st_dev, on_disk.st_ino) == (st.st_dev, st.st_ino):
                self._fd, self._ino = fd, (st.st_dev, st.st_ino)
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return True
            os.close(fd)  # we locked a file that was removed or replaced meanwhile: try the current one
        raise LockLostError(f"could not take the lock {self.path}: it keeps being replaced")

    def verify(self) -> None:
        """Raise LockLostError unless the lock path still names the file this process locked."""
        if self._fd is None:
            raise LockLostError(f"lock {self.path} is not held")
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise LockLostError(f"lock file {self.path} was deleted while this process held it") from None
        if (st.st_dev, st.st_ino) != self._ino:
            raise LockLostError(f"lock file {self.path} was replaced while this process held it")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            try:
                self.verify()
                os.unlink(self.path)  # ours: remove it while still locked (see the class docstring)
            except (LockLostError, FileNotFoundError):
                pass  # someone else's file now: leave it alone
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = self._ino = None


def lock_is_held(root: Path | str, rid: str) -> bool:
    """True when a process holds the run's lock (a probe that neither creates nor removes the lock file)."""
    path = Path(root) / f".{rid}.lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)

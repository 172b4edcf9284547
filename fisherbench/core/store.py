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

A store is also a place where others can plant files. So (issue 19):
- no write follows a symbolic link: files are created with `O_NOFOLLOW` (and `O_EXCL` for new files)
  relative to a directory opened with `O_NOFOLLOW`, atomic writes rename over the target only when it is not
  a link, and a link where the suite writes raises `StoreLinkError` (a `UserError`) naming it;
- no read follows a link or waits on a FIFO, and every read is bounded: a file larger than the suite writes
  there (`MAX_BYTES`), JSON or YAML nested deeper than `MAX_DEPTH`, YAML with anchors or aliases (an
  "alias bomb" of a few hundred bytes expands to gigabytes), JSON with NaN/Infinity literals (the suite
  writes non-finite numbers as strings) and numbers out of their range make the run corrupt;
- a full disk (`ENOSPC`/`EDQUOT`) while a run writes raises `DiskFullError`: the run stops with a message
  and stays resumable from its last checkpoint.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import secrets
import shutil
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import quote

import yaml

from fisherbench.core.errors import UserError
from fisherbench.core.status import RECORDED, Status
from fisherbench.core.summary import REQUIRED, SUMMARY_FIELDS

ID_LENGTH = 16
MiB = 1 << 20
# the most bytes a reader accepts per file: generous multiples of what the suite writes there
MAX_BYTES = {"config.yaml": MiB, "summary.json": MiB, "meta.json": 8 * MiB, "metrics.jsonl": 256 * MiB,
             "json": 8 * MiB}
MAX_ERROR_TAIL = 64 * 1024  # error.txt: only its end is ever shown
MAX_DEPTH = 32  # nesting of a JSON/YAML store file (the suite writes at most ~6 levels)
STALE_TEMP_S = 3600.0  # a temporary file of an atomic write this old belongs to a killed writer


class CorruptRunError(Exception):
    """A file of a run directory does not hold what the suite writes there."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = Path(path), problem


class LockLostError(RuntimeError):
    """This process's run lock no longer names the lock file (deleted or replaced by someone else)."""


class StoreLinkError(UserError):
    """A symbolic link (or something else that is not a plain file or directory) sits where the suite writes."""

    def __init__(self, path: Path | str, what: str = "a file") -> None:
        super().__init__(
            f"{path} is a symbolic link (or not a plain {'directory' if what == 'a directory' else 'file'}) where "
            f"the suite writes {what}: refusing to follow it, since it could point at any file of yours. Nothing "
            "was written through it. Remove it (and find out who planted it), or choose another results_dir.")
        self.path = Path(path)


class DiskFullError(RuntimeError):
    """The disk (or quota) of the store is full: the run stopped and can be resumed once there is space."""

    def __init__(self, path: Path | str, exc: BaseException) -> None:
        super().__init__(
            f"disk full while writing {path} ({getattr(exc, 'strerror', None) or exc}); the run is resumable: free "
            "some space and launch the same command again (it resumes from its last checkpoint)")
        self.path = Path(path)


def is_disk_full(exc: BaseException) -> bool:
    """An OSError that says the device or the quota is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


# ------------------------------------------------------------------------------------------- numbers
def finite_number(value: Any, lo: Optional[float] = None, hi: Optional[float] = None, *, integer: bool = False,
                  lo_open: bool = False) -> bool:
    """Whether `value` is a finite int/float (not a bool; an int when `integer`) within [lo, hi] ((lo, hi] when
    `lo_open`). The one check for numbers read back from a store (ledgers, summaries, calibration caches)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        return False
    if not math.isfinite(value):
        return False
    if lo is not None and (value <= lo if lo_open else value < lo):
        return False
    return hi is None or value <= hi


def check_number(path: Path | str, where: str, value: Any, lo: Optional[float] = None, hi: Optional[float] = None,
                 *, integer: bool = False, lo_open: bool = False, optional: bool = False) -> Any:
    """`value` when `finite_number(value, lo, hi, ...)` (or None when `optional`); else CorruptRunError naming
    the file, the field and the range."""
    if optional and value is None:
        return None
    if finite_number(value, lo, hi, integer=integer, lo_open=lo_open):
        return value
    lo_text = "-inf" if lo is None else f"{lo:g}"
    hi_text = "inf" if hi is None else f"{hi:g}"
    kind = "an integer" if integer else "a finite number"
    raise CorruptRunError(Path(path), f"'{where}' is {_short_repr(value)}, expected {kind} in "
                                      f"{'(' if lo_open else '['}{lo_text}, {hi_text}]")


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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


def _open_dir(path: Path, below: Optional[Path] = None) -> int:
    """An O_RDONLY descriptor of directory `path`, created where missing, opened without following a link in
    any component below `below` (default: `path.parent`, i.e. only `path` itself is checked). `below` is the
    store's root (or its parent): a results_dir that is itself a link is the user's choice and is followed."""
    path = Path(path)
    base = Path(below) if below is not None else path.parent
    parts = path.relative_to(base).parts if path != base else ()
    base.mkdir(parents=True, exist_ok=True)
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, name in enumerate(parts):
            try:
                os.mkdir(name, 0o777, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise StoreLinkError(base.joinpath(*parts[: i + 1]), "a directory") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_dir(path: Path, *, below: Optional[Path] = None) -> Path:
    """Create directory `path` where missing and check that no component below `below` is a link (see
    `_open_dir`); StoreLinkError otherwise. For directories whose files another library writes (SQLite)."""
    os.close(_open_dir(Path(path), below))
    return Path(path)


def refuse_link(path: Path, what: str = "a file") -> Path:
    """`path` unless it exists and is not a regular file (a link, a FIFO, ...): then StoreLinkError."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Path(path)
    if not stat.S_ISREG(st.st_mode):
        raise StoreLinkError(path, what)
    return Path(path)


def _refuse_link(dir_fd: int, name: str, path: Path, what: str) -> None:
    """StoreLinkError when `name` in the directory exists and is not a regular file."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise StoreLinkError(path, what)


def remove_stale_temps(directory: Path, name: str, older_than: float = STALE_TEMP_S) -> list[str]:
    """Remove `.<name>.*.tmp` in `directory` (temporary files of atomic writes of `name` whose writer was killed)
    last modified more than `older_than` seconds ago (0: all of them, for a file only one process writes,
    such as a checkpoint under its run's lock). Returns the names removed; links are removed, not followed."""
    removed: list[str] = []
    prefix = f".{name}."
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode) or now - st.st_mtime < older_than:
                continue
            os.unlink(entry.path)
            removed.append(entry.name)
        except FileNotFoundError:
            pass
    return removed


def atomic_write_bytes(path: Path, data: bytes | memoryview, *, below: Optional[Path] = None,
                       stale_temps_after: float = STALE_TEMP_S) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`.

    Nothing follows a link: the directory is opened with O_NOFOLLOW (every component below `below`, see
    `_open_dir`), the temporary file is created with O_EXCL|O_NOFOLLOW in it, and a `path` that is a link (or a
    directory, a FIFO, ...) is refused with `StoreLinkError` before the rename. The file gets the umask's mode,
    as `open()` would give it. Temporary files of earlier writes of `path` whose writer was killed are removed
    (`remove_stale_temps`, those older than `stale_temps_after` seconds).
    """
    path = Path(path)
    dfd = _open_dir(path.parent, below)
    try:
        remove_stale_temps(path.parent, path.name, stale_temps_after)
        tmp = f".{path.name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            _refuse_link(dfd, path.name, path, "a file")
            os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            raise
    finally:
        os.close(dfd)


def open_append(path: Path, *, below: Optional[Path] = None) -> int:
    """A descriptor of `path` opened for appending (created with the umask's mode if missing), without following
    a link (see `atomic_write_bytes`); `StoreLinkError` for a link, a FIFO or anything else not a regular file."""
    path = Path(path)
    dfd = _open_dir(path.parent, below)
    try:
        try:  # O_NONBLOCK: a FIFO planted under the name must not block the open
            fd = os.open(path.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o666, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise StoreLinkError(path) from None
            raise
    finally:
        os.close(dfd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StoreLinkError(path)
    os.set_blocking(fd, True)
    return fd


def append_text(path: Path, text: str, *, below: Optional[Path] = None) -> None:
    """Append `text` to `path` in one write (`open_append`), then fsync."""
    fd = open_append(path, below=below)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str, *, below: Optional[Path] = None) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), below=below)


def atomic_write_json(path: Path, obj: Any, *, below: Optional[Path] = None) -> None:
    atomic_write_text(path, json.dumps(_clean(obj), indent=2, sort_keys=True, default=_json_default) + "\n",
                      below=below)


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a value shared by two keys twice: store readers refuse anchors and aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(obj: Any) -> str:
    return str(yaml.dump(obj, Dumper=_NoAliasDumper, sort_keys=False))


# ------------------------------------------------------------------------------------------------ reading
def _open_regular(path: Path) -> tuple[int, os.stat_result]:
    """An fd on the regular file `path`, opened without following a link or blocking on a FIFO, and its stat.
    FileNotFoundError/NotADirectoryError when it is missing; CorruptRunError when it is a link, not a regular
    file or unreadable (the fd is closed then)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CorruptRunError(path, "is a symbolic link (the suite never writes one; not followed)") from None
        raise CorruptRunError(path, f"unreadable ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptRunError(path, "unreadable (not a regular file; the suite writes one there)")
    except OSError as exc:
        os.close(fd)
        raise CorruptRunError(path, f"unreadable ({exc.strerror or exc})") from None
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of the regular file `path`, read without following a link or opening a FIFO, at most `limit`
    bytes. FileNotFoundError/NotADirectoryError when it is missing; CorruptRunError when it is a link, not a
    regular file, larger than `limit` or unreadable."""
    path = Path(path)
    fd, st = _open_regular(path)
    try:
        if st.st_size > limit:
            raise CorruptRunError(path, f"is {st.st_size} bytes, more than the {limit} a reader accepts there")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(limit + 1 - size, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise CorruptRunError(path, f"grew past the {limit} bytes a reader accepts there")
        return b"".join(chunks)
    except OSError as exc:
        raise CorruptRunError(path, f"unreadable ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def read_tail(path: Path, limit: int = MAX_ERROR_TAIL) -> Optional[str]:
    """The last `limit` bytes of the regular file `path` as text (undecodable bytes replaced), without following
    a link; None when missing; CorruptRunError when it is a link or not a regular file."""
    try:
        fd, st = _open_regular(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        os.lseek(fd, max(0, st.st_size - limit), os.SEEK_SET)
        return os.read(fd, limit).decode("utf-8", errors="replace")
    finally:
        os.close(fd)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} (the suite writes non-finite numbers as strings)")


def check_depth(obj: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether the dicts/lists of `obj` nest at most `limit` levels (checked without recursion)."""
    stack = [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list, tuple)):
            if depth >= limit:
                return False
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return True


def parse_json(path: Path, text: str | bytes) -> Any:
    """`text` parsed as the store's JSON: no NaN/Infinity literals, at most MAX_DEPTH levels; CorruptRunError
    otherwise."""
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise CorruptRunError(path, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except ValueError as exc:
        raise CorruptRunError(path, f"not valid JSON ({exc})") from None
    except RecursionError:
        raise CorruptRunError(path, f"nested deeper than the {MAX_DEPTH} levels a reader accepts") from None
    if not check_depth(obj):
        raise CorruptRunError(path, f"nested deeper than the {MAX_DEPTH} levels a reader accepts")
    return obj


def read_json(path: Path, limit: Optional[int] = None) -> Optional[Any]:
    """The parsed JSON in `path`, or None when the file is missing or not valid store JSON (a link, too large,
    too deep, not JSON). The caller checks its type and numbers (`check_number`)."""
    try:
        return parse_json(path, read_bounded(path, limit or MAX_BYTES["json"]))
    except (FileNotFoundError, NotADirectoryError, CorruptRunError):
        return None


def _read_store_text(path: Path, limit: int) -> Optional[str]:
    """A store file's text, read without following links and at most `limit` bytes: None when missing;
    CorruptRunError when it is a link, too large or not UTF-8."""
    try:
        raw = read_bounded(path, limit)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptRunError(path, f"unreadable ({exc})") from None


def read_json_object(path: Path, limit: Optional[int] = None) -> Optional[dict[str, Any]]:
    """`read_json` for files that must hold a JSON object: None when missing; CorruptRunError otherwise."""
    text = _read_store_text(path, limit or MAX_BYTES.get(Path(path).name, MAX_BYTES["json"]))
    if text is None:
        return None
    obj = parse_json(path, text)
    if not isinstance(obj, dict):
        raise CorruptRunError(path, f"holds a JSON {type(obj).__name__}, not an object")
    return obj


class _StoreYamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader for store files: no anchors or aliases (the suite never writes them, and a few hundred
    bytes of nested aliases expand into gigabytes), at most MAX_DEPTH levels of nesting (deeper input would
    exhaust Python's recursion in the composer and in every reader after it)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "anchors and aliases are not allowed in a store file",
                                              event.start_mark)
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_yaml(path: Path, text: str) -> Any:
    """`text` parsed as a store YAML file (see `_StoreYamlLoader`); CorruptRunError when it is not one."""
    try:
        return yaml.load(text, Loader=_StoreYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise CorruptRunError(path, f"not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    except RecursionError:
        raise CorruptRunError(path, f"nested deeper than the {MAX_DEPTH} levels a reader accepts") from None


def read_yaml_mapping(path: Path, limit: int = MAX_BYTES["config.yaml"]) -> Optional[dict[str, Any]]:
    """The YAML mapping in the store file `path`: None when missing; CorruptRunError when it is a link, too
    large, not UTF-8, not store YAML (anchors, aliases, too deep) or not a mapping."""
    text = _read_store_text(path, limit)
    if text is None:
        return None
    cfg = parse_yaml(path, text)
    if not isinstance(cfg, dict):
        raise CorruptRunError(path, f"holds a YAML {type(cfg).__name__}, not a mapping")
    return cfg


_OPTIONAL_NUMBER = (int, float, type(None), str)  # "nan"/"inf" are written as strings


def validate_summary(path: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """`summary` if it has the fields and types the suite writes; CorruptRunError naming the first problem."""
    for key in REQUIRED:  # summary.json: fields and accepted types come from core/summary.RunSummary
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
    for key, value in summary.get("ledger", {}).items():  # seconds: a budget is charged from these
        check_number(path, f"ledger.{key}", value, 0, optional=True)
    for key, lo, integer in (("epochs_done", 0, False), ("steps", 0, True), ("steps_per_epoch", 0, True),
                             ("peak_memory_bytes", 0, True), ("optimizer_state_bytes", 0, True),
                             ("param_count", 0, True)):
        if key in summary:
            check_number(path, key, summary[key], lo, integer=integer, optional=True)
    for key in ("best", "final"):
        row = summary.get(key)
        if isinstance(row, dict):
            _check_row_values(path, row, key)
    return summary


def _check_row_values(path: Path, row: dict[str, Any], where: str) -> None:
    bad = [k for k, v in row.items() if not isinstance(v, (*_OPTIONAL_NUMBER, bool))]
    if bad:
        raise CorruptRunError(path, f"'{where}' has non-numeric metrics {bad[:5]}")


# C0/C1 control characters and the Unicode bidirectional overrides (which reorder what a terminal shows)
_CONTROL = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
            for c in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A))}
_CONTROL_KEEP_LINES = {c: v for c, v in _CONTROL.items() if chr(c) not in "\n\t"}


def printable(text: Any, lines: bool = True) -> str:
    """`text` safe to print on a terminal: control characters (ESC sequences that move the cursor, retitle the
    window or hide output, ...) written as `\\xNN`; newlines and tabs kept when `lines`. Names and contents
    read from a store go through it before they are printed."""
    return str(text).translate(_CONTROL_KEEP_LINES if lines else _CONTROL)


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
        return bool(self.config_path.exists())

    # -- writing (only the process that holds the run's lock writes) -------------------------------------
    # Every write goes through `atomic_write_*` / `append_text` with `below=` the store root: neither the run
    # directory nor any file in it may be a link (StoreLinkError).
    @property
    def _below(self) -> Path:
        return self.path.parent

    def create(self, config: dict[str, Any], meta: dict[str, Any]) -> None:
        atomic_write_text(self.config_path, dump_yaml(config), below=self._below)
        atomic_write_json(self.meta_path, meta, below=self._below)

    def update_meta(self, **fields: Any) -> None:
        refuse_link(self.meta_path)  # a writer: a planted link is StoreLinkError, not a corrupt read
        meta = self.meta() or {}
        meta.update(fields)
        atomic_write_json(self.meta_path, meta, below=self._below)

    def append_metrics(self, row: dict[str, Any]) -> None:
        line = json.dumps(_clean(row), sort_keys=True, default=_json_default)
        append_text(self.metrics_path, line + "\n", below=self._below)

    def truncate_metrics(self, keep_rows: int) -> None:
        """Keep the rows of the first `keep_rows` evaluations (resume: drop rows written after the checkpoint)."""
        refuse_link(self.metrics_path)
        lines = [line for line, row in self._metric_lines() if row["eval"] < keep_rows]
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in lines), below=self._below)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary_path, summary, below=self._below)

    def write_error(self, text: str) -> None:
        """error.txt: the traceback of a failed run (atomically, never through a link)."""
        atomic_write_text(self.error_path, text, below=self._below)

    def error_tail(self) -> Optional[str]:
        """The end of error.txt (None when there is none); CorruptRunError when it is a link or not a file."""
        return read_tail(self.error_path)

    # -- reading -------------------------------------------------------------------------------------------
    def _metric_lines(self) -> list[tuple[str, dict[str, Any]]]:
        """(line, row) for every valid row, one per evaluation index (the last one written), in index order.

        A torn last line (a process killed mid-write) and rows that are not objects with an integer `eval`
        are skipped; two processes that once wrote the same run are de-duplicated by evaluation index.
        """
        try:
            text = read_bounded(self.metrics_path, MAX_BYTES["metrics.jsonl"]).decode("utf-8")
        except (FileNotFoundError, NotADirectoryError):
            return []
        except UnicodeDecodeError as exc:
            raise CorruptRunError(self.metrics_path, f"unreadable ({exc})") from None
        by_index: dict[int, tuple[str, dict[str, Any]]] = {}
        for line in text.splitlines():
            try:
                row = parse_json(self.metrics_path, line)
            except CorruptRunError:
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
        """The resolved config; None when missing; CorruptRunError when it is not a store YAML mapping."""
        return read_yaml_mapping(self.config_path)

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
        if not p.name.startswith((".", "_")) and p.is_dir() and os.path.lexists(p / "config.yaml"):
            yield RunDir(p)


def remove_tree(path: Path) -> None:
    """Remove the directory `path` and everything in it (nothing when missing). A link there is not the suite's:
    StoreLinkError rather than removing the link and then writing where it pointed, or ignoring it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise StoreLinkError(path, "a directory")
    shutil.rmtree(path, ignore_errors=True)  # rmtree never follows links inside the tree


# the tables every Optuna RDB storage has (optuna/storages/_rdb/models.py); a reader checks them before Optuna
# sees the file, since Optuna would otherwise create them in any SQLite file it is given
OPTUNA_TABLES = frozenset({"studies", "study_directions", "trials", "trial_params", "trial_values", "version_info",
                           "alembic_version"})


def check_optuna_storage(db: Path) -> None:
    """UserError unless `db` is an SQLite file with Optuna's tables (opened read-only: nothing is written). Readers
    (`results trials`) and the search, before it resumes a study, call it: Optuna itself would create its tables
    in any SQLite file it is given, and fail with a traceback on a file that is not SQLite."""
    try:
        con = sqlite3.connect(f"file:{quote(str(Path(db).resolve()))}?mode=ro", uri=True)
        try:
            names = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise UserError(f"{db} is not a readable Optuna storage: not an SQLite database ({exc}). It was left "
                        "unchanged; move it out of _optuna/.") from None
    missing = OPTUNA_TABLES - names
    if missing:
        raise UserError(f"{db} is not a readable Optuna storage: an SQLite database without Optuna's tables "
                        f"{', '.join(sorted(missing))}. It was left unchanged; move it out of _optuna/.")


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
            fd = self._open()
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

    def _open(self) -> int:
        """The lock file, created (O_EXCL) or opened without following a link (O_NOFOLLOW): run ids are predictable,
        and a planted `.<run id>.lock -> victim` would otherwise have the victim truncated to our PID. A lock file
        with another hard link is refused for the same reason."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                fd = os.open(self.path, flags)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENOTDIR):
                raise StoreLinkError(self.path, "a run's lock file") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:  # 0: removed meanwhile (retried)
            os.close(fd)
            raise StoreLinkError(self.path, "a run's lock file")
        return fd

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
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:  # a link or a FIFO is nobody's lock (taking the lock then refuses it with a message)
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            return False
        raise
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

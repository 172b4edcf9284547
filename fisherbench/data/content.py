"""The content identity of a dataset's files: the part of a run's identity that says *which data* it trains on.

A run id (`fisherbench.engine.identity`) hashes the config, and config options name data only by where it
is (`data.root`, `data.train=...`), which says nothing about what the files hold. So every dataset whose
files a user can change registers a *content function* (`fisherbench.data.registry.content_function`) that
returns a SHA-256 over the files it reads, named relative to the dataset's root: other files are another run
(never skipped as "already completed", never resumed from the other data's checkpoint), and the same files
moved elsewhere are the same run. Bundled and synthetic datasets register none: their content is fixed by
the installed package version and the options, which the run id already holds.

Hashing every file each time would cost a full read of the dataset per launch. The digests are cached per
*group* of files (a class folder, one text file) in a small JSON file under the cache directory, keyed by
every file's (path, size, mtime_ns, inode, ctime_ns): a file that is replaced, edited, touched or renamed
changes its key and its group is read again; an unchanged dataset costs one `stat` per file. The cache is
validated field by field (anything else is ignored and recomputed) and never holds code.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from fisherbench.core.errors import UserError
from fisherbench.core.store import atomic_write_text

CACHE_VERSION = 1
CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_CACHE_BYTES = 256 << 20  # a cache file larger than this is not ours: ignore it (and rewrite it)


class DataWarning(UserWarning):
    """Something in a user's dataset that a run can live with but the user should know (symlink loops,
    duplicate files, skipped entries); printed once per message."""


class NotARegularFile(UserError):
    """A dataset file is a FIFO, device, socket or folder: reading it could hang or never end."""


def is_sha256(value: object) -> bool:
    return type(value) is str and _SHA256.fullmatch(value) is not None


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of `path` (symlinks followed), refusing anything but a regular file.

    O_NONBLOCK: opening a FIFO for reading would otherwise block until a writer appears (a `pipe.png` hangs
    the scan); a character device such as /dev/zero would stream forever. Both are refused after `fstat`,
    without a single read. (O_NONBLOCK changes nothing for reads of regular files.)
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(f"{path} is not a regular file ({file_kind(mode)}); datasets read only "
                                  "regular files. Remove it or replace it with the file it should be.")
    except BaseException:
        os.close(fd)
        raise
    return fd


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO / named pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a regular file's bytes, read in chunks (memory stays small whatever the size)."""
    h = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(path: str, name: str) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UserError(f"cannot read dataset file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise NotARegularFile(f"{path} is not a regular file ({file_kind(st.st_mode)}); datasets read only "
                              "regular files. Remove it or replace it with the file it should be.")
    return f"{name}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}\n"


def read_cache(path: Path) -> dict[str, dict[str, str]]:
    """The valid entries of a content cache file ({group: {"key", "digest"}}); {} for anything else."""
    try:
        if path.stat().st_size > MAX_CACHE_BYTES:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: a deeply nested planted file
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("groups"), dict):
        return {}
    return {g: e for g, e in data["groups"].items()
            if isinstance(e, dict) and is_sha256(e.get("key")) and is_sha256(e.get("digest"))}


def write_json_atomic(path: Path, obj: object) -> bool:
    """Write `obj` as JSON to `path` atomically; False when it cannot be written (a cache that cannot be
    written only costs time later)."""
    try:
        atomic_write_text(path, json.dumps(obj))
    except OSError:
        return False
    return True


def group_digests(groups: Mapping[str, Sequence[tuple[str, str | os.PathLike]]], cache_files: Sequence[Path],
                  what: str = "dataset files") -> dict[str, str]:
    """{group: SHA-256 over its files' names (within the group) and contents}.

    `groups` maps a location-independent label (`train/cat`, `valid`) to (name, path) pairs. A group whose
    files' stat keys match the cache is not read; the others are hashed (with a progress line on stderr when
    there are many files) and the cache is rewritten with the current groups, in the first of `cache_files`
    that can be written (beside the data, else the user's cache folder).
    """
    cached: dict[str, dict[str, str]] = {}
    for cache_file in cache_files:
        cached = read_cache(cache_file)
        if cached:
            break
    keys: dict[str, str] = {}
    for group, files in groups.items():
        h = hashlib.sha256()
        for name, path in sorted(files, key=lambda f: f[0]):
            h.update(_stat_key(os.path.abspath(path), name).encode("utf-8", "surrogateescape"))
        keys[group] = h.hexdigest()
    stale = [g for g in groups if cached.get(g, {}).get("key") != keys[g]]
    todo = sum(len(groups[g]) for g in stale)
    progress = None
    if todo >= 2000:
        from tqdm.auto import tqdm  # only for a first scan of a large dataset

        progress = tqdm(total=todo, desc=f"hashing {what} (once; cached)", unit="file", file=sys.stderr)
    digests = {g: cached[g]["digest"] for g in groups if g not in stale}
    for g in stale:
        h = hashlib.sha256()
        for name, path in sorted(groups[g], key=lambda f: f[0]):
            h.update(f"{name}\0{file_sha256(path)}\n".encode("utf-8", "surrogateescape"))
            if progress is not None:
                progress.update(1)
        digests[g] = h.hexdigest()
    if progress is not None:
        progress.close()
    if stale or set(cached) != set(groups):
        record = {"version": CACHE_VERSION, "groups": {g: {"key": keys[g], "digest": digests[g]} for g in groups}}
        any(write_json_atomic(cache_file, record) for cache_file in cache_files)
    return digests


def combine(kind: str, digests: Mapping[str, str]) -> str:
    """One fingerprint of a dataset from its groups' digests: `<kind>:sha256=<hex>`."""
    h = hashlib.sha256()
    for group in sorted(digests):
        h.update(f"{group}\0{digests[group]}\n".encode("utf-8", "surrogateescape"))
    return f"{kind}:sha256={h.hexdigest()}"


def cache_files_for(folders: Sequence[Path], kind: str, *where: str | os.PathLike) -> list[Path]:
    """The cache file of one dataset location (its absolute root or file paths) in each of `folders`."""
    key = hashlib.sha256("\0".join(os.path.abspath(w) for w in where).encode("utf-8", "surrogateescape"))
    return [Path(folder) / f"{kind}-{key.hexdigest()[:20]}.json" for folder in folders]


def beside(root: Path) -> list[Path]:
    """Where the content cache of a dataset under `root` goes: `<root>/.fisherbench/`, else (a read-only
    dataset folder) the user's cache folder."""
    from fisherbench.data.registry import cache_root  # the registry imports nothing of this module

    return [Path(root) / ".fisherbench", cache_root(None) / "content"]


def folder_content(kind: str, root: Path, paths: Iterable[str]) -> str:
    """The content fingerprint of files under `root` (named relative to it), grouped by folder: a change
    re-reads one class folder, an unchanged tree costs a `stat` per file."""
    groups: dict[str, list[tuple[str, str]]] = {}
    base = os.path.abspath(root)
    for path in paths:
        folder, name = os.path.split(os.path.relpath(path, base))
        groups.setdefault(folder, []).append((name, path))
    digests = group_digests(groups, cache_files_for(beside(root), kind, root), what=f"{kind} files")
    return combine(kind, digests)


def files_content(kind: str, files: Mapping[str, Optional[str | os.PathLike]], cache_folders: Sequence[Path]
                  ) -> tuple[str, dict[str, str]]:
    """(fingerprint, {label: digest}) of a few named files (one group each: a label's digest depends on the
    file's content only, so identical files have equal digests). Labels with no path are left out."""
    present = {label: p for label, p in files.items() if p}
    digests = group_digests({label: [("", p)] for label, p in present.items()},
                            cache_files_for(cache_folders, kind, *present.values()), what=f"{kind} files")
    return combine(kind, digests), digests

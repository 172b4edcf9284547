"""Fetching dataset files: one downloader (progress bar, timeout, checksum, atomic rename) and the errors
the dataset builders raise when files are missing, so every dataset fails the same clear way offline."""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Optional

from tqdm.auto import tqdm

from fisherbench.core.errors import UserError

OFFLINE_ENV = "FISHERBENCH_OFFLINE"  # set to 1 to forbid every download (tests, air-gapped clusters)
USER_AGENT = "fisherbench/0.1 (python-urllib)"


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset's files are missing (or incomplete) and were not fetched; the message says how to get them."""

    def __str__(self) -> str:  # FileNotFoundError formats (errno, strerror); we want the plain message
        return str(self.args[0]) if self.args else ""


class DownloadError(UserError, RuntimeError):
    """A download failed (no network, HTTP error, checksum mismatch)."""


def file_digest(path: Path | str, algorithm: str = "md5", chunk_size: int = 1 << 20) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def human_size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def _env_true(name: str) -> bool:
    # huggingface_hub's reading of its boolean variables (1/ON/YES/TRUE, any case); ours accepts the same
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def downloads_allowed() -> bool:
    return not _env_true(OFFLINE_ENV)


def hf_offline_reason(*variables: str) -> Optional[str]:
    """Why the Hugging Face Hub must not be contacted, or None: FISHERBENCH_OFFLINE or one of `variables`
    (default HF_HUB_OFFLINE, which huggingface_hub, transformers and datasets all honour) is set."""
    for name in (OFFLINE_ENV, *(variables or ("HF_HUB_OFFLINE",))):
        if _env_true(name):
            return f"{name}={os.environ[name]} is set"
    return None


def download(url: str, dest: Path, md5: Optional[str] = None, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` with a progress bar; skip when `dest` exists (and matches `md5`).

    Writes to `dest.part` and renames only after the checksum matched, so an interrupted download never
    leaves a file that looks complete.
    """
    dest = Path(dest)
    if dest.is_file() and (md5 is None or file_digest(dest) == md5):
        return dest
    if not downloads_allowed():
        raise DownloadError(f"not downloading {url}: downloads are disabled ({OFFLINE_ENV}=1)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as out, tqdm(
            total=response.length, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name
        ) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError) as e:  # URLError covers HTTP errors and DNS failures
        part.unlink(missing_ok=True)
        raise DownloadError(f"could not download {url}: {e}") from e
    if md5 is not None:
        got = file_digest(part)
        if got != md5:
            part.unlink(missing_ok=True)
            raise DownloadError(f"checksum mismatch for {url}: md5 {got}, expected {md5}")
    os.replace(part, dest)
    return dest


def extract(archive: Path, into: Path) -> None:
    """Extract a .zip / .tar(.gz) archive (torchvision's extractor, which handles every format we need)."""
    # lazy: torchvision takes ~1.5 s to import; only image datasets use it
    from torchvision.datasets.utils import extract_archive

    extract_archive(str(archive), str(into))


def missing_message(what: str, path: Path, prepare: Optional[str], *, download_enabled: bool,
                    reason: str = "") -> str:
    """The message for a dataset that is not on disk: where it was looked for and the ways to get it.

    `prepare` is the `python -m fisherbench prepare-data` target (None: the dataset cannot be downloaded).
    """
    parts = [f"{what} not found at {path}."]
    if reason:
        parts.append(f"Downloading it failed: {reason}.")
    fixes = []
    if prepare is not None and not download_enabled:
        fixes.append("set data.download=true to let the run fetch it")
    if prepare is not None:
        fixes.append(f"run `python -m fisherbench prepare-data {prepare} --root {path.parent}` on a machine with network "
                     f"access (and copy {path.name}/ here if this machine is offline)")
    fixes.append("point data.root (or $FISHERBENCH_DATA) at a folder that already holds it")
    parts.append("To fix: " + "; or ".join(fixes) + ".")
    return " ".join(parts)


def describe_files(paths: Iterable[Path], algorithm: str = "md5") -> list[str]:
    """`name  size  algorithm:digest` lines for a checksum report."""
    return [f"{p}  {human_size(p.stat().st_size)}  {algorithm}:{file_digest(p, algorithm)}" for p in paths]

"""Token ids of large texts, kept small in memory: streamed in, written to a compact file, read memory-mapped.

A text is read in blocks of a few MB (`text_chunks`), each block is encoded and its ids are appended to a
flat binary file of uint16 (vocabulary <= 65,536: every id fits in 16 bits) or uint32 — the layout of
nanoGPT's `train.bin`. Training reads that file through `numpy.memmap`, and `TokenWindowSource` cuts each
batch's windows out of it on the fly, so a run holds a few batches of ids in memory, never the text or the
whole token stream (`scripts/bench_text_memory.py` measures the peak).

Beside each `<name>.bin` a small `<name>.json` records what the ids are (the text's sha256, the tokenizer's
digest and vocabulary, dtype, count) and the sha256 of the `.bin` itself. A cached file is used only when the
JSON parses into exactly these fields, matches what this run asks for, and the `.bin` has that length, hash
and no id >= the vocabulary; anything else (a damaged, altered or planted file) is rebuilt, with a message.
"""
from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from fisherbench.core.errors import UserError
from fisherbench.core.store import atomic_write_bytes
from fisherbench.data.loaders import epoch_order, num_batches, shard_size

IGNORE_INDEX = -100  # targets with this value are padding (torch's cross-entropy default ignore_index)
PAD_ID = 0  # the official WikiText-2 pipeline pads the last window with token id 0
CHUNK_BYTES = 4 << 20  # text read and encoded per block
STORE_FORMAT = 1  # bump when the .bin/.json layout changes: older files are then rebuilt
_MAX_META_BYTES = 64 << 10  # a sidecar is a few hundred bytes; anything larger is not ours


def say(msg: str) -> None:
    """A progress or warning line on stderr, in the trainer's style (data builds can take a while)."""
    print(f"[fisherbench] {msg}", file=sys.stderr, flush=True)


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a `vocab_size` vocabulary (ids 0 .. V-1)."""
    if vocab_size < 1:
        raise ValueError(f"vocabulary size must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------------------------- reading text


@dataclass(frozen=True)
class TextSpan:
    """Bytes [start, end) of a UTF-8 file: a whole file, or the head/tail of one cut at a line start."""

    path: Path
    start: int
    end: int
    sha256: str  # of exactly these bytes

    @property
    def size(self) -> int:
        return self.end - self.start


def iter_blocks(path: Path, start: int = 0, end: Optional[int] = None,
                block: Optional[int] = None) -> Iterator[bytes]:
    """The raw bytes of path[start:end] in blocks of at most `block` bytes (default `CHUNK_BYTES`)."""
    block = block or CHUNK_BYTES  # read at call time: tests shrink it to cut texts into many blocks
    with open(path, "rb") as f:
        f.seek(start)
        left = (end - start) if end is not None else None
        while left is None or left > 0:
            data = f.read(block if left is None else min(block, left))
            if not data:
                return
            if left is not None:
                left -= len(data)
            yield data


def text_chunks(span: TextSpan, cut: Optional[Callable[[str], int]] = None,
                block: Optional[int] = None) -> Iterator[str]:
    """The text of `span` decoded in pieces of about `block` bytes. With `cut`, each piece ends where
    `cut(buffer)` says (an index into the buffer; 0 = no safe place yet: read on), so that encoding piece by
    piece equals encoding the whole text; a text with no safe place holds its longest run in memory."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    buffer = ""
    for data in iter_blocks(span.path, span.start, span.end, block):
        buffer += decoder.decode(data)
        if cut is None:
            if buffer:
                yield buffer
            buffer = ""
            continue
        at = cut(buffer)
        if at > 0:
            yield buffer[:at]
            buffer = buffer[at:]
    buffer += decoder.decode(b"", final=True)
    if buffer:
        yield buffer


def last_cut(pattern: re.Pattern) -> Callable[[str], int]:
    """`cut` for `text_chunks`: the position of the last match of a zero-width `pattern` in the buffer's
    second half (searching the whole buffer each time would be quadratic on long lines); 0 if none."""

    def cut(buffer: str) -> int:
        lo = len(buffer) // 2
        while True:
            found = 0
            for m in pattern.finditer(buffer, lo):
                found = m.start()
            if found or lo == 0:
                return found
            lo //= 2

    return cut


@dataclass
class TextScan:
    """What one streaming pass over a file learns: its size in bytes and characters, its hash, whether it
    holds any non-space character, and whether it is valid UTF-8 (else the first problem)."""

    size: int
    chars: int
    sha256: str
    has_text: bool
    binary_reason: Optional[str]  # NUL bytes / many control characters: not text at all
    utf8_error: Optional[str]


# Bytes that plain text does not contain: C0 controls other than \t \n \v \f \r and ESC (terminal colours),
# and DEL. Text with more than 1% of them (or any NUL) is taken for a binary file.
_CONTROL = np.zeros(256, dtype=bool)
_CONTROL[[b for b in range(32) if b not in (9, 10, 11, 12, 13, 27)] + [127]] = True


def scan_text(path: Path, block: Optional[int] = None) -> TextScan:
    h = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    size = chars = nul = control = 0
    has_text = False
    utf8_error: Optional[str] = None
    for data in iter_blocks(path, block=block):
        h.update(data)
        counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
        nul += int(counts[0])
        control += int(counts[_CONTROL].sum())
        if utf8_error is None:
            try:
                piece = decoder.decode(data)
            except UnicodeDecodeError as e:
                utf8_error = f"{e.reason} at byte {size + e.start}"
            else:
                chars += len(piece)
                has_text = has_text or not piece.isspace() and bool(piece)
        size += len(data)
    if utf8_error is None:
        try:
            chars += len(decoder.decode(b"", final=True))
        except UnicodeDecodeError as e:
            utf8_error = f"{e.reason} at the end of the file"
    binary = None
    if nul:
        binary = f"{nul} NUL byte(s)"
    elif size and control > 0.01 * size:
        binary = f"{control} control bytes ({100 * control / size:.1f}% of {size})"
    return TextScan(size, chars, h.hexdigest(), has_text, binary, utf8_error)


def span_sha256(path: Path, start: int, end: int) -> str:
    h = hashlib.sha256()
    for data in iter_blocks(path, start, end):
        h.update(data)
    return h.hexdigest()


def line_cut(path: Path, chars: int, fraction: float) -> Optional[tuple[int, int]]:
    """Where to cut the last `fraction` of a text at a line start: (character index, byte offset) of the start
    of the line nearest `chars * (1 - fraction)`, or None when the text has no line break to cut at. The same
    cut as `text[:cut], text[cut:]` with cut = the newline nearest the target (the earlier one on a tie)."""
    target = int(chars * (1.0 - fraction))
    before: Optional[tuple[int, int]] = None  # last "\n" at a character index < target: (index, byte offset)
    after: Optional[tuple[int, int]] = None  # first "\n" at index >= target
    char_pos = byte_pos = 0
    for piece in text_chunks(TextSpan(path, 0, os.path.getsize(path), "")):
        n = len(piece)
        if char_pos < target:
            i = piece.rfind("\n", 0, target - char_pos)
            if i >= 0:
                before = (char_pos + i, byte_pos + len(piece[:i].encode("utf-8")))
        if after is None and char_pos + n > target:
            i = piece.find("\n", max(0, target - char_pos))
            if i >= 0:
                after = (char_pos + i, byte_pos + len(piece[:i].encode("utf-8")))
        char_pos += n
        byte_pos += len(piece.encode("utf-8"))
        if after is not None:
            break
    cuts = [(c + 1, b + 1) for c, b in (p for p in (before, after) if p is not None) if c < chars - 1]
    if not cuts:
        return None
    return min(cuts, key=lambda cb: abs(cb[0] - target))


# ------------------------------------------------------------------------------------------- the id store


@dataclass(frozen=True)
class IdsKey:
    """What a token-id file holds: the ids of the text with this sha256 under this tokenizer."""

    text_sha256: str
    tokenizer: str  # the tokenizer's digest
    vocab_size: int

    @property
    def dtype(self) -> np.dtype:
        return id_dtype(self.vocab_size)

    def name(self) -> str:
        return hashlib.sha256(f"{self.text_sha256}|{self.tokenizer}|{self.vocab_size}|"
                              f"format={STORE_FORMAT}".encode()).hexdigest()[:24]


def _hash_and_max(f: Any, dtype: np.dtype, count: int) -> tuple[str, int]:
    h = hashlib.sha256()
    top = -1
    left = count * dtype.itemsize
    step = (CHUNK_BYTES // dtype.itemsize) * dtype.itemsize
    while left > 0:
        data = f.read(min(step, left))
        if not data:
            break
        left -= len(data)
        h.update(data)
        if len(data) % dtype.itemsize == 0 and data:
            top = max(top, int(np.frombuffer(data, dtype=dtype.newbyteorder("<")).max()))
    return h.hexdigest(), top


def _check_meta(raw: bytes, key: IdsKey) -> dict[str, Any]:
    """The sidecar's fields after validation (it is untrusted input); ValueError says what is wrong."""
    if len(raw) > _MAX_META_BYTES:
        raise ValueError(f"{len(raw)} bytes, too large for a token-id record")
    meta = json.loads(raw.decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    expected = {"format": STORE_FORMAT, "text_sha256": key.text_sha256, "tokenizer": key.tokenizer,
                "vocab_size": key.vocab_size, "dtype": key.dtype.name}
    for field, want in expected.items():
        got = meta.get(field)
        if type(got) is not type(want) or got != want:
            raise ValueError(f"{field} is {got!r}, this run needs {want!r}")
    count, sha = meta.get("count"), meta.get("sha256")
    if type(count) is not int or not 0 <= count < 1 << 48:
        raise ValueError(f"count {count!r} is not a token count")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ValueError(f"sha256 {sha!r} is not a hex digest")
    return meta


def open_ids(bin_path: Path, key: IdsKey) -> tuple[Optional[np.ndarray], Optional[str]]:
    """(ids memory-mapped, None) when `bin_path` + its JSON hold exactly `key`'s ids, else (None, why not)."""
    meta_path = bin_path.with_suffix(".json")
    if not bin_path.exists() and not meta_path.exists():
        return None, None  # nothing cached: no message
    try:
        with open(meta_path, "rb") as f:
            meta = _check_meta(f.read(_MAX_META_BYTES + 1), key)
        dtype, count = key.dtype, meta["count"]
        # one open file for the checks and the mapping: a file swapped in between is not what gets mapped
        with open(bin_path, "rb") as f:
            if not os.path.isfile(bin_path) or os.fstat(f.fileno()).st_size != count * dtype.itemsize:
                raise ValueError(f"{bin_path.name} has {os.fstat(f.fileno()).st_size} bytes, the record says "
                                 f"{count} ids of {dtype.itemsize} bytes")
            sha, top = _hash_and_max(f, dtype, count)
            if sha != meta["sha256"]:
                raise ValueError(f"{bin_path.name}'s sha256 differs from the one recorded when it was written "
                                 f"(the file was altered)")
            if top >= key.vocab_size:
                raise ValueError(f"it holds id {top}, outside the vocabulary of {key.vocab_size}")
            ids = np.memmap(f, dtype=dtype.newbyteorder("<"), mode="r", shape=(count,)) if count else \
                np.zeros(0, dtype=dtype)
        return ids, None
    except (OSError, ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        return None, f"{e}"


def write_ids(chunks: Iterable[np.ndarray], key: IdsKey, bin_path: Optional[Path]) -> np.ndarray:
    """Append the id arrays of `chunks` to a new file and map it read-only. With `bin_path`, the file is kept
    there (with its JSON record) for later runs; without (no cache, or the cache is not writable), it is an
    unnamed temporary file that lives as long as the mapping."""
    dtype = key.dtype.newbyteorder("<")
    h = hashlib.sha256()
    count = 0
    keep = bin_path is not None
    if keep:
        try:
            bin_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=bin_path.parent, prefix=f".{bin_path.name}.", suffix=".tmp")
        except OSError as e:
            say(f"warning: cannot write token ids to {bin_path.parent} ({e}); using a temporary file")
            keep = False
    if not keep:
        f = tempfile.TemporaryFile(prefix="fisherbench-ids-")
    else:
        f = os.fdopen(fd, "w+b")
    try:
        for ids in chunks:
            if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= key.vocab_size):
                raise AssertionError(f"tokenizer produced ids outside [0, {key.vocab_size})")  # a bug, not input
            data = np.ascontiguousarray(ids, dtype=dtype).tobytes()
            f.write(data)
            h.update(data)
            count += len(ids)
        f.flush()
        ids_map = np.memmap(f, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype=dtype)
        if keep:
            assert bin_path is not None
            os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, bin_path)
            meta = {"format": STORE_FORMAT, "text_sha256": key.text_sha256, "tokenizer": key.tokenizer,
                    "vocab_size": key.vocab_size, "dtype": key.dtype.name, "count": count,
                    "sha256": h.hexdigest()}
            atomic_write_bytes(bin_path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
    except BaseException:
        if keep:
            f.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    f.close()  # the mapping keeps its own reference to the file
    return ids_map


def cached_ids(key: IdsKey, bin_path: Optional[Path], what: str,
               encode: Callable[[], Iterable[np.ndarray]]) -> np.ndarray:
    """The ids for `key`: read from `bin_path` when a valid file is there, else encoded (`encode()` yields id
    arrays block by block) and written there. `bin_path` None = no cache (an unnamed temporary file)."""
    if bin_path is not None:
        ids, problem = open_ids(bin_path, key)
        if ids is not None:
            return ids
        if problem:
            say(f"warning: cached token ids {bin_path} are not usable ({problem}); encoding {what} again")
    return write_ids(encode(), key, bin_path)


# -------------------------------------------------------------------------------------- windows from ids


class TokenWindowSource:
    """Language-model windows cut out of a flat token array on the fly (a `BatchSource`).

    Window w holds tokens [w*T, w*T + T + 1): inputs its first T, targets its last T, so consecutive windows
    share one token and each of the n - 1 next-token targets appears exactly once; the last window is padded
    with `PAD_ID` and its padded targets are `IGNORE_INDEX`. These are `wikitext.make_windows`'s windows, in
    the same shuffled order (`epoch_order` over the windows), built per batch: a memory-mapped array stays on
    disk (the page cache) and only a batch of ids is ever copied. On a CUDA device with the resident loader
    the ids are copied to the device once as int32 (4 bytes a token) and windows are gathered there.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, *, shuffle: bool, seed: int = 0,
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise UserError(f"batch size {batch_size} is not divisible by the world size {world_size}")
        n = len(tokens)
        if n < 2:
            raise UserError(f"need at least 2 tokens to make a language-model window, got {n}")
        self.seq_len, self.n = seq_len, n
        self.num_windows = -(-(n - 1) // seq_len)
        self.device = torch.device(device)
        if self.device.type == "cpu":
            self.tokens: Any = tokens  # numpy (memory-mapped): gathered with numpy, no copy of the whole
        else:
            self.tokens = torch.empty(n, dtype=torch.int32, device=self.device)
            step = CHUNK_BYTES
            for i in range(0, n, step):  # in slices: never the whole array as int32 on the host
                self.tokens[i:i + step] = torch.from_numpy(np.asarray(tokens[i:i + step], dtype=np.int32))
        self.batch_size = batch_size // world_size
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.drop_last = False
        self._n_local = shard_size(self.num_windows, shuffle, rank, world_size)
        self._offsets = np.arange(seq_len + 1)

    def __len__(self) -> int:
        return num_batches(self._n_local, self.batch_size, self.drop_last)

    @property
    def num_examples(self) -> int:
        return self._n_local

    def windows(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (len(idx), seq_len) int64 on the source's device, of windows `idx`."""
        pos = (np.asarray(idx, dtype=np.int64) * self.seq_len)[:, None] + self._offsets  # (B, T+1)
        beyond = pos >= self.n
        clipped = np.minimum(pos, self.n - 1)
        if self.device.type == "cpu":
            win = torch.from_numpy(np.asarray(self.tokens[clipped], dtype=np.int64))
            mask = torch.from_numpy(beyond)
        else:
            win = self.tokens[torch.from_numpy(clipped).to(self.device)].long()
            mask = torch.from_numpy(beyond).to(self.device)
        win = win.masked_fill(mask, PAD_ID)
        inputs = win[:, :-1].contiguous()
        targets = win[:, 1:].masked_fill(mask[:, 1:], IGNORE_INDEX)
        return inputs, targets

    def iterate(self, epoch: int, start_batch: int = 0):
        order = epoch_order(self.num_windows, self.seed, epoch, self.shuffle, self.rank, self.world_size).numpy()
        for b in range(start_batch, len(self)):
            yield self.windows(order[b * self.batch_size : (b + 1) * self.batch_size])

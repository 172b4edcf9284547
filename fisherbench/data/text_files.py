"""`data=text_files`: language modelling on your own plain-text files, no code.

* Text: `data.train`, `data.valid`, `data.test` are paths to UTF-8 text files (`data.valid` may be left out
  with `data.val_fraction > 0`: the last share of the training text, cut at a line start, becomes `val`).
* Tokeniser (`data.tokenizer`):
  - `byte`: the UTF-8 bytes, vocabulary 256 (no unknown tokens, no training);
  - `char`: one token per character of the training split, plus `<unk>` (id 0) for characters that only
    appear in valid/test;
  - `train`: a byte-level BPE (GPT-2's scheme) trained with the `tokenizers` library on the training split,
    offline, to `data.vocab_size` tokens; cached on disk under a key of the training text's hash and the
    options, so later runs load it;
  - a folder holding `vocab.json` + `merges.txt`: GPT-2's byte-level BPE format, or GPT-1's (`</w>`
    end-of-word suffix, recognised from the vocabulary) as data=wikitext2 uses.
* Windows, padding and masking are WikiText-2's (`data.wikitext.make_windows`): seq_len + 1 tokens with
  stride seq_len, the tail padded and its padded targets ignored, so the trainer's per-token perplexity
  counts every next-token prediction once.
* Token ids are cached as .npy under `data.cache_dir` (default `$FISHERBENCH_DATA/cache/text_files`),
  keyed by the text's and the tokeniser's hashes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import tokenizers
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE

from fisherbench.core.config import not_identity
from fisherbench.core.errors import UserError
from fisherbench.data.content import files_content
from fisherbench.data.download import DatasetNotFoundError
from fisherbench.data.loaders import TensorBatchSource
from fisherbench.data.registry import (
    DATASETS,
    BuildContext,
    DataBundle,
    DataCapabilities,
    DataOptions,
    cache_root,
    content_function,
)
from fisherbench.data.splits import check_fraction
from fisherbench.data.wikitext import IGNORE_INDEX, PAD_ID, gpt1_tokenizer, make_windows

KINDS = ("byte", "char", "train")  # anything else names a folder
SPLIT_FILES = {"train": "train", "val": "valid", "test": "test"}  # split -> option
# Pieces of text that byte-level BPE (and GPT-1's whitespace pre-tokeniser) encode exactly as the whole text:
# cut just before a newline that follows a non-space character. No pre-token crosses that point (GPT-2's
# pattern has no look-behind, and its whitespace look-ahead never reaches back over a non-space character),
# so the pieces give the same pre-tokens and ids (the tests compare with whole-text encoding), and
# `tokenizers` encodes them in parallel. Python's \S is a subset of the Rust regex's \S, so no cut is wrong.
_SAFE_CUT = re.compile(r"(?<=\S)(?=\n)")


@dataclass
class TextFilesOptions(DataOptions):
    name: str = "text_files"
    batch_size: int = 32
    seq_len: int = 256
    train: Optional[str] = None  # path of the training text (UTF-8)
    valid: Optional[str] = None  # validation text; None = the last data.val_fraction of the training text
    test: Optional[str] = None  # test text
    tokenizer: str = "byte"  # byte | char | train | <folder with vocab.json + merges.txt>
    vocab_size: int = 8192  # tokenizer=train: target vocabulary (>= 256, the byte alphabet)
    min_frequency: int = 2  # tokenizer=train: a pair merges only if it occurs at least this often
    val_fraction: float = 0.0  # with no data.valid: share of the training text (its end) held out as val
    cache: bool = not_identity(True)  # keep trained tokenizers and token ids under cache_dir
    cache_dir: Optional[str] = not_identity(None)  # None = $FISHERBENCH_DATA/cache
    # run although the training text is identical to the valid or test text (else an error, exit 2)
    allow_duplicates: bool = not_identity(False)


# ------------------------------------------------------------------------------------------------ tokenisers


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256)."""

    kind = "byte"
    vocab_size = 256
    digest = "byte"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


class CharTokenizer:
    """One token per character seen in the training text (sorted by code point, ids from 1); id 0 is `<unk>`
    for characters the training text lacks."""

    kind = "char"
    UNK = "<unk>"

    def __init__(self, training_text: str) -> None:
        self.chars = sorted(set(training_text))
        self.codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self.vocab_size = len(self.chars) + 1
        self.digest = hashlib.sha256(json.dumps(self.chars).encode()).hexdigest()

    def encode(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        pos = np.searchsorted(self.codepoints, cps).clip(0, max(len(self.codepoints) - 1, 0))
        known = self.codepoints[pos] == cps if len(self.codepoints) else np.zeros(len(cps), dtype=bool)
        return np.where(known, pos + 1, 0).astype(np.int32)


class HFTokenizer:
    """A `tokenizers.Tokenizer` with a pre-tokeniser for which `_SAFE_CUT` is safe (byte-level BPE, GPT-1's
    BERT pre-tokeniser): the text is encoded in pieces, in parallel."""

    def __init__(self, tokenizer: Any, kind: str) -> None:
        self.tokenizer, self.kind = tokenizer, kind
        self.vocab_size = tokenizer.get_vocab_size()
        self.digest = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()

    def encode(self, text: str) -> np.ndarray:
        pieces = [p for p in _SAFE_CUT.split(text) if p]
        rows = [e.ids for e in self.tokenizer.encode_batch(pieces, add_special_tokens=False)]
        return np.fromiter((i for row in rows for i in row), dtype=np.int32, count=sum(map(len, rows)))


def byte_level_bpe(vocab: Optional[Path] = None, merges: Optional[Path] = None) -> Any:
    """GPT-2's byte-level BPE pipeline: from vocab.json + merges.txt, or untrained (vocab=None)."""
    model = BPE.from_file(str(vocab), str(merges)) if vocab is not None else BPE()
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def folder_tokenizer(folder: Path) -> HFTokenizer:
    """vocab.json + merges.txt: GPT-1's format when the vocabulary has `</w>` end-of-word tokens, else GPT-2's
    byte-level format."""
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    missing = [p.name for p in (vocab, merges) if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"text_files: data.tokenizer={folder} is not byte/char/train and the folder lacks {missing}. Give a folder "
            f"with vocab.json + merges.txt (GPT-2 or GPT-1 BPE format), or data.tokenizer=byte|char|train.")
    try:
        tokens = json.loads(vocab.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetNotFoundError(f"text_files: {vocab} is not a JSON token -> id map ({e})") from None
    if not isinstance(tokens, dict) or not tokens:
        raise DatasetNotFoundError(f"text_files: {vocab} must be a non-empty JSON object mapping tokens to ids")
    try:
        if any(str(t).endswith("</w>") for t in tokens):
            return HFTokenizer(gpt1_tokenizer(folder), "gpt1-bpe")
        return HFTokenizer(byte_level_bpe(vocab, merges), "bpe")
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own Exception types on bad files
        raise DatasetNotFoundError(f"text_files: cannot build a BPE tokenizer from {folder}: {e}") from None


def train_bpe(text: str, vocab_size: int, min_frequency: int) -> Any:
    """A byte-level BPE trained on `text` (every byte is in the initial alphabet: no unknown tokens)."""
    tokenizer = byte_level_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([p for p in _SAFE_CUT.split(text) if p], trainer=trainer)
    return tokenizer


def trained_tokenizer(text: str, text_sha: str, opts: TextFilesOptions, cache_dir: Path) -> tuple[HFTokenizer, str]:
    """(tokenizer, where it came from): loaded from the cache, or trained on `text` (and cached)."""
    if opts.vocab_size < 256:
        raise UserError(f"text_files: data.vocab_size must be >= 256 (the byte alphabet) for tokenizer=train, "
                         f"got {opts.vocab_size}")
    if opts.min_frequency < 1:
        raise UserError(f"text_files: data.min_frequency must be >= 1, got {opts.min_frequency}")
    key = hashlib.sha256(f"{text_sha}|bpe|V={opts.vocab_size}|min={opts.min_frequency}|"
                         f"tokenizers={tokenizers.__version__}".encode()).hexdigest()[:24]
    path = cache_dir / "text_files" / f"tokenizer-{key}.json"
    if opts.cache and path.is_file():
        try:
            return HFTokenizer(Tokenizer.from_file(str(path)), "bpe-trained"), f"cached {path}"
        except Exception:  # noqa: BLE001 - a damaged cache file: train again
            pass
    tokenizer = HFTokenizer(train_bpe(text, opts.vocab_size, opts.min_frequency), "bpe-trained")
    if opts.cache:
        _write_atomic(path, tokenizer.tokenizer.to_str().encode())
    return tokenizer, f"trained on the training text ({path if opts.cache else 'not cached'})"


# ------------------------------------------------------------------------------------------------------ files


def _write_atomic(path: Path, payload: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except OSError:  # a cache that cannot be written only costs time
        pass


def read_text(option: str, value: Optional[str]) -> tuple[Path, str, str]:
    """(path, text, sha256) of one text file option, with clear errors."""
    if not value:
        raise UserError(f"data=text_files needs data.{option}=<path to a UTF-8 text file>")
    path = Path(value).expanduser()
    if not path.is_file():
        raise DatasetNotFoundError(f"text_files: data.{option}={path} is not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetNotFoundError(f"text_files: {path} is not UTF-8 text ({e}); convert it, e.g. "
                                   f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`") from None
    if not text.strip():
        raise DatasetNotFoundError(f"text_files: data.{option}={path} holds no text")
    return path, text, hashlib.sha256(raw).hexdigest()


def split_tail(text: str, fraction: float) -> tuple[str, str]:
    """(head, tail): the last `fraction` of `text`, cut at the start of the line nearest that point."""
    target = int(len(text) * (1.0 - fraction))
    before, after = text.rfind("\n", 0, target), text.find("\n", target)
    cuts = [c + 1 for c in (before, after) if 0 <= c < len(text) - 1]
    if not cuts:
        raise UserError("text_files: data.val_fraction needs a training text of several lines (it holds out the "
                         "last lines); give data.valid instead")
    cut = min(cuts, key=lambda c: abs(c - target))
    return text[:cut], text[cut:]


def token_ids(tokenizer: Any, text: str, text_sha: str, cache: bool, cache_dir: Path) -> np.ndarray:
    """Token ids of `text`, read from / written to the cache keyed by (text, tokenizer)."""
    key = hashlib.sha256((text_sha + tokenizer.digest).encode()).hexdigest()[:24]
    path = cache_dir / "text_files" / f"ids-{key}.npy"
    if cache and path.is_file():
        try:
            return np.load(path)  # allow_pickle=False (numpy's default): a planted file cannot run code
        except (OSError, ValueError):
            pass
    ids = tokenizer.encode(text)
    if cache:
        buffer = io.BytesIO()
        np.save(buffer, ids)
        _write_atomic(path, buffer.getvalue())
    return ids


# ------------------------------------------------------------------------------------------------------ entry


@DATASETS.register(
    "text_files",
    schema=TextFilesOptions,
    capabilities=DataCapabilities(input_kind="tokens", task="language_model", offline=False,
                                  downloadable=False),
    summary="Your own text files (data.train/valid/test) with a byte, char, trained-BPE or vocab.json+merges.txt "
            "tokenizer",
    source="user-provided files",
)
def build_text_files(opts: TextFilesOptions, ctx: BuildContext) -> DataBundle:
    if opts.seq_len < 1:
        raise UserError(f"data.seq_len must be >= 1, got {opts.seq_len}")
    fraction = check_fraction(opts.val_fraction)
    if opts.valid and fraction > 0:
        raise UserError("text_files: give data.valid or data.val_fraction (held out from the training text), "
                         "not both")
    if not opts.valid and fraction == 0:
        raise UserError("data=text_files needs data.valid=<path to a UTF-8 text file>, or data.val_fraction > 0 "
                         "to hold out the end of the training text as the validation split")
    cache_dir = cache_root(opts.cache_dir)
    files: dict[str, Optional[Path]] = {}
    texts: dict[str, str] = {}
    shas: dict[str, str] = {}
    for split, option in SPLIT_FILES.items():
        if split == "val" and not opts.valid:
            continue
        files[split], texts[split], shas[split] = read_text(option, getattr(opts, option))
    if not opts.valid:  # hold out the end of the training text; the tokeniser never sees it
        texts["train"], texts["val"] = split_tail(texts["train"], fraction)
        files["val"] = None
        for split in ("train", "val"):
            shas[split] = hashlib.sha256(texts[split].encode()).hexdigest()

    kind = opts.tokenizer
    origin = kind
    if kind == "byte":
        tokenizer: Any = ByteTokenizer()
    elif kind == "char":
        tokenizer = CharTokenizer(texts["train"])
    elif kind == "train":
        tokenizer, origin = trained_tokenizer(texts["train"], shas["train"], opts, cache_dir)
    else:
        folder = Path(kind).expanduser()
        if not folder.is_dir():
            raise DatasetNotFoundError(f"text_files: data.tokenizer must be byte, char, train or a folder with "
                                       f"vocab.json + merges.txt; {kind!r} is none of these")
        tokenizer, origin = folder_tokenizer(folder), str(folder)
    # byte/char ids take numpy a moment; cache only what a BPE has to work for
    cache_ids = opts.cache and isinstance(tokenizer, HFTokenizer)
    ids = {split: token_ids(tokenizer, texts[split], shas[split], cache_ids, cache_dir) for split in SPLIT_FILES}
    for split, t in ids.items():
        if len(t) < 2:
            raise UserError(f"text_files: the {split} text gives {len(t)} token(s); a language model needs >= 2")
    windows = {split: make_windows(t, opts.seq_len) for split, t in ids.items()}
    device = ctx.device if opts.loader in ("auto", "resident") else torch.device("cpu")
    common: dict[str, Any] = dict(device=device, rank=ctx.rank, world_size=ctx.world_size)
    eval_bs = opts.eval_batch_size or opts.batch_size
    sizes = {split: int(len(t)) for split, t in ids.items()}
    digest = hashlib.sha256("|".join([*(shas[s] for s in SPLIT_FILES), tokenizer.digest]).encode()).hexdigest()
    val_source = "valid file" if opts.valid else f"last {fraction:g} of the training text"
    return DataBundle(
        train=TensorBatchSource(*windows["train"], opts.batch_size, shuffle=True, seed=ctx.seed, **common),
        evals={split: TensorBatchSource(*windows[split], eval_bs, shuffle=False, **common)
               for split in ("val", "test")},
        task="language_model",
        num_classes=tokenizer.vocab_size,
        input_shape=(opts.seq_len,),
        num_train=len(windows["train"][0]),
        fingerprint=(f"text_files:{tokenizer.kind}:V={tokenizer.vocab_size}:T={opts.seq_len}:"
                     + ":".join(f"{s}={n}tok" for s, n in sizes.items())
                     + (f":val=tail{fraction:g}" if not opts.valid else "") + f":sha256={digest[:16]}"),
        description=f"text files ({tokenizer.kind} tokenizer, vocabulary {tokenizer.vocab_size}; val = {val_source})",
        extras={"ignore_index": IGNORE_INDEX, "pad_id": PAD_ID, "tokens": sizes, "tokenizer": origin,
                "tokenizer_sha256": tokenizer.digest,
                "files": {s: (str(p) if p else val_source) for s, p in files.items()}},
    )


@content_function("text_files")
def text_files_content(opts: TextFilesOptions) -> str:
    """The run-id content: the train/valid/test files and a tokenizer folder's vocab.json + merges.txt (hashed
    once, then cached by their stat). A training file identical to the valid or test file is refused (the
    score would be on training text) unless data.allow_duplicates=true."""
    files: dict[str, Path] = {}
    for option in ("train", "valid", "test"):
        if getattr(opts, option):
            files[option] = Path(getattr(opts, option)).expanduser()
            if not files[option].is_file():  # also refuses a FIFO or a device (never opened)
                raise DatasetNotFoundError(f"text_files: data.{option}={files[option]} is not a file")
    if opts.tokenizer not in KINDS:
        folder = Path(opts.tokenizer).expanduser()
        files.update({f"tokenizer/{n}": folder / n for n in ("vocab.json", "merges.txt") if (folder / n).is_file()})
    fingerprint, digests = files_content("text_files", files, [cache_root(opts.cache_dir) / "content"])
    same = [o for o in ("valid", "test") if o in digests and digests[o] == digests.get("train")]
    if same and not opts.allow_duplicates:
        raise UserError(f"text_files: data.train and data.{' and data.'.join(same)} have identical content, so the "
                         "evaluation would score the training text. Give a held-out file (or data.val_fraction), or "
                         "set data.allow_duplicates=true to run anyway.")
    return fingerprint

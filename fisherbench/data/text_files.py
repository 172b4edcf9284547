"""`data=text_files`: language modelling on your own plain-text files, no code.

* Text: `data.train`, `data.valid`, `data.test` are paths to UTF-8 text files (`data.valid` may be left out
  with `data.val_fraction > 0`: the last share of the training text, cut at a line start, becomes `val`).
* Tokeniser (`data.tokenizer`):
  - `byte`: the UTF-8 bytes, vocabulary 256 (no unknown tokens, no training);
  - `char`: one token per character of the training split, plus `<unk>` (id 0) for characters that only
    appear in valid/test;
  - `train`: a byte-level BPE (GPT-2's scheme) trained with the `tokenizers` library on the training split,
    offline, to `data.vocab_size` tokens (streamed through the trainer, never loaded whole); cached on disk
    under a key of the training text's hash and the options, so later runs load it;
  - a folder holding `vocab.json` + `merges.txt`: GPT-2's byte-level BPE format, or GPT-1's (`</w>`
    end-of-word suffix, recognised from the vocabulary) as data=wikitext2 uses.
* Windows, padding and masking are WikiText-2's (`data.token_ids.TokenWindowSource`): seq_len + 1 tokens with
  stride seq_len, the tail padded and its padded targets ignored, so the trainer's per-token perplexity
  counts every next-token prediction once.
* Memory: files are read in blocks of a few MB; token ids are written to a uint16/uint32 file under
  `data.cache_dir` (default `$FISHERBENCH_DATA/cache/text_files`, keyed by the text's and the tokeniser's
  hashes, hash-checked when read back) and training reads them memory-mapped (`data.token_ids`).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import tokenizers
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE

from fisherbench.core.config import not_identity
from fisherbench.core.errors import UserError
from fisherbench.core.store import atomic_write_bytes
from fisherbench.data.content import files_content
from fisherbench.data.download import DatasetNotFoundError
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
from fisherbench.data.token_ids import (
    IGNORE_INDEX,
    PAD_ID,
    IdsKey,
    TextSpan,
    TokenWindowSource,
    cached_ids,
    last_cut,
    line_cut,
    say,
    scan_text,
    span_sha256,
    text_chunks,
)
from fisherbench.data.wikitext import GPT1_VOCABULARY, gpt1_tokenizer

KINDS = ("byte", "char", "train")  # anything else names a folder
SPLIT_FILES = {"train": "train", "val": "valid", "test": "test"}  # split -> option
# Pieces of text that byte-level BPE (and GPT-1's whitespace pre-tokeniser) encode exactly as the whole text:
# cut just before a newline that follows a non-space character. No pre-token crosses that point (GPT-2's
# pattern has no look-behind, and its whitespace look-ahead never reaches back over a non-space character),
# so the pieces give the same pre-tokens and ids (the tests compare with whole-text encoding), and
# `tokenizers` encodes them in parallel. Python's \S is a subset of the Rust regex's \S, so no cut is wrong.
# Files are read in blocks cut at the same places, so block-wise encoding equals whole-text encoding too.
_SAFE_CUT = re.compile(r"(?<=\S)(?=\n)")
PROGRESS_BYTES = 16 << 20  # files at least this large get progress lines while they are encoded


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
    cut = None  # any block boundary is safe

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


class CharTokenizer:
    """One token per character seen in the training text (sorted by code point, ids from 1); id 0 is `<unk>`
    for characters the training text lacks."""

    kind = "char"
    UNK = "<unk>"
    cut = None

    def __init__(self, training_chars: set[str]) -> None:
        self.chars = sorted(training_chars)
        self.codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self.vocab_size = len(self.chars) + 1
        self.digest = hashlib.sha256(json.dumps(self.chars).encode()).hexdigest()

    @classmethod
    def from_span(cls, span: TextSpan) -> "CharTokenizer":
        chars: set[str] = set()
        for piece in text_chunks(span):
            chars.update(piece)
        return cls(chars)

    def encode(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        pos = np.searchsorted(self.codepoints, cps).clip(0, max(len(self.codepoints) - 1, 0))
        known = self.codepoints[pos] == cps if len(self.codepoints) else np.zeros(len(cps), dtype=bool)
        return np.where(known, pos + 1, 0).astype(np.int32)


class HFTokenizer:
    """A `tokenizers.Tokenizer` with a pre-tokeniser for which `_SAFE_CUT` is safe (byte-level BPE, GPT-1's
    BERT pre-tokeniser): the text is encoded in pieces, in parallel."""

    cut = staticmethod(last_cut(_SAFE_CUT))

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


def train_bpe(pieces: Any, vocab_size: int, min_frequency: int) -> Any:
    """A byte-level BPE trained on `pieces` (a text, or an iterator of texts / lists of texts, each cut at
    `_SAFE_CUT` places); every byte is in the initial alphabet: no unknown tokens."""
    if isinstance(pieces, str):
        pieces = [p for p in _SAFE_CUT.split(pieces) if p]
    tokenizer = byte_level_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(pieces, trainer=trainer)
    return tokenizer


def _span_pieces(span: TextSpan) -> Iterator[list[str]]:
    """The training text as lists of `_SAFE_CUT` pieces, one list per block: the trainer never holds the text."""
    for block in text_chunks(span, cut=HFTokenizer.cut):
        yield [p for p in _SAFE_CUT.split(block) if p]


def trained_tokenizer(span: TextSpan, opts: TextFilesOptions, cache_dir: Path) -> tuple[HFTokenizer, str]:
    """(tokenizer, where it came from): loaded from the cache, or trained on the text of `span` (and cached)."""
    if opts.vocab_size < 256:
        raise UserError(f"text_files: data.vocab_size must be >= 256 (the byte alphabet) for tokenizer=train, "
                         f"got {opts.vocab_size}")
    if opts.min_frequency < 1:
        raise UserError(f"text_files: data.min_frequency must be >= 1, got {opts.min_frequency}")
    key = hashlib.sha256(f"{span.sha256}|bpe|V={opts.vocab_size}|min={opts.min_frequency}|"
                         f"tokenizers={tokenizers.__version__}".encode()).hexdigest()[:24]
    path = cache_dir / "text_files" / f"tokenizer-{key}.json"
    if opts.cache and path.is_file():
        try:
            return HFTokenizer(Tokenizer.from_file(str(path)), "bpe-trained"), f"cached {path}"
        except Exception:  # noqa: BLE001 - a damaged cache file: train again
            say(f"text_files: cached tokenizer {path} does not load; training it again")
    if span.size >= PROGRESS_BYTES:
        say(f"text_files: training a BPE tokenizer (V={opts.vocab_size}) on {span.size / 1e6:.1f} MB of text ...")
    tokenizer = HFTokenizer(train_bpe(_span_pieces(span), opts.vocab_size, opts.min_frequency), "bpe-trained")
    if opts.cache:
        _write_atomic(path, tokenizer.tokenizer.to_str().encode())
    return tokenizer, f"trained on the training text ({path if opts.cache else 'not cached'})"


def warn_small_vocabulary(asked: int, tokenizer: HFTokenizer, opts: TextFilesOptions) -> None:
    """BPE stops merging when no pair occurs `min_frequency` times: a small text cannot fill a large vocabulary."""
    if tokenizer.vocab_size < asked:
        say(f"warning: text_files: data.vocab_size={asked} was asked, but the training text gives only "
            f"V={tokenizer.vocab_size} tokens (no further pair occurs >= data.min_frequency={opts.min_frequency} "
            f"times); the run uses V={tokenizer.vocab_size}. Set data.vocab_size={tokenizer.vocab_size} (or "
            f"lower) to silence this, or train on more text.")


# ------------------------------------------------------------------------------------------------------ files


def _write_atomic(path: Path, payload: bytes) -> None:
    try:
        atomic_write_bytes(path, payload)
    except OSError:  # a cache that cannot be written only costs time
        pass


def open_text(option: str, value: Optional[str]) -> tuple[TextSpan, int]:
    """(span, characters) of one text file option, checked in one streaming pass: hash, UTF-8, not binary,
    not empty."""
    if not value:
        raise UserError(f"data=text_files needs data.{option}=<path to a UTF-8 text file>")
    path = Path(value).expanduser()
    if not path.is_file():
        raise DatasetNotFoundError(f"text_files: data.{option}={path} is not a file")
    scan = scan_text(path)
    if scan.binary_reason:
        with open(path, "rb") as f:
            head = f.read(2)
        utf16 = (" If it is UTF-16 text (it starts with a byte-order mark), convert it: `iconv -f utf-16 -t utf-8 "
                 f"{path.name} > {path.stem}.utf8{path.suffix}`." if head in (b"\xff\xfe", b"\xfe\xff") else "")
        raise DatasetNotFoundError(f"text_files: data.{option}={path} looks binary, not like text "
                                   f"({scan.binary_reason}); give a plain UTF-8 text file.{utf16}")
    if scan.utf8_error:
        raise DatasetNotFoundError(f"text_files: {path} is not UTF-8 text ({scan.utf8_error}); convert it, e.g. "
                                   f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`")
    if not scan.has_text:
        raise DatasetNotFoundError(f"text_files: data.{option}={path} holds no text")
    return TextSpan(path, 0, scan.size, scan.sha256), scan.chars


def split_tail(span: TextSpan, chars: int, fraction: float) -> tuple[TextSpan, TextSpan]:
    """(head, tail): the last `fraction` of the text (in characters), cut at the start of the line nearest
    that point."""
    cut = line_cut(span.path, chars, fraction)
    if cut is None:
        raise UserError("text_files: data.val_fraction needs a training text of several lines (it holds out the "
                         "last lines); give data.valid instead")
    at = cut[1]
    return (TextSpan(span.path, 0, at, span_sha256(span.path, 0, at)),
            TextSpan(span.path, at, span.end, span_sha256(span.path, at, span.end)))


def encoded_blocks(tokenizer: Any, span: TextSpan, what: str) -> Iterator[np.ndarray]:
    """The ids of `span`'s text, block by block (with progress lines for large files)."""
    done, step = 0, max(PROGRESS_BYTES, span.size // 10)
    next_report = step
    for block in text_chunks(span, cut=tokenizer.cut):
        yield tokenizer.encode(block)
        done += len(block.encode("utf-8"))
        if span.size >= PROGRESS_BYTES and done >= next_report:
            say(f"text_files: encoded {done / 1e6:.0f} of {span.size / 1e6:.0f} MB of {what}")
            next_report += step


def token_ids(tokenizer: Any, span: TextSpan, what: str, cache_dir: Optional[Path]) -> np.ndarray:
    """Token ids of `span` as a memory-mapped uint16/uint32 array: read back from `cache_dir` (hash-checked)
    or encoded block by block into it (`cache_dir` None: into a temporary file)."""
    key = IdsKey(span.sha256, tokenizer.digest, tokenizer.vocab_size)
    return cached_ids(key, cache_dir / f"ids-{key.name()}.bin" if cache_dir is not None else None, what,
                      lambda: encoded_blocks(tokenizer, span, what))


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
    spans: dict[str, TextSpan] = {}
    chars: dict[str, int] = {}
    for split, option in SPLIT_FILES.items():
        if split == "val" and not opts.valid:
            continue
        spans[split], chars[split] = open_text(option, getattr(opts, option))
    if not opts.valid:  # hold out the end of the training text; the tokeniser never sees it
        spans["train"], spans["val"] = split_tail(spans["train"], chars["train"], fraction)

    kind = opts.tokenizer
    origin = kind
    if kind == "byte":
        tokenizer: Any = ByteTokenizer()
    elif kind == "char":
        tokenizer = CharTokenizer.from_span(spans["train"])
    elif kind == "train":
        tokenizer, origin = trained_tokenizer(spans["train"], opts, cache_dir)
        warn_small_vocabulary(opts.vocab_size, tokenizer, opts)
    else:
        folder = Path(kind).expanduser()
        if not folder.is_dir():
            raise DatasetNotFoundError(f"text_files: data.tokenizer must be byte, char, train or a folder with "
                                       f"vocab.json + merges.txt; {kind!r} is none of these")
        tokenizer, origin = folder_tokenizer(folder), str(folder)
    ids_dir = cache_dir / "text_files" if opts.cache else None
    ids = {split: token_ids(tokenizer, spans[split], f"the {split} text", ids_dir) for split in SPLIT_FILES}
    for split, t in ids.items():
        if len(t) < 2:
            raise UserError(f"text_files: the {split} text gives {len(t)} token(s); a language model needs >= 2")
    # the ids stay memory-mapped on the host; with the resident loader on a GPU they are copied there once
    device = ctx.device if opts.loader in ("auto", "resident") else torch.device("cpu")
    common: dict[str, Any] = dict(seq_len=opts.seq_len, device=device, rank=ctx.rank, world_size=ctx.world_size)
    eval_bs = opts.eval_batch_size or opts.batch_size
    train = TokenWindowSource(ids["train"], batch_size=opts.batch_size, shuffle=True, seed=ctx.seed, **common)
    sizes = {split: int(len(t)) for split, t in ids.items()}
    digest = hashlib.sha256("|".join([*(spans[s].sha256 for s in SPLIT_FILES), tokenizer.digest]).encode()).hexdigest()
    val_source = "valid file" if opts.valid else f"last {fraction:g} of the training text"
    files = {s: (str(spans[s].path) if (s != "val" or opts.valid) else val_source) for s in SPLIT_FILES}
    return DataBundle(
        train=train,
        evals={split: TokenWindowSource(ids[split], batch_size=eval_bs, shuffle=False, **common)
               for split in ("val", "test")},
        task="language_model",
        num_classes=tokenizer.vocab_size,
        input_shape=(opts.seq_len,),
        num_train=train.num_windows,
        fingerprint=(f"text_files:{tokenizer.kind}:V={tokenizer.vocab_size}:T={opts.seq_len}:"
                     + ":".join(f"{s}={n}tok" for s, n in sizes.items())
                     + (f":val=tail{fraction:g}" if not opts.valid else "") + f":sha256={digest[:16]}"),
        description=f"text files ({tokenizer.kind} tokenizer, vocabulary {tokenizer.vocab_size}; val = {val_source})",
        extras={"ignore_index": IGNORE_INDEX, "pad_id": PAD_ID, "tokens": sizes, "tokenizer": origin,
                "tokenizer_sha256": tokenizer.digest, "files": files,
                # which tokenizer family the ids belong to: the GPT models freeze their embeddings by default
                # only for GPT-1's (models/gpt.py, `embeddings_frozen`)
                "vocabulary": GPT1_VOCABULARY if tokenizer.kind == "gpt1-bpe" else tokenizer.kind},
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

"""WikiText-2 with GPT-1's BPE, as the paper's language-model pipeline (the official
`Language_Model/utils/wikitext2.py`).

* Text: `<root>/wikitext-2-raw/wiki.{train,valid,test}.raw` (variant `raw`, default) or
  `<root>/wikitext-2/wiki.{train,valid,test}.tokens` (variant `tokens`, the `<unk>`-replaced version), as the
  official zips unpack; when missing they are written from the HF `datasets` copy (`Salesforce/wikitext`).
* Tokeniser: GPT-1's (`openai-gpt`) vocab.json + merges.txt in `<root>/openai-gpt/` (or `data.tokenizer_dir`),
  run through the `tokenizers` library exactly as transformers' fast OpenAI-GPT tokenizer is built: BERT
  normaliser (lower-casing, accent stripping, control-character cleanup), BERT pre-tokeniser (whitespace and
  punctuation), BPE with the `</w>` end-of-word suffix. Vocabulary 40,478.
* Windows: the token stream is cut into consecutive windows of seq_len + 1 = 257 tokens with stride 256;
  inputs = window[:-1], targets = window[1:]. The last window is zero-padded and its padded targets are
  -100 (ignored by cross-entropy), so every next-token prediction is scored exactly once and the trainer's
  summed NLL over non-masked targets gives the per-token perplexity.
* Tokenised splits are written block by block to uint16 files next to the text (`gpt1_cache/`, keyed by the
  text's and the tokeniser's checksums, hash-checked when read back) and read memory-mapped
  (`data.token_ids`), so WikiText-103-sized text never sits in memory whole.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from fisherbench.core.config import not_identity
from fisherbench.core.errors import UserError
from fisherbench.core.store import atomic_write_text
from fisherbench.data.content import beside, files_content
from fisherbench.data.download import (
    DatasetNotFoundError,
    DownloadError,
    download,
    downloads_allowed,
    hf_offline_reason,
    missing_message,
)
from fisherbench.data.registry import (
    DATASETS,
    BuildContext,
    DataBundle,
    DataCapabilities,
    DataOptions,
    content_function,
    resolve_root,
)
from fisherbench.data.token_ids import (  # noqa: F401 - IGNORE_INDEX, PAD_ID: part of this module's interface
    IGNORE_INDEX,
    PAD_ID,
    IdsKey,
    TextSpan,
    TokenWindowSource,
    cached_ids,
    text_chunks,
)

GPT1_VOCAB_SIZE = 40478
# what `DataBundle.extras["vocabulary"]` says for ids of GPT-1's BPE: the vocabulary of the paper's pretrained
# (frozen) embeddings, which the GPT models freeze by default (models/gpt.py)
GPT1_VOCABULARY = "gpt1"
GPT1_REPO = "openai-community/openai-gpt"
GPT1_FILES = {  # openai-gpt tokenizer files on the Hugging Face Hub
    "vocab.json": "https://huggingface.co/openai-community/openai-gpt/resolve/main/vocab.json",
    "merges.txt": "https://huggingface.co/openai-community/openai-gpt/resolve/main/merges.txt",
}
VARIANTS = {
    # variant: (folder, file suffix, HF config)
    "raw": ("wikitext-2-raw", "raw", "wikitext-2-raw-v1"),
    "tokens": ("wikitext-2", "tokens", "wikitext-2-v1"),
}
SPLITS = {"train": "train", "val": "valid", "test": "test"}  # our split name -> file stem
HF_DATASET = "Salesforce/wikitext"
HF_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


# ---------------------------------------------------------------------------------------------- tokeniser


def gpt1_tokenizer(folder: Path | str) -> Any:
    """GPT-1's BPE tokeniser from `folder/vocab.json` + `folder/merges.txt` (a `tokenizers.Tokenizer`)."""
    folder = Path(folder)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    model = BPE.from_file(str(vocab), str(merges), unk_token="<unk>", end_of_word_suffix="</w>", fuse_unk=False)
    tokenizer = Tokenizer(model)
    if tokenizer.token_to_id("<unk>") is not None:
        tokenizer.add_special_tokens(["<unk>"])
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.BPEDecoder(suffix="</w>")
    return tokenizer


def tokenizer_dir(opts_dir: Optional[str], root: Path) -> Path:
    return Path(opts_dir).expanduser() if opts_dir else Path(root) / "openai-gpt"


def _from_hf_cache(name: str) -> Optional[Path]:
    """GPT-1's `name` from the local Hugging Face cache (a transformers user often has it), or None."""
    try:  # lazy: huggingface_hub is not a declared dependency; without it there is no cache to read
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(GPT1_REPO, name)
    except Exception:  # noqa: BLE001 - an unreadable cache is the same as none
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def ensure_tokenizer(folder: Path, *, download_missing: bool) -> Path:
    """Make sure GPT-1's vocab.json and merges.txt are in `folder`: copied from the local Hugging Face cache
    when it has them, else downloaded if allowed. HF_HUB_OFFLINE (and FISHERBENCH_OFFLINE) forbid contacting
    the Hub, as they do for huggingface_hub itself."""
    missing = [name for name in GPT1_FILES if not (folder / name).is_file()]
    if not missing:
        return folder
    cached = {name: _from_hf_cache(name) for name in missing}
    if all(cached.values()):
        folder.mkdir(parents=True, exist_ok=True)
        for name, src in cached.items():
            shutil.copyfile(src, folder / name)
        return folder
    what = f"GPT-1 tokenizer files {missing}"
    hint = " (data.tokenizer_dir sets another folder holding vocab.json and merges.txt)"
    if not download_missing:
        raise DatasetNotFoundError(missing_message(what, folder, "gpt1_tokenizer", download_enabled=False) + hint)
    offline = hf_offline_reason()
    if offline:
        raise DatasetNotFoundError(missing_message(
            what, folder, "gpt1_tokenizer", download_enabled=True,
            reason=f"{offline}, so the Hugging Face Hub is not contacted (and the local Hugging Face cache does "
                   f"not hold {GPT1_REPO})") + hint)
    try:
        for name in missing:
            download(GPT1_FILES[name], folder / name)
    except DownloadError as e:
        raise DatasetNotFoundError(missing_message(what, folder, "gpt1_tokenizer", download_enabled=True,
                                                   reason=str(e)) + hint) from e
    return folder


def encode_text(tokenizer: Any, text: str) -> np.ndarray:
    """Token ids of `text`. Lines are encoded in one parallel batch and concatenated: the pre-tokeniser splits
    on whitespace, so this equals encoding the whole text at once."""
    lines = text.splitlines()
    ids = [e.ids for e in tokenizer.encode_batch(lines, add_special_tokens=False)]
    flat = np.fromiter((i for row in ids for i in row), dtype=np.int32, count=sum(map(len, ids)))
    return flat


# ------------------------------------------------------------------------------------------------- text


def text_files(root: Path, variant: str) -> dict[str, Path]:
    folder, suffix, _ = VARIANTS[variant]
    return {split: Path(root) / folder / f"wiki.{stem}.{suffix}" for split, stem in SPLITS.items()}


def write_from_hf(root: Path, variant: str) -> dict[str, Path]:
    """Write the text files of `variant` from the HF `datasets` copy (rows are the original lines)."""
    if not downloads_allowed():
        raise DownloadError("downloads are disabled (FISHERBENCH_OFFLINE=1)")
    import datasets  # lazy: ~1 s to import; only the Hugging Face fallback uses it

    _, suffix, config = VARIANTS[variant]
    try:
        ds = datasets.load_dataset(HF_DATASET, config)
    except Exception as e:  # datasets raises many types offline (ConnectionError, OfflineModeIsEnabled, ...)
        # datasets honours HF_HUB_OFFLINE / HF_DATASETS_OFFLINE itself (it then reads only its local cache)
        offline = hf_offline_reason("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        where = f" ({offline}: only the local datasets cache was searched)" if offline else ""
        raise DownloadError(f"datasets.load_dataset({HF_DATASET!r}, {config!r}) failed{where}: {e}") from e
    files = text_files(root, variant)
    for split, path in files.items():
        lines = ds[HF_SPLITS[SPLITS[split]]]["text"]  # one row per line of the original file
        atomic_write_text(path, "".join(t if t.endswith("\n") else t + "\n" for t in lines))
    return files


def ensure_text(root: Path, variant: str, *, download_missing: bool) -> dict[str, Path]:
    if variant not in VARIANTS:
        raise UserError(f"data.variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    files = text_files(root, variant)
    if all(p.is_file() for p in files.values()):
        return files
    folder = Path(root) / VARIANTS[variant][0]
    if not download_missing:
        raise DatasetNotFoundError(missing_message(f"wikitext2 ({variant})", folder, "wikitext2",
                                                   download_enabled=False))
    try:
        return write_from_hf(root, variant)
    except DownloadError as e:
        raise DatasetNotFoundError(missing_message(f"wikitext2 ({variant})", folder, "wikitext2",
                                                   download_enabled=True, reason=str(e))) from e


def _sha256(*paths: Path) -> str:
    """sha256 of the files' bytes one after another, read in blocks (WikiText-103 is 540 MB)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _after_last_newline(buffer: str) -> int:
    """`text_chunks` cut for `encode_text`: right after a line break, so lines are never split."""
    return buffer.rfind("\n") + 1


def tokenize_split(text_path: Path, tok_dir: Path, tokenizer: Any, *, cache: bool) -> np.ndarray:
    """Token ids of one text file (memory-mapped uint16), read from / written to `gpt1_cache/` next to it
    when `cache` (a temporary file otherwise). The text is encoded block by block, cut after line breaks."""
    size = os.path.getsize(text_path)
    text_sha = _sha256(text_path)
    key = IdsKey(text_sha, _sha256(tok_dir / "vocab.json", tok_dir / "merges.txt"), tokenizer.get_vocab_size())
    span = TextSpan(Path(text_path), 0, size, text_sha)
    bin_path = Path(text_path).parent / "gpt1_cache" / f"{Path(text_path).name}.{key.name()[:16]}.bin"

    def blocks():
        for block in text_chunks(span, cut=_after_last_newline):
            yield encode_text(tokenizer, block)

    return cached_ids(key, bin_path if cache else None, str(text_path), blocks)


# ---------------------------------------------------------------------------------------------- windows


def make_windows(tokens: np.ndarray | torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive windows of `seq_len + 1` tokens with stride `seq_len` -> (inputs, targets), each
    (num_windows, seq_len) int64, all in memory (the datasets cut them per batch instead: `TokenWindowSource`
    gives the same windows). The last window is padded with `PAD_ID`; its padded targets are `IGNORE_INDEX`.
    Every one of the len(tokens) - 1 next-token targets appears exactly once."""
    tokens = torch.as_tensor(np.array(tokens, dtype=np.int64))  # a copy: ids may be a read-only memmap
    n = len(tokens)
    if n < 2:
        raise UserError(f"need at least 2 tokens to make a language-model window, got {n}")
    num_windows = -(-(n - 1) // seq_len)
    padded = torch.full((num_windows * seq_len + 1,), PAD_ID, dtype=torch.long)
    padded[:n] = tokens
    starts = torch.arange(num_windows).view(-1, 1) * seq_len
    windows = padded[starts + torch.arange(seq_len + 1)]
    inputs, targets = windows[:, :-1].contiguous(), windows[:, 1:].clone()
    target_pos = starts + torch.arange(1, seq_len + 1)  # position of each target in the token stream
    targets[target_pos >= n] = IGNORE_INDEX
    return inputs, targets


# ----------------------------------------------------------------------------------------------- entry


@dataclass
class WikiText2Options(DataOptions):
    name: str = "wikitext2"
    batch_size: int = 32
    seq_len: int = 256
    variant: str = "raw"  # raw (wiki.*.raw) | tokens (wiki.*.tokens, rare words replaced by <unk>)
    tokenizer_dir: Optional[str] = not_identity(None)  # folder with GPT-1's vocab.json + merges.txt; None = <root>/openai-gpt
    download: bool = not_identity(True)
    cache: bool = not_identity(True)  # keep the tokenised splits as .npy next to the text


@DATASETS.register(
    "wikitext2",
    schema=WikiText2Options,
    capabilities=DataCapabilities(input_kind="tokens", task="language_model", offline=False, downloadable=True),
    summary="WikiText-2 with GPT-1 BPE (vocab 40,478): 257-token windows, stride 256, padded tail masked",
    source="Salesforce/wikitext (HF datasets) + openai-community/openai-gpt tokenizer",
)
def build_wikitext2(opts: WikiText2Options, ctx: BuildContext) -> DataBundle:
    if opts.seq_len < 1:
        raise UserError(f"data.seq_len must be >= 1, got {opts.seq_len}")
    root = resolve_root(opts.root)
    files = ensure_text(root, opts.variant, download_missing=opts.download)
    tok_dir = ensure_tokenizer(tokenizer_dir(opts.tokenizer_dir, root), download_missing=opts.download)
    tokenizer = gpt1_tokenizer(tok_dir)
    ids = {split: tokenize_split(path, tok_dir, tokenizer, cache=opts.cache) for split, path in files.items()}
    device = ctx.device if opts.loader in ("auto", "resident") else torch.device("cpu")
    common: dict[str, Any] = dict(seq_len=opts.seq_len, device=device, rank=ctx.rank, world_size=ctx.world_size)
    eval_bs = opts.eval_batch_size or opts.batch_size
    sizes = {split: len(t) for split, t in ids.items()}
    train = TokenWindowSource(ids["train"], batch_size=opts.batch_size, shuffle=True, seed=ctx.seed, **common)
    return DataBundle(
        train=train,
        evals={split: TokenWindowSource(ids[split], batch_size=eval_bs, shuffle=False, **common)
               for split in ("val", "test")},
        task="language_model",
        num_classes=tokenizer.get_vocab_size(),
        input_shape=(opts.seq_len,),
        num_train=train.num_windows,
        fingerprint=(f"wikitext2-{opts.variant}:gpt1-bpe:V={tokenizer.get_vocab_size()}:T={opts.seq_len}:"
                     + ":".join(f"{s}={n}tok" for s, n in sizes.items())
                     + f":sha256={_sha256(*files.values(), tok_dir / 'vocab.json', tok_dir / 'merges.txt')[:16]}"),
        description=f"WikiText-2 ({opts.variant}) tokenised with GPT-1 BPE",
        extras={"ignore_index": IGNORE_INDEX, "pad_id": PAD_ID, "tokens": sizes, "vocabulary": GPT1_VOCABULARY},
    )


@content_function("wikitext2")
def wikitext2_content(opts: WikiText2Options) -> str:
    """The run-id content: the three text files and GPT-1's vocab.json + merges.txt (fetched first when
    missing, as the build would)."""
    root = resolve_root(opts.root)
    files = ensure_text(root, opts.variant, download_missing=opts.download)
    tok_dir = ensure_tokenizer(tokenizer_dir(opts.tokenizer_dir, root), download_missing=opts.download)
    named = {**files, **{f"tokenizer/{name}": tok_dir / name for name in GPT1_FILES}}
    return files_content("wikitext2", named, beside(root))[0]

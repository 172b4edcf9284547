"""The dataset registry: config name -> builder returning a `DataBundle` of deterministic batch sources."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, runtime_checkable

import torch

from fisherbench.core.config import not_identity
from fisherbench.core.errors import UserError
from fisherbench.core.registry import Registry, options_from

Batch = tuple[torch.Tensor, torch.Tensor]


@runtime_checkable
class BatchSource(Protocol):
    """Batches of one split. `iterate(epoch, start_batch)` is deterministic given the run seed, the epoch and
    the batch index (order *and* augmentation), so a resumed run sees exactly the batches it would have seen."""

    batch_size: int

    def __len__(self) -> int:  # batches per epoch (on this rank)
        ...

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        ...


@dataclass(frozen=True)
class DataCapabilities:
    input_kind: str = "image"  # image | tokens
    task: str = "classification"  # classification | language_model
    offline: bool = False  # available with no network (shipped in a package, or synthetic)
    downloadable: bool = False  # `python -m fisherbench prepare-data` can fetch it


@dataclass
class DataOptions:
    """Options every dataset config has; entries subclass it."""

    name: str = "???"
    batch_size: int = 256  # global batch (split across ranks under DDP)
    eval_batch_size: Optional[int] = None  # None = batch_size
    # where the files are and how many processes read them do not change the data (the run identity holds the
    # files' content, see `data_content`; order and augmentation are seeded per sample): not part of the identity
    root: Optional[str] = not_identity(None)  # None = $FISHERBENCH_DATA or ~/.cache/fisherbench/data
    num_workers: int = not_identity(0)
    loader: str = "auto"  # auto | torch | resident (whole set as tensors on the run's device)


@dataclass
class ClassificationOptions(DataOptions):
    """Options of every classification dataset."""

    # share of the training set held out (stratified, seeded by the run seed) as the eval split `val`;
    # 0 = no validation split (the paper's protocol)
    val_fraction: float = 0.0


@dataclass(frozen=True)
class BuildContext:
    seed: int = 0
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1


@dataclass
class DataBundle:
    """Everything the trainer needs about a dataset."""

    train: BatchSource
    evals: dict[str, BatchSource]  # "test" always; "val" where the protocol selects on it (WikiText-2)
    task: str  # classification | language_model
    num_classes: int  # classes, or vocabulary size for language modelling
    input_shape: tuple[int, ...]  # per example: (C, H, W) or (seq_len,)
    num_train: int
    fingerprint: str  # identifies the exact data (name, sizes, checksums) for meta.json
    description: str = ""
    extras: dict[str, Any] = field(default_factory=dict)


DATASETS: Registry = Registry("data")


# dataset name -> function(options) -> fingerprint of the content of the files it reads (fisherbench.data.content)
_CONTENT: dict[str, Callable[[Any], str]] = {}
MISSING_CONTENT = "missing"  # data_content(required=False) of data that is not there and cannot be fetched
_MEMO: Optional[dict[str, Optional[str]]] = None  # see `unchanged_data`


@contextlib.contextmanager
def unchanged_data() -> Iterator[None]:
    """Within this block the data is taken as unchanged: `data_content` is computed once per dataset and options.

    For planning a sweep, whose runs share a few datasets: without it every run's id would list and `stat`
    the dataset again (seconds per run for ImageNet). A run itself always computes its own."""
    global _MEMO
    outer, _MEMO = _MEMO, ({} if _MEMO is None else _MEMO)
    try:
        yield
    finally:
        _MEMO = outer


def content_function(name: str) -> Callable[[Callable[[Any], str]], Callable[[Any], str]]:
    """Decorator: register the content fingerprint of dataset `name`. Every dataset whose files a user can
    change registers one (it becomes part of the run id); bundled and synthetic datasets, whose content is
    fixed by the package and the options, register none."""
    def decorator(fn: Callable[[Any], str]) -> Callable[[Any], str]:
        _CONTENT[name] = fn
        return fn

    return decorator


def data_content(options: Any, *, required: bool = True) -> Optional[str]:
    """The content fingerprint of the data `options` select (computed before any skip/resume decision;
    cached, so an unchanged dataset costs a `stat` per file), or None for a dataset with fixed content.

    The function may fetch missing files as the build would (`data.download`). With `required=False` (planning
    a sweep, listing its runs) data that is absent and cannot be fetched gives `MISSING_CONTENT` instead of
    the error, so such runs can still be listed; a run itself always needs its data.
    """
    name = str(options["name"] if not hasattr(options, "name") else options.name)
    fn = _CONTENT.get(name)
    if fn is None:
        return None
    opts = options_from(DATASETS.get(name).schema, options)
    key = json.dumps(dataclasses.asdict(opts), sort_keys=True, default=str) + f"|{required}"
    if _MEMO is not None and key in _MEMO:
        return _MEMO[key]
    try:
        content = fn(opts)
    except UserError:
        if required:
            raise
        content = MISSING_CONTENT
    if _MEMO is not None:
        _MEMO[key] = content
    return content


def default_root() -> Path:
    return Path(os.environ.get("FISHERBENCH_DATA", Path.home() / ".cache" / "fisherbench" / "data")).expanduser()


def resolve_root(root: Optional[str]) -> Path:
    return Path(root).expanduser() if root else default_root()


def cache_root(cache_dir: Optional[str]) -> Path:
    """Where derived files (normalisation statistics, trained tokenizers, token ids) go: `data.cache_dir`,
    else `<data root default>/cache` ($FISHERBENCH_DATA/cache or ~/.cache/fisherbench/data/cache)."""
    return Path(cache_dir).expanduser() if cache_dir else default_root() / "cache"


def build_data(options: Any, context: Optional[BuildContext] = None) -> DataBundle:
    """Build the bundle for `options` (schema dataclass, mapping or DictConfig with a `name`)."""
    name = options["name"] if not hasattr(options, "name") else options.name
    entry = DATASETS.get(str(name))
    opts = options_from(entry.schema, options)
    if opts.batch_size < 1:
        raise UserError(f"data.batch_size must be >= 1, got {opts.batch_size}")
    if opts.loader not in ("auto", "torch", "resident"):
        raise UserError(f"data.loader must be auto|torch|resident, got {opts.loader!r}")
    bundle = entry.builder(opts, context or BuildContext())
    check_batch_size(str(name), opts.batch_size, bundle.num_train)
    return bundle


def check_batch_size(name: str, batch_size: int, num_train: int) -> None:
    """Refuse a training batch larger than the training set.

    A loader would silently use batches of `num_train` examples (every step the whole set), so the run would
    train with another batch size than the one its config records, and the batch size sets the optimizers'
    gradient/curvature noise and the steps per epoch. An error (exit 2) rather than a warning: the result
    would be stored under a wrong configuration, and the fix is one override.
    """
    if batch_size > num_train:
        raise UserError(
            f"data.batch_size={batch_size} is larger than the {num_train} training examples of '{name}' (after "
            f"any validation hold-out), so every batch would be the whole training set and the run would not "
            f"use the batch size it records. Set data.batch_size to at most {num_train} (or use more data / a "
            f"smaller data.val_fraction).")

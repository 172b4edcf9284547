"""CIFAR-10 / CIFAR-100 with the paper's pipeline (the official `Image_Classification/src/utils/data.py`).

Files: torchvision's layout and checksums (`<root>/cifar-10-batches-py/`, `<root>/cifar-100-python/`), fetched
with torchvision's URL and archive MD5. The pickles are read here (the same format torchvision reads), so the
loading code runs on hand-made files too: `verify=false` skips the MD5 check that real files must pass.

Two loaders give the same augmentation distribution:
* `torch`: torchvision transforms per image in a DataLoader (RandomCrop(32, 4), flip, ToTensor, Normalize,
  Cutout), each sample seeded by (seed, epoch, index);
* `resident`: the uint8 set lives on the run's device and each batch is augmented with tensor ops
  (`data.augment.BatchAugment`), seeded by (seed, epoch, batch).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fisherbench.core.config import not_identity
from fisherbench.core.errors import UserError
from fisherbench.data.augment import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, BatchAugment, Cutout
from fisherbench.data.content import beside, files_content
from fisherbench.data.download import (
    DatasetNotFoundError,
    DownloadError,
    download,
    extract,
    file_digest,
    missing_message,
)
from fisherbench.data.loaders import TensorBatchSource, TorchLoaderSource, resolve_loader
from fisherbench.data.registry import (
    DATASETS,
    BuildContext,
    ClassificationOptions,
    DataBundle,
    DataCapabilities,
    content_function,
    resolve_root,
)
from fisherbench.data.safe_pickle import load_plain
from fisherbench.data.splits import hold_out


@dataclass(frozen=True)
class CifarSpec:
    """Facts about one CIFAR variant; file names, URL and MD5s come from torchvision's class (one place)."""

    name: str
    torchvision_class: str  # "CIFAR10" | "CIFAR100"
    label_key: str  # key of the labels in the data pickles
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def tv(self) -> Any:
        import torchvision.datasets  # lazy: torchvision takes ~1.5 s to import; only image datasets use it

        return getattr(torchvision.datasets, self.torchvision_class)

    @property
    def folder(self) -> str:
        return self.tv.base_folder

    def files(self, split: str) -> list[tuple[str, str]]:
        """[(file name, md5)] of the data pickles of `split` ("train" | "test")."""
        return [tuple(f) for f in (self.tv.train_list if split == "train" else self.tv.test_list)]

    @property
    def meta(self) -> dict:
        return self.tv.meta


CIFAR_SPECS = {
    "cifar10": CifarSpec("cifar10", "CIFAR10", "labels", 10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": CifarSpec("cifar100", "CIFAR100", "fine_labels", 100, CIFAR100_MEAN, CIFAR100_STD),
}


@dataclass
class CifarArrays:
    train_images: np.ndarray  # (N, 32, 32, 3) uint8, HWC as PIL wants it
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


def _all_files(spec: CifarSpec) -> list[tuple[str, str]]:
    return spec.files("train") + spec.files("test") + [(spec.meta["filename"], spec.meta["md5"])]


def corrupted_files(root: Path, spec: CifarSpec) -> list[str]:
    """Files of `spec` under `root` that are missing or fail torchvision's MD5."""
    folder = Path(root) / spec.folder
    return [name for name, md5 in _all_files(spec)
            if not (folder / name).is_file() or file_digest(folder / name) != md5]


def ensure_cifar(root: Path, spec: CifarSpec, *, download_missing: bool, verify: bool) -> Path:
    """Make sure the pickles of `spec` are under `root` (downloading if allowed); return their folder."""
    root = Path(root)
    folder = root / spec.folder
    present = all((folder / name).is_file() for name, _ in _all_files(spec))
    if not present:
        if not download_missing:
            raise DatasetNotFoundError(missing_message(spec.name, folder, spec.name, download_enabled=False))
        tv = spec.tv
        archive = root / tv.filename
        try:
            download(tv.url, archive, md5=tv.tgz_md5)
        except DownloadError as e:
            raise DatasetNotFoundError(missing_message(spec.name, folder, spec.name, download_enabled=True,
                                                        reason=str(e))) from e
        extract(archive, root)
    if verify:
        bad = corrupted_files(root, spec)
        if bad:
            raise DatasetNotFoundError(
                f"{spec.name} files under {folder} are incomplete or corrupted (MD5 mismatch: {bad}). Delete the "
                f"folder and run `python -m fisherbench prepare-data {spec.name}`. For hand-made files in the same "
                f"format (tests), set data.verify=false to skip the checksum.")
    return folder


def _fix(spec: CifarSpec) -> str:
    return (f"Delete {spec.folder}/ and run `python -m fisherbench prepare-data {spec.name}` (data.verify=true, the "
            f"default, checks every file's MD5 before reading it).")


def _unpickle(path: Path, spec: CifarSpec) -> dict:
    """One CIFAR pickle, through the plain-data unpickler (never runs code from the file), as a dict."""
    entry = load_plain(path, encoding="latin1", what=f"{spec.name} file", fix=_fix(spec))
    if not isinstance(entry, dict):
        raise DatasetNotFoundError(f"{spec.name} file {path} holds a {type(entry).__name__}, not the dict of the "
                                   f"CIFAR python format. {_fix(spec)}")
    return entry


def _data_entry(path: Path, spec: CifarSpec) -> tuple[np.ndarray, list]:
    """(`data` as uint8 N x 3072, labels) of one data pickle, with the format checked."""
    entry = _unpickle(path, spec)
    missing = [k for k in ("data", spec.label_key) if k not in entry]
    if missing:
        raise DatasetNotFoundError(f"{spec.name} file {path} lacks the key(s) {missing} of the CIFAR python "
                                   f"format (keys: {sorted(map(str, entry))}). {_fix(spec)}")
    data, labels = entry["data"], entry[spec.label_key]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetNotFoundError(f"{spec.name} file {path}: `data` must be a uint8 array of shape (N, 3072) "
                                   f"(32x32x3, channel-major), got a {got}. {_fix(spec)}")
    if not isinstance(labels, (list, tuple, np.ndarray)) or len(labels) != len(data):
        n = len(labels) if hasattr(labels, "__len__") else type(labels).__name__
        raise DatasetNotFoundError(f"{spec.name} file {path}: {n} labels for {len(data)} images. {_fix(spec)}")
    return data, list(labels)


def read_cifar(root: Path, spec: CifarSpec) -> CifarArrays:
    """Read the python-pickle CIFAR format: dicts with `data` (uint8 N x 3072, channel-major) and labels.

    Every pickle goes through `data.safe_pickle.load_plain`: with data.verify=false the files are not
    checksummed, and a pickle can name any callable; a file that is not plain data is refused unread."""
    folder = Path(root) / spec.folder

    def split(name: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for file_name, _ in spec.files(name):
            data, entry_labels = _data_entry(folder / file_name, spec)
            images.append(data)
            labels.extend(entry_labels)
        x = np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x), np.asarray(labels, dtype=np.int64)

    train_x, train_y = split("train")
    test_x, test_y = split("test")
    meta_path = folder / spec.meta["filename"]
    meta = _unpickle(meta_path, spec)
    if spec.meta["key"] not in meta:
        raise DatasetNotFoundError(f"{spec.name} file {meta_path} lacks the key {spec.meta['key']!r} (the class "
                                   f"names). {_fix(spec)}")
    classes = [str(c) for c in meta[spec.meta["key"]]]
    for labels in (train_y, test_y):
        if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise UserError(f"{spec.name}: labels outside [0, {spec.num_classes}) in {folder}")
    return CifarArrays(train_x, train_y, test_x, test_y, classes)


class ArrayImageDataset(Dataset):
    """uint8 HWC images + labels -> (transform(PIL image), label), as torchvision's CIFAR datasets return."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Optional[Callable] = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index])
        return (self.transform(img) if self.transform else img), int(self.labels[index])


def torchvision_transforms(spec: CifarSpec, *, augment: bool, cutout_length: int, crop_padding: int = 4):
    """(train, test) torchvision transforms of the official pipeline."""
    from torchvision import transforms as T  # lazy: torchvision takes ~1.5 s to import; only image datasets use it

    normalize = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    train = [T.RandomCrop(32, padding=crop_padding), T.RandomHorizontalFlip()] if augment else []
    train += normalize
    if cutout_length > 0:
        train.append(Cutout(cutout_length))
    return T.Compose(train), T.Compose(normalize)


@dataclass
class CifarOptions(ClassificationOptions):
    name: str = "cifar10"
    batch_size: int = 256
    download: bool = not_identity(True)  # fetch the files when they are missing
    verify: bool = not_identity(True)  # check torchvision's MD5s of the files (false: hand-made files in the same format)
    augment: bool = True  # RandomCrop(32, padding 4) + horizontal flip on training images
    cutout: bool = True  # Cutout after normalisation (the paper's shipped configs have it on)
    cutout_length: int = 16


@dataclass
class Cifar100Options(CifarOptions):
    name: str = "cifar100"


def _fingerprint(spec: CifarSpec, arrays: CifarArrays) -> str:
    h = hashlib.sha256()
    for a in (arrays.train_images, arrays.train_labels, arrays.test_images, arrays.test_labels):
        h.update(np.ascontiguousarray(a).tobytes())
    return (f"{spec.name}:train={len(arrays.train_labels)}:test={len(arrays.test_labels)}"
            f":sha256={h.hexdigest()[:16]}")


def cifar_content(spec: CifarSpec, opts: CifarOptions) -> str:
    """The run-id content of the CIFAR files (fetched first when missing, as the build would): hand-made
    files under data.verify=false, or other files at data.root, are other data."""
    root = resolve_root(opts.root)
    folder = ensure_cifar(root, spec, download_missing=opts.download, verify=False)  # the build verifies
    return files_content(spec.name, {name: folder / name for name, _ in _all_files(spec)}, beside(root))[0]


def build_cifar(spec: CifarSpec, opts: CifarOptions, ctx: BuildContext) -> DataBundle:
    if opts.cutout and opts.cutout_length < 1:
        raise UserError(f"data.cutout_length must be >= 1 when data.cutout=true, got {opts.cutout_length}")
    root = resolve_root(opts.root)
    ensure_cifar(root, spec, download_missing=opts.download, verify=opts.verify)
    arrays = read_cifar(root, spec)
    fingerprint = _fingerprint(spec, arrays)  # of the files as read (the split is appended below)
    split = hold_out(arrays.train_labels, len(arrays.train_labels), opts.val_fraction, ctx.seed,
                     what=f"the {spec.name} training set")
    # (images, labels) per split; `val` only with data.val_fraction > 0, carved from the training set
    parts = {"train": (arrays.train_images, arrays.train_labels)}
    if split is not None:
        parts = {"train": (arrays.train_images[split.train], arrays.train_labels[split.train]),
                 "val": (arrays.train_images[split.val], arrays.train_labels[split.val])}
        fingerprint += ":" + split.tag
    parts["test"] = (arrays.test_images, arrays.test_labels)
    loader = resolve_loader(opts.loader, ctx.device, resident_supported=True, dataset=spec.name)
    cutout_length = opts.cutout_length if opts.cutout else 0
    eval_bs = opts.eval_batch_size or opts.batch_size  # the official test loader uses the training batch size
    common: dict[str, Any] = dict(rank=ctx.rank, world_size=ctx.world_size)

    if loader == "resident":
        to_chw = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        augment = BatchAugment(spec.mean, spec.std, crop_padding=4 if opts.augment else 0, flip=opts.augment,
                               cutout_length=cutout_length)
        common["device"] = ctx.device

        def source(split_name: str) -> TensorBatchSource:
            images, labels = parts[split_name]
            training = split_name == "train"
            return TensorBatchSource(to_chw(images), torch.from_numpy(np.ascontiguousarray(labels)),
                                     opts.batch_size if training else eval_bs, shuffle=training,
                                     seed=ctx.seed if training else 0, transform=augment, **common)
    else:
        train_tf, test_tf = torchvision_transforms(spec, augment=opts.augment, cutout_length=cutout_length)
        common.update(device=ctx.device, num_workers=opts.num_workers)

        def source(split_name: str) -> TorchLoaderSource:  # type: ignore[misc]
            images, labels = parts[split_name]
            training = split_name == "train"
            return TorchLoaderSource(ArrayImageDataset(images, labels, train_tf if training else test_tf),
                                     opts.batch_size if training else eval_bs, shuffle=training,
                                     seed=ctx.seed if training else 0, **common)
    extras: dict[str, Any] = {"loader": loader, "classes": arrays.classes}
    if split is not None:
        extras["split"] = split.record()
    return DataBundle(
        train=source("train"),
        evals={name: source(name) for name in parts if name != "train"},  # val (if any) before test
        task="classification",
        num_classes=spec.num_classes,
        input_shape=(3, 32, 32),
        num_train=len(parts["train"][1]),
        fingerprint=fingerprint,
        description=f"{spec.name} ({loader} loader, augment={opts.augment}, cutout={cutout_length}"
                    + (f", val = {len(split.val)} training images held out" if split else "") + ")",
        extras=extras,
    )


_CAPS = DataCapabilities(input_kind="image", task="classification", offline=False, downloadable=True)


@DATASETS.register(
    "cifar10",
    schema=CifarOptions,
    capabilities=_CAPS,
    summary="CIFAR-10 (50k/10k, 32x32): paper normalisation, crop+flip, Cutout 16 after normalisation",
    source="https://www.cs.toronto.edu/~kriz/cifar.html (via torchvision)",
)
def build_cifar10(opts: CifarOptions, ctx: BuildContext) -> DataBundle:
    return build_cifar(CIFAR_SPECS["cifar10"], opts, ctx)


@content_function("cifar10")
def cifar10_content(opts: CifarOptions) -> str:
    return cifar_content(CIFAR_SPECS["cifar10"], opts)


@DATASETS.register(
    "cifar100",
    schema=Cifar100Options,
    capabilities=_CAPS,
    summary="CIFAR-100 (50k/10k, 32x32, fine labels): paper normalisation, crop+flip, Cutout 16",
    source="https://www.cs.toronto.edu/~kriz/cifar.html (via torchvision)",
)
def build_cifar100(opts: Cifar100Options, ctx: BuildContext) -> DataBundle:
    return build_cifar(CIFAR_SPECS["cifar100"], opts, ctx)


@content_function("cifar100")
def cifar100_content(opts: Cifar100Options) -> str:
    return cifar_content(CIFAR_SPECS["cifar100"], opts)

"""Tiny ImageNet (200 classes, 64x64; 100k train / 10k val) from the CS231n zip, as the paper used it
(the official `Image_Classification/src/utils/data.py`): RandomResizedCrop(64) + flip + ImageNet normalisation (+ optional Cutout) for training;
Resize(64) + CenterCrop(64) for evaluation on the labelled `val/` split (the official `test/` has no labels).

On disk: `<root>/tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/...}`. The zip ships `val/` as
one `images/` folder plus `val_annotations.txt`; `reorganise_val` moves each image into `val/<wnid>/` once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fisherbench.core.config import not_identity
from fisherbench.data.content import folder_content
from fisherbench.data.download import DatasetNotFoundError, DownloadError, download, extract, missing_message
from fisherbench.data.image_folder import (
    LabelledImageFiles,
    check_counts,
    imagenet_style_transforms,
    labelled_folders_bundle,
    list_images,
)
from fisherbench.data.loaders import resolve_loader
from fisherbench.data.registry import (
    DATASETS,
    BuildContext,
    ClassificationOptions,
    DataBundle,
    DataCapabilities,
    content_function,
    resolve_root,
)

FOLDER = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
ZIP_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"  # 248,100,043 bytes
EXPECTED = {"classes": 200, "train": 100_000, "val": 10_000}
IMAGE_SIZE = 64


def reorganise_val(base: Path) -> int:
    """Move `val/images/<file>` to `val/<wnid>/<file>` using `val/val_annotations.txt`; returns the number
    moved. Idempotent and resumable: files already moved are skipped, and `val/images/` is removed once empty."""
    val = Path(base) / "val"
    images, annotations = val / "images", val / "val_annotations.txt"
    if not images.is_dir():
        return 0
    if not annotations.is_file():
        raise DatasetNotFoundError(f"{annotations} is missing: cannot sort {images} into class folders. "
                                   f"Re-extract {FOLDER}.zip (python -m fisherbench prepare-data tiny_imagenet).")
    moved = 0
    for line in annotations.read_text().splitlines():
        if not line.strip():
            continue
        file_name, wnid = line.split("\t")[:2]
        src, dst = images / file_name, val / wnid / file_name
        if src.is_file():
            dst.parent.mkdir(exist_ok=True)
            src.replace(dst)
            moved += 1
    if not any(images.iterdir()):
        images.rmdir()
    return moved


def ensure_tiny_imagenet(root: Path, *, download_missing: bool) -> Path:
    """Make sure `<root>/tiny-imagenet-200` exists (download + extract if allowed) with `val/` sorted."""
    base = Path(root) / FOLDER
    if not ((base / "wnids.txt").is_file() and (base / "train").is_dir()):
        if not download_missing:
            raise DatasetNotFoundError(missing_message("tiny_imagenet", base, "tiny_imagenet",
                                                       download_enabled=False))
        archive = Path(root) / f"{FOLDER}.zip"
        try:
            download(URL, archive, md5=ZIP_MD5)
        except DownloadError as e:
            raise DatasetNotFoundError(missing_message("tiny_imagenet", base, "tiny_imagenet",
                                                       download_enabled=True, reason=str(e))) from e
        extract(archive, Path(root))
    reorganise_val(base)
    return base


def read_wnids(base: Path) -> list[str]:
    """The class ids in `wnids.txt`, sorted (the order ImageFolder would give the 200 train folders)."""
    return sorted(w.strip() for w in (Path(base) / "wnids.txt").read_text().splitlines() if w.strip())


@dataclass
class TinyImageNetOptions(ClassificationOptions):
    name: str = "tiny_imagenet"
    batch_size: int = 256
    download: bool = not_identity(True)
    verify: bool = not_identity(True)  # check the class and image counts (200 / 100,000 / 10,000)
    cutout: bool = True  # the official trainer's shipped config (`cutout: True`) applies to every dataset
    cutout_length: int = 16


@DATASETS.register(
    "tiny_imagenet",
    schema=TinyImageNetOptions,
    capabilities=DataCapabilities(input_kind="image", task="classification", offline=False, downloadable=True),
    summary="Tiny ImageNet-200 (100k train / 10k val, 64x64): RandomResizedCrop(64)+flip, eval on val",
    source=URL,
)
def build_tiny_imagenet(opts: TinyImageNetOptions, ctx: BuildContext) -> DataBundle:
    resolve_loader(opts.loader, ctx.device, resident_supported=False, dataset="tiny_imagenet")
    base = ensure_tiny_imagenet(resolve_root(opts.root), download_missing=opts.download)
    classes = read_wnids(base)
    train_tf, eval_tf = imagenet_style_transforms(IMAGE_SIZE, IMAGE_SIZE, opts.cutout_length if opts.cutout else 0)
    train_set = LabelledImageFiles(base / "train", classes, train_tf)
    val_set = LabelledImageFiles(base / "val", classes, eval_tf)
    if opts.verify:
        check_counts("tiny_imagenet", {"classes": len(classes), "train": len(train_set), "val": len(val_set)},
                     EXPECTED, base, "Delete it and run `python -m fisherbench prepare-data tiny_imagenet`.")
    if len(train_set) == 0 or len(val_set) == 0:
        raise DatasetNotFoundError(f"tiny_imagenet at {base}: no images in train/ or val/ for the classes in "
                                   f"wnids.txt. Delete it and run `python -m fisherbench prepare-data tiny_imagenet`.")
    return labelled_folders_bundle("tiny_imagenet", train_set, val_set, train_tf, eval_tf, opts, ctx, IMAGE_SIZE,
                                   "Tiny ImageNet-200 (test = labelled val split)")


@content_function("tiny_imagenet")
def tiny_imagenet_content(opts: TinyImageNetOptions) -> str:
    """The run-id content: every train/ and val/ image of the wnids.txt classes, and wnids.txt itself is
    covered by the class folder names (fetched first when missing, as the build would)."""
    base = ensure_tiny_imagenet(resolve_root(opts.root), download_missing=opts.download)
    classes = read_wnids(base)
    paths = [p for split in ("train", "val") for p, _ in list_images(base / split, classes)]
    return folder_content("tiny_imagenet", base, paths)

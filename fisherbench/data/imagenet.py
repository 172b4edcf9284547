"""ImageNet-1k (ILSVRC-2012) from a folder the user provides (it cannot be downloaded automatically):
`<root>/{train,val}/<wnid>/*.JPEG`, or the same under `<root>/imagenet/`. Training: RandomResizedCrop(224) +
flip + ImageNet normalisation; evaluation: Resize(256) + CenterCrop(224) (the official trainer's ImageNet transforms)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fisherbench.core.config import not_identity
from fisherbench.data.content import folder_content
from fisherbench.data.download import DatasetNotFoundError
from fisherbench.data.image_folder import (
    LabelledImageFiles,
    check_counts,
    class_folders,
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

EXPECTED = {"classes": 1000, "train": 1_281_167, "val": 50_000}
HOW_TO_GET = (
    "ImageNet-1k cannot be downloaded automatically (its licence requires an account): download "
    "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org, extract them as "
    "<folder>/train/<wnid>/*.JPEG and <folder>/val/<wnid>/*.JPEG (the validation images sorted into class "
    "folders, e.g. with the widely used valprep.sh), then pass data.root=<folder>."
)


def find_imagenet(root: Path) -> Path:
    """The folder holding `train/` and `val/`: `root` itself or `root/imagenet`."""
    for candidate in (Path(root), Path(root) / "imagenet"):
        if (candidate / "train").is_dir() and (candidate / "val").is_dir():
            return candidate
    raise DatasetNotFoundError(f"imagenet not found: neither {root} nor {Path(root) / 'imagenet'} has train/ and "
                               f"val/ folders. {HOW_TO_GET}")


@dataclass
class ImageNetOptions(ClassificationOptions):
    name: str = "imagenet"
    batch_size: int = 256
    verify: bool = not_identity(True)  # check the class and image counts (1,000 / 1,281,167 / 50,000)
    cutout: bool = False
    cutout_length: int = 16


@DATASETS.register(
    "imagenet",
    schema=ImageNetOptions,
    capabilities=DataCapabilities(input_kind="image", task="classification", offline=False, downloadable=False),
    summary="ImageNet-1k from a user-provided ImageFolder tree: RandomResizedCrop(224)+flip; Resize 256/CenterCrop 224",
    source="https://image-net.org (user-provided)",
)
def build_imagenet(opts: ImageNetOptions, ctx: BuildContext) -> DataBundle:
    resolve_loader(opts.loader, ctx.device, resident_supported=False, dataset="imagenet")
    base = find_imagenet(resolve_root(opts.root))
    classes = class_folders(base / "train")
    train_tf, eval_tf = imagenet_style_transforms(224, 256, opts.cutout_length if opts.cutout else 0)
    train_set = LabelledImageFiles(base / "train", classes, train_tf)
    val_set = LabelledImageFiles(base / "val", classes, eval_tf)
    if opts.verify:
        check_counts("imagenet", {"classes": len(classes), "train": len(train_set), "val": len(val_set)},
                     EXPECTED, base, HOW_TO_GET)
    if len(train_set) == 0 or len(val_set) == 0:
        raise DatasetNotFoundError(f"imagenet at {base}: no images found in train/ or val/. {HOW_TO_GET}")
    return labelled_folders_bundle("imagenet", train_set, val_set, train_tf, eval_tf, opts, ctx, 224,
                                   f"ImageNet-1k from {base} (test = val split)")


@content_function("imagenet")
def imagenet_content(opts: ImageNetOptions) -> str:
    """The run-id content: every train/ and val/ image (hashed once per machine, ~140 GB, with a progress
    bar; afterwards a `stat` per file, and a changed class folder is read again)."""
    base = find_imagenet(resolve_root(opts.root))
    classes = class_folders(base / "train")
    paths = [p for split in ("train", "val") for p, _ in list_images(base / split, classes)]
    return folder_content("imagenet", base, paths)

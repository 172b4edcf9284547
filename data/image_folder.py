"""Image-folder datasets (Tiny ImageNet, ImageNet): files under `<root>/<class>/**`, the ImageNet-style
transforms of the paper's code, and a size check with a clear message."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from torch.utils.data import Dataset

from data.augment import IMAGENET_MEAN, IMAGENET_STD, Cutout
from data.download import DatasetNotFoundError


class LabelledImageFiles(Dataset):
    """ImageFolder with a fixed class list: `root/<class>/**/*.{jpg,png,...}` -> (transform(RGB image), index).

    The class -> index map comes from `classes` (not from the folders found), so a train and an eval split
    agree even when one lacks a class, and stray folders are ignored. Picklable (DataLoader workers).
    """

    def __init__(self, root: Path | str, classes: Sequence[str], transform: Optional[Callable] = None) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

        self.root, self.classes, self.transform = Path(root), list(classes), transform
        self.samples = make_dataset(str(root), {c: i for i, c in enumerate(self.classes)},
                                    extensions=IMG_EXTENSIONS, allow_empty=True)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[index]
        img = default_loader(path)
        return (self.transform(img) if self.transform else img), label


def class_folders(root: Path) -> list[str]:
    """Sorted sub-folder names of `root` (ImageFolder's class order)."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir())


def imagenet_style_transforms(size: int, resize: int, cutout_length: int = 0) -> tuple[Callable, Callable]:
    """(train, eval) transforms of the paper's code with the ImageNet statistics:
    RandomResizedCrop(size) + flip + ToTensor + Normalize (+ Cutout after normalisation), and
    Resize(resize) + CenterCrop(size) + ToTensor + Normalize."""
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalize]
    if cutout_length > 0:
        train.append(Cutout(cutout_length))
    return T.Compose(train), T.Compose([T.Resize(resize), T.CenterCrop(size), *normalize])


def check_counts(name: str, found: dict[str, int], expected: dict[str, int], where: Path, fix: str) -> None:
    """Raise a `DatasetNotFoundError` naming every count that differs from the published size."""
    wrong = {k: (found[k], v) for k, v in expected.items() if found[k] != v}
    if wrong:
        detail = ", ".join(f"{k}: {got} (expected {want})" for k, (got, want) in wrong.items())
        raise DatasetNotFoundError(f"{name} at {where} looks incomplete: {detail}. {fix} "
                                   f"(data.verify=false skips this check, e.g. for a hand-made subset).")

"""Image-folder datasets: files under `<root>/<class>/**`.

* Helpers used by Tiny ImageNet and ImageNet: the labelled file list, the ImageNet-style transforms of the
  paper's code, and a size check with a clear message.
* `data=image_folder`: your own images, no code. `<root>/train/<class>/*` with optional `<root>/val/<class>/*`
  and `<root>/test/<class>/*`, or a flat `<root>/<class>/*` split by fractions; any image size
  (`data.image_size`); normalisation computed from the training images (cached) or given; every file hashed
  into the fingerprint (and the run id) and checked to decode before training starts; files with identical
  content in the training and test splits refused (`data.allow_duplicates`). See docs/datasets.md.

Listing never trusts the tree: symlinked folders are followed once (a loop such as `cat/self -> .` is not
walked again), each file is counted once by its resolved path, and anything but a regular file (a FIFO, a
device such as /dev/zero linked as `x.png`) is skipped without being opened for reading.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fisherbench.core.config import not_identity
from fisherbench.core.errors import UserError
from fisherbench.data.augment import IMAGENET_MEAN, IMAGENET_STD, Cutout
from fisherbench.data.content import (
    MAX_CACHE_BYTES,
    DataWarning,
    file_kind,
    is_sha256,
    open_regular,
    write_json_atomic,
)
from fisherbench.data.download import DatasetNotFoundError
from fisherbench.data.loaders import TorchLoaderSource, cap_workers, resolve_loader
from fisherbench.data.registry import (
    DATASETS,
    BuildContext,
    ClassificationOptions,
    DataBundle,
    DataCapabilities,
    cache_root,
    content_function,
)
from fisherbench.data.splits import check_fraction, hold_out


class LabelledImageFiles(Dataset):
    """ImageFolder with a fixed class list: `root/<class>/**/*.{jpg,png,...}` -> (transform(image), index).

    The class -> index map comes from `classes` (not from the folders found), so a train and an eval split
    agree even when one lacks a class, and stray folders are ignored. Picklable (DataLoader workers).
    `mode` is the PIL mode images are converted to ("RGB", or "L" for one channel).
    """

    def __init__(self, root: Path | str, classes: Sequence[str], transform: Optional[Callable] = None,
                 mode: str = "RGB", samples: Optional[list[tuple[str, int]]] = None) -> None:
        self.root, self.classes, self.transform, self.mode = Path(root), list(classes), transform, mode
        self.samples = list_images(root, self.classes) if samples is None else list(samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def subset(self, indices: Sequence[int], transform: Optional[Callable] = None) -> "LabelledImageFiles":
        """The examples at `indices` (e.g. a validation hold-out), with another transform."""
        return LabelledImageFiles(self.root, self.classes, transform, self.mode,
                                  samples=[self.samples[int(i)] for i in indices])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        try:
            with os.fdopen(open_regular(path), "rb") as f:  # a file swapped for a FIFO since the scan: refused
                img = convert_image(Image.open(f), self.mode)  # converting loads the pixels while the file is open
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError and "image file is truncated" are OSErrors
            raise OSError(f"cannot read image {path}: {e}. Remove or replace the file.") from e
        return (self.transform(img) if self.transform else img), label


# PIL modes of more than 8 bits per sample that `convert("RGB"/"L")` clips (every value above 255 -> 255, so a
# 16-bit grayscale PNG turns solid white); they are rescaled to 8 bits first. 16-bit RGB(A) PNGs open as
# RGB(A) already (PIL keeps the high byte).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def convert_image(img: Image.Image, mode: str) -> Image.Image:
    """`img` in PIL mode `mode` ("RGB" or "L"), 16-bit samples scaled to 8 bits (v * 255 / 65535, rounded).

    32-bit integer images ("I") are read as 16-bit when their values lie in 0..65535 (how PIL opens some
    16-bit files) and refused otherwise, as are floating-point images ("F"): their range has no fixed meaning.
    """
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "I":
        a = np.asarray(img).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"32-bit integer image with values {a.min()}..{a.max()} (outside 0..65535); "
                             "convert it to 8 or 16 bits per channel")
        img = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    elif img.mode == "F":
        raise ValueError("floating-point image (PIL mode F): its range is not defined; convert it to 8 or "
                         "16 bits per channel")
    return img.convert(mode)


@dataclass
class FolderListing:
    """What listing a folder found besides the images: links not followed and entries skipped."""

    samples: list[tuple[str, int]] = field(default_factory=list)
    revisits: list[str] = field(default_factory=list)  # linked folders leading to a folder already listed (loops)
    repeats: list[str] = field(default_factory=list)  # paths of a file already listed (links): counted once
    skipped: list[str] = field(default_factory=list)  # image-named entries that are not regular files

    def warn(self, where: Path | str) -> None:
        """One warning per kind of finding (each file is counted once whatever the tree holds)."""
        if self.revisits:
            warnings.warn(f"image_folder: {len(self.revisits)} linked folder(s) under {where} lead to a folder "
                          f"already listed (a symlink loop such as cat/self -> ., or a second link), not followed "
                          f"again: {_examples(self.revisits)}", DataWarning, stacklevel=3)
        if self.repeats:
            warnings.warn(f"image_folder: {len(self.repeats)} path(s) under {where} reach a file already listed "
                          f"(symlinks); each file is used once: {_examples(self.repeats)}", DataWarning, stacklevel=3)
        if self.skipped:
            warnings.warn(f"image_folder: skipped {len(self.skipped)} entr(y/ies) under {where} that are not "
                          f"regular files (never read): {_examples(self.skipped)}", DataWarning, stacklevel=3)


def _examples(items: Sequence[str], k: int = 3) -> str:
    return "; ".join(items[:k]) + (f"; ... ({len(items) - k} more)" if len(items) > k else "")


def scan_folder(root: Path | str, classes: Sequence[str]) -> FolderListing:
    """The images under `root/<class>/` for each of `classes`, in ImageFolder's order (classes sorted by name,
    sub-folders walked, folders then files sorted), as [(path, class index)] in `.samples`.

    Unlike `os.walk(followlinks=True)`, which walks a symlink loop until the path is too long, every folder is
    entered once (by its resolved path; symlinked folders are followed the first time only), every file is
    counted once (by its resolved path: a link to a file already listed, or a class folder linked into another,
    adds nothing), and only regular files are listed: a FIFO would hang the first read and a device such as
    /dev/zero never ends. A file's type is known from the directory entry, so the listing costs one `stat`
    only per symlink.
    """
    # lazy: torchvision takes ~1.5 s to import; only image datasets use it (one list of extensions, theirs)
    from torchvision.datasets.folder import IMG_EXTENSIONS

    listing = FolderListing()
    index = {c: i for i, c in enumerate(classes)}
    folders_seen: set[str] = set()
    files_seen: set[str] = set()
    for cls in sorted(index):
        top = os.path.join(str(root), cls)
        if not os.path.isdir(top):
            continue
        real_top = os.path.realpath(top)
        if real_top in folders_seen:
            listing.revisits.append(top)
            continue
        folders_seen.add(real_top)
        found: list[tuple[str, list[tuple[str, str]]]] = []  # (folder, [(file name, resolved path)])
        stack = [(top, real_top)]
        while stack:
            folder, real = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                listing.skipped.append(f"{folder} ({exc.strerror or exc})")
                continue
            files, subfolders = [], []
            for e in entries:
                try:
                    link = e.is_symlink()
                    if e.is_dir():  # follows a link
                        sub_real = os.path.realpath(e.path) if link else os.path.join(real, e.name)
                        if sub_real in folders_seen:
                            listing.revisits.append(e.path)
                        else:
                            folders_seen.add(sub_real)
                            subfolders.append((e.path, sub_real))
                        continue
                    if not e.name.lower().endswith(IMG_EXTENSIONS):
                        continue
                    if link:
                        mode = os.stat(e.path).st_mode  # the target's type; a dangling link raises
                        if not stat.S_ISREG(mode):
                            listing.skipped.append(f"{e.path} ({file_kind(mode)})")
                            continue
                        files.append((e.name, os.path.realpath(e.path)))
                    elif e.is_file(follow_symlinks=False):  # the entry's own type: no read, no open
                        files.append((e.name, real + os.sep + e.name))
                    else:
                        listing.skipped.append(f"{e.path} ({file_kind(e.stat(follow_symlinks=False).st_mode)})")
                except OSError as exc:
                    listing.skipped.append(f"{e.path} ({exc.strerror or exc})")
            found.append((folder, files))
            stack.extend(reversed(subfolders))
        for folder, files in sorted(found, key=lambda f: f[0]):  # torchvision: sorted(os.walk(...)), files sorted
            for name, real in files:
                path = folder + os.sep + name
                if real in files_seen:
                    listing.repeats.append(path)
                    continue
                files_seen.add(real)
                listing.samples.append((path, index[cls]))
    return listing


def list_images(root: Path | str, classes: Sequence[str]) -> list[tuple[str, int]]:
    """[(path, class index)] of the images under `root/<class>/` (see `scan_folder`), warning about symlink
    loops, repeated files and skipped entries; missing class folders give nothing."""
    listing = scan_folder(root, classes)
    listing.warn(root)
    return listing.samples


def labelled_folders_bundle(name: str, train_set: "LabelledImageFiles", test_set: "LabelledImageFiles",
                            train_tf: Callable, eval_tf: Callable, opts: Any, ctx: BuildContext,
                            image_size: int, description: str) -> DataBundle:
    """The bundle of a dataset published as labelled train/ and val/ folders (Tiny ImageNet, ImageNet): the
    labelled val/ folder is the test split, as in the paper; `data.val_fraction` holds a validation split out
    of train/ (seeded by the run seed, evaluated with the evaluation transform)."""
    classes = train_set.classes
    fingerprint = f"{name}:classes={len(classes)}:train={len(train_set)}:val={len(test_set)}"
    evals = {"test": test_set}
    split = hold_out(train_set.targets, len(train_set), opts.val_fraction, ctx.seed,
                     what=f"the {name} training set")
    extras: dict[str, Any] = {"loader": "torch", "classes": classes}
    if split is not None:
        evals = {"val": train_set.subset(split.val, eval_tf), **evals}
        train_set = train_set.subset(split.train, train_tf)
        fingerprint += ":" + split.tag
        extras["split"] = split.record()
    common: dict[str, Any] = dict(device=ctx.device, rank=ctx.rank, world_size=ctx.world_size,
                                  num_workers=opts.num_workers)
    eval_bs = opts.eval_batch_size or opts.batch_size
    return DataBundle(
        train=TorchLoaderSource(train_set, opts.batch_size, shuffle=True, seed=ctx.seed, **common),
        evals={k: TorchLoaderSource(v, eval_bs, shuffle=False, **common) for k, v in evals.items()},
        task="classification",
        num_classes=len(classes),
        input_shape=(3, image_size, image_size),
        num_train=len(train_set),
        fingerprint=fingerprint,
        description=description,
        extras=extras,
    )


def class_folders(root: Path) -> list[str]:
    """Sorted sub-folder names of `root` (ImageFolder's class order)."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir())


def imagenet_style_transforms(size: int, resize: int, cutout_length: int = 0) -> tuple[Callable, Callable]:
    """(train, eval) transforms of the paper's code with the ImageNet statistics:
    RandomResizedCrop(size) + flip + ToTensor + Normalize (+ Cutout after normalisation), and
    Resize(resize) + CenterCrop(size) + ToTensor + Normalize."""
    from torchvision import transforms as T  # lazy: torchvision takes ~1.5 s to import; only image datasets use it

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


# ---------------------------------------------------------------------------------------- data=image_folder

LAYOUT_HELP = (
    "Lay the images out as <root>/train/<class>/<image> (with optional <root>/val/<class>/ and "
    "<root>/test/<class>/ folders), or flat as <root>/<class>/<image>; image files end in "
    ".jpg/.jpeg/.png/.ppm/.bmp/.pgm/.tif/.tiff/.webp (see docs/datasets.md)."
)
SPLIT_SEED = 20240522  # a carved test split is fixed (not the run seed): every run is scored on the same images
DEFAULT_TEST_FRACTION = 0.2
MAX_INFERRED_SIZE = 224  # data.image_size=None takes the training images' median shorter side, at most this
AUGMENTS = ("crop", "resized_crop", "none")
CHECKS = ("decode", "header")


@dataclass
class ImageFolderOptions(ClassificationOptions):
    name: str = "image_folder"
    batch_size: int = 64
    num_workers: int = not_identity(4)  # DataLoader workers, capped at the cores this process may use
    # side of the (square) model input; None = the training images' median shorter side, at most 224
    image_size: Optional[int] = None
    channels: int = 3  # 3 = RGB, 1 = grayscale (images are converted on load)
    # training augmentation: crop = resize the shorter side to image_size, random image_size crop with
    # image_size/8 zero padding (CIFAR's recipe at any size); resized_crop = RandomResizedCrop (ImageNet's);
    # none. Evaluation always resizes the shorter side and takes the centre crop.
    augment: str = "crop"
    flip: bool = True  # random horizontal flips in training (turn off for digits, text, ...)
    mean: Optional[list[float]] = None  # per channel, in [0, 1] units; None = computed from the training images
    std: Optional[list[float]] = None
    stats_images: int = 5000  # at most this many training images (evenly spread) estimate mean/std
    # share of the images carved out as the test split when there is no val/ or test/ folder (None = 0.2);
    # fixed across seeds (stratified, its own seed)
    test_fraction: Optional[float] = None
    # decode every image once (cached) | header (faster; bad pixels fail later). Marked not_identity (like
    # cache_dir): neither changes what a run computes once the data is readable
    check_images: str = not_identity("decode")
    # run although test images have the same content as training images (else an error, exit 2); duplicates
    # are reported either way. Not part of the run id: it lets a run start, it changes nothing it computes
    allow_duplicates: bool = not_identity(False)
    cache_dir: Optional[str] = not_identity(None)  # scan/statistics cache; None = $FISHERBENCH_DATA/cache


@dataclass
class ImageScan:
    """Per-file facts of one root: content hash, pixel size and any decoding error, keyed by path relative to
    the root. Cached on disk and refreshed for files whose size or mtime changed."""

    entries: dict[str, dict[str, Any]]

    def fingerprint(self, rel_paths: Sequence[str]) -> str:
        h = hashlib.sha256()
        for rel in sorted(rel_paths):
            h.update(f"{rel}\0{self.entries[rel]['sha256']}\n".encode())
        return h.hexdigest()

    def errors(self, rel_paths: Sequence[str]) -> dict[str, str]:
        return {r: self.entries[r]["error"] for r in rel_paths if self.entries[r]["error"]}


def _check_file(path: str, check: str) -> tuple[str, int, int, Optional[str]]:
    """(sha256, width, height, error or None) of one image file, read once in chunks (never whole: a huge file
    costs no memory) from a descriptor that refuses anything but a regular file."""
    h = hashlib.sha256()
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
            f.seek(0)
            try:
                with Image.open(f) as im:
                    w, hgt = im.size
                    if check == "decode":
                        im.load()  # full decode: truncated or corrupt pixel data fails here, not mid-training
                        if im.mode in (*SIXTEEN_BIT_MODES, "I", "F"):
                            convert_image(im, "L")  # the loader's 16-bit scaling; refused ranges fail here
                    else:
                        im.verify()
                return h.hexdigest(), w, hgt, None
            except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
                return h.hexdigest(), 0, 0, f"{type(e).__name__}: {e}"
    except (OSError, UserError) as e:  # unreadable, or no longer a regular file
        return "", 0, 0, f"{type(e).__name__}: {e}"


def _read_json(path: Path) -> Optional[Any]:
    """A cache file's JSON, or None (unreadable, not JSON, nested too deep, or larger than a cache can be)."""
    try:
        if path.stat().st_size > MAX_CACHE_BYTES:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None


_INT_FIELDS = ("size", "mtime_ns", "ino", "ctime_ns", "w", "h")


def _valid_entry(e: Any) -> bool:
    """A cached scan entry holds exactly what `scan_images` writes (anything else is recomputed, not trusted)."""
    if type(e) is not dict or not all(type(e.get(k)) is int for k in _INT_FIELDS):
        return False
    error = e.get("error")
    return (type(error) is str or (error is None and is_sha256(e.get("sha256")))) and e.get("check") in CHECKS


def relative_paths(root: Path | str, paths: Sequence[str]) -> list[str]:
    """`os.path.relpath(p, root)` of each path, fast for the listing's paths (which are `root` + "/" + names:
    the prefix is cut; relpath itself costs ~30 us a file, most of a cached scan)."""
    base = os.path.abspath(root)
    prefixes = tuple({str(root).rstrip(os.sep) + os.sep, base.rstrip(os.sep) + os.sep})
    out = []
    for p in paths:
        cut = next((len(x) for x in prefixes if p.startswith(x)), 0)
        out.append(p[cut:] if cut and "/./" not in p and "/../" not in p else os.path.relpath(p, base))
    return out


def scan_images(root: Path, paths: Sequence[str], cache_dir: Path, check: str) -> ImageScan:
    """Hash and check every file in `paths` (under `root`), reusing the cached entries of unchanged files.

    A file is unchanged when its (size, mtime_ns, inode, ctime_ns) are those cached: replacing a file (new
    inode), editing it in place (mtime and ctime) or resetting its mtime (`touch -d`, `cp -p`: ctime) all
    make it read again.
    """
    root = Path(os.path.abspath(root))
    cache_file = cache_dir / "image_folder" / f"scan-{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.json"
    cached = _read_json(cache_file)
    old = cached.get("entries", {}) if isinstance(cached, dict) and cached.get("root") == str(root) else {}
    old = old if isinstance(old, dict) else {}
    entries, changed = {}, False
    for path, rel in zip(paths, relative_paths(root, paths)):
        try:
            st = os.stat(path)
        except OSError as exc:  # removed (or made unreadable) since it was listed: reported with the bad files
            entries[rel] = {"size": -1, "mtime_ns": -1, "ino": -1, "ctime_ns": -1, "sha256": "", "w": 0, "h": 0,
                            "error": f"{type(exc).__name__}: {exc.strerror or exc}", "check": check}
            changed = True
            continue
        e = old.get(rel)
        if (type(e) is dict and e.get("size") == st.st_size and e.get("mtime_ns") == st.st_mtime_ns
                and e.get("ino") == st.st_ino and e.get("ctime_ns") == st.st_ctime_ns
                and e.get("check") in (check, "decode") and _valid_entry(e)):
            entries[rel] = e
            continue
        sha, w, h, error = _check_file(path, check)
        entries[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "ctime_ns": st.st_ctime_ns,
                        "sha256": sha, "w": w, "h": h, "error": error, "check": check}
        changed = True
    if changed or set(entries) != set(old):
        write_json_atomic(cache_file, {"root": str(root), "entries": {**old, **entries}})
    return ImageScan(entries)


def _layout(root: Path) -> tuple[str, dict[str, Path]]:
    """("split" | "flat", {split: folder}) of a user's image root."""
    if not root.is_dir():
        raise DatasetNotFoundError(f"image_folder: data.root={root} is not a folder. {LAYOUT_HELP}")
    if (root / "train").is_dir():
        return "split", {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    stray = [s for s in ("val", "test") if (root / s).is_dir()]
    if stray:
        raise DatasetNotFoundError(f"image_folder: {root} has {'/ and '.join(stray)}/ but no train/ folder. "
                                   f"{LAYOUT_HELP}")
    return "flat", {"train": root}


def _classes(folder: Path) -> list[str]:
    """Class folder names (sorted; hidden folders such as .ipynb_checkpoints are not classes)."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_transforms(size: int, augment: str, flip: bool, mean: Sequence[float], std: Sequence[float]
                      ) -> tuple[Callable, Callable]:
    """(train, eval) transforms for square `size` inputs from images of any size and aspect."""
    from torchvision import transforms as T  # lazy: torchvision takes ~1.5 s to import; only image datasets use it

    normalize = [T.ToTensor(), T.Normalize(list(mean), list(std))]
    evaluation = [T.Resize(size), T.CenterCrop(size)]
    if augment == "crop":
        train = [T.Resize(size), T.RandomCrop(size, padding=max(1, size // 8))]
    elif augment == "resized_crop":
        train = [T.RandomResizedCrop(size)]
    else:
        train = list(evaluation)
    if flip:
        train.append(T.RandomHorizontalFlip())
    return T.Compose(train + normalize), T.Compose(evaluation + normalize)


def channel_stats(files: LabelledImageFiles, size: int, max_images: int, num_workers: int
                  ) -> tuple[list[float], list[float], int]:
    """(mean, std, images used) per channel over the pixels of up to `max_images` evenly spread images,
    resized and centre-cropped as for evaluation (so the statistics are those of what the model sees)."""
    from torchvision import transforms as T  # lazy: torchvision takes ~1.5 s to import; only image datasets use it

    n = len(files)
    picks = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(np.int64))
    subset = files.subset(picks, T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()]))
    total = total_sq = None
    pixels = 0
    for x, _ in DataLoader(subset, batch_size=64, num_workers=cap_workers(num_workers)):
        x = x.to(torch.float64)
        s, sq = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
        pixels += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / pixels
    var = (total_sq / pixels - mean * mean).clamp_min(0.0)
    return mean.tolist(), var.sqrt().tolist(), len(picks)


def _normalisation(opts: ImageFolderOptions, train: LabelledImageFiles, size: int, data_key: str,
                   cache_dir: Path) -> tuple[list[float], list[float], dict[str, Any]]:
    """(mean, std, record) from the options, or computed from the training images and cached under a key
    of the data fingerprint (split included) and every option that changes the statistics."""
    if (opts.mean is None) != (opts.std is None):
        raise UserError("image_folder: give both data.mean and data.std, or neither (computed from the data)")
    if opts.mean is not None:
        mean, std = [float(v) for v in opts.mean], [float(v) for v in opts.std]
        if len(mean) != opts.channels or len(std) != opts.channels:
            raise UserError(f"image_folder: data.mean and data.std need {opts.channels} values (one per channel, "
                             f"data.channels={opts.channels}), got {len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise UserError(f"image_folder: data.std values must be > 0, got {std}")
        return mean, std, {"source": "given", "mean": mean, "std": std}
    if opts.stats_images < 1:
        raise UserError(f"image_folder: data.stats_images must be >= 1, got {opts.stats_images}")
    key = hashlib.sha256(f"{data_key}|size={size}|channels={opts.channels}|n={opts.stats_images}".encode())
    cache_file = cache_dir / "image_folder" / f"stats-{key.hexdigest()[:24]}.json"
    cached = _read_json(cache_file)
    if _valid_stats(cached, data_key, opts.channels):
        mean, std, used = cached["mean"], cached["std"], cached["images"]
    else:
        mean, std, used = channel_stats(train, size, opts.stats_images, opts.num_workers)
        write_json_atomic(cache_file, {"key": data_key, "mean": mean, "std": std, "images": used, "size": size})
    if min(std) <= 1e-6:
        raise UserError(f"image_folder: the training images are constant in some channel (std {std}); give "
                         f"data.mean and data.std explicitly")
    return mean, std, {"source": f"computed from {used} training images", "mean": mean, "std": std,
                       "cache": str(cache_file)}


def _valid_stats(cached: Any, data_key: str, channels: int) -> bool:
    """A statistics cache entry as `_normalisation` writes it: finite numbers, one per channel."""
    if not (isinstance(cached, dict) and cached.get("key") == data_key and isinstance(cached.get("images"), int)):
        return False
    values = [cached.get("mean"), cached.get("std")]
    return all(isinstance(v, list) and len(v) == channels
               and all(isinstance(x, (int, float)) and np.isfinite(x) for x in v) for v in values)


def _check_options(opts: ImageFolderOptions) -> None:
    if opts.root is None:
        raise UserError(f"data=image_folder needs data.root=<folder with your images>. {LAYOUT_HELP}")
    if opts.augment not in AUGMENTS:
        raise UserError(f"image_folder: data.augment must be one of {', '.join(AUGMENTS)}, got {opts.augment!r}")
    if opts.check_images not in CHECKS:
        raise UserError(f"image_folder: data.check_images must be decode or header, got {opts.check_images!r}")
    if opts.channels not in (1, 3):
        raise UserError(f"image_folder: data.channels must be 3 (RGB) or 1 (grayscale), got {opts.channels}")
    if opts.image_size is not None and opts.image_size < 1:
        raise UserError(f"image_folder: data.image_size must be >= 1, got {opts.image_size}")


@DATASETS.register(
    "image_folder",
    schema=ImageFolderOptions,
    capabilities=DataCapabilities(input_kind="image", task="classification", offline=False, downloadable=False),
    summary="Your own images: <root>/train/<class>/* (+ val/, test/) or <root>/<class>/*; any size; "
            "normalisation from the data",
    source="user-provided folder",
)
def build_image_folder(opts: ImageFolderOptions, ctx: BuildContext) -> DataBundle:
    _check_options(opts)
    resolve_loader(opts.loader, ctx.device, resident_supported=False, dataset="image_folder")
    found = _find_images(opts)
    root, layout, folders, classes, samples = found.root, found.layout, found.folders, found.classes, found.samples
    cache_dir = cache_root(opts.cache_dir)
    scan = scan_images(root, found.paths, cache_dir, opts.check_images)
    relpath = found.relpaths()
    rel = {split: [relpath[p] for p, _ in s] for split, s in samples.items()}
    bad = scan.errors([r for split in rel.values() for r in split])
    if bad:
        listing = "; ".join(f"{root / r}: {e}" for r, e in list(bad.items())[:10])
        raise DatasetNotFoundError(f"image_folder: {len(bad)} file(s) cannot be read as images: {listing}"
                                   + (" ..." if len(bad) > 10 else "") + ". Remove or replace them.")
    # files per folder, then the content hash; carved splits append their own tags (test=..., val=...)
    fingerprint = (f"image_folder:{layout}:classes={len(classes)}:files="
                   + ",".join(f"{split if layout == 'split' else 'all'}/{len(s)}" for split, s in samples.items())
                   + f":sha256={scan.fingerprint([r for split in rel.values() for r in split])[:16]}")

    # the splits: folders first; a test split carved from train (fixed seed) when there is no held-out folder;
    # then the validation hold-out (run seed) from what is left for training
    check_fraction(opts.val_fraction)
    held_out_folders = [s for s in ("val", "test") if s in folders]
    if opts.test_fraction is not None and held_out_folders:
        raise UserError(f"image_folder: data.test_fraction carves a test split only when there is no val/ or test/ "
                         f"folder, but {root} has {'/ and '.join(held_out_folders)}/; drop data.test_fraction")
    if opts.val_fraction > 0 and set(held_out_folders) == {"val", "test"}:
        raise UserError(f"image_folder: {root} has val/ and test/ folders; data.val_fraction would carve a second "
                         f"validation split from train/. Use val/ (val_fraction=0) or remove val/.")
    train_files = LabelledImageFiles(folders["train"], classes, samples=samples["train"],
                                     mode="RGB" if opts.channels == 3 else "L")
    evals_files: dict[str, LabelledImageFiles] = {}
    roles: dict[str, str] = {}
    if "val" in folders and "test" in folders:
        evals_files = {"val": _files(folders["val"], classes, samples["val"], opts),
                       "test": _files(folders["test"], classes, samples["test"], opts)}
        roles = {"val": "val/ folder", "test": "test/ folder"}
    elif held_out_folders:
        # one held-out folder: it is the test split (ImageNet's val/ is its test set in the literature);
        # data.val_fraction gives a validation split from train/
        only = held_out_folders[0]
        evals_files = {"test": _files(folders[only], classes, samples[only], opts)}
        roles = {"test": f"{only}/ folder"}
    else:
        fraction = DEFAULT_TEST_FRACTION if opts.test_fraction is None else check_fraction(
            opts.test_fraction, "data.test_fraction")
        carved = hold_out(train_files.targets, len(train_files), fraction, SPLIT_SEED, what=str(folders["train"]),
                          option="data.test_fraction", name="test")
        if carved is None:
            raise UserError("image_folder: with no val/ or test/ folder, data.test_fraction must be > 0 "
                             "(a run needs a test split)")
        evals_files["test"] = train_files.subset(carved.val)
        train_files = train_files.subset(carved.train)
        fingerprint += ":" + carved.tag
        roles = {"test": f"{carved.fraction:g} of {folders['train'].name}/ (fixed split)"}
    split = hold_out(train_files.targets, len(train_files), opts.val_fraction, ctx.seed,
                     what=f"the training images of {root}")
    if split is not None:
        evals_files = {"val": train_files.subset(split.val), **evals_files}
        train_files = train_files.subset(split.train)
        fingerprint += ":" + split.tag
        roles["val"] = f"{split.fraction:g} of the training images (seed {split.seed})"

    duplicates = _check_duplicates({"train": train_files, **evals_files}, relpath, scan, opts.allow_duplicates)
    size = opts.image_size or _inferred_size(scan, rel["train"])
    mean, std, norm = _normalisation(opts, train_files, size, fingerprint, cache_dir)
    train_tf, eval_tf = folder_transforms(size, opts.augment, opts.flip, mean, std)
    train_files.transform = train_tf
    for files in evals_files.values():
        files.transform = eval_tf
    eval_bs = opts.eval_batch_size or opts.batch_size
    common: dict[str, Any] = dict(device=ctx.device, rank=ctx.rank, world_size=ctx.world_size,
                                  num_workers=opts.num_workers)
    train = TorchLoaderSource(train_files, opts.batch_size, shuffle=True, seed=ctx.seed, **common)
    extras: dict[str, Any] = {"loader": "torch", "classes": classes, "layout": layout, "image_size": size,
                              "normalization": norm, "splits": roles, "num_workers": train.num_workers,
                              "root": str(root), "duplicates": duplicates}
    if split is not None:
        extras["split"] = split.record()
    return DataBundle(
        train=train,
        evals={name: TorchLoaderSource(files, eval_bs, shuffle=False, **common)
               for name, files in sorted(evals_files.items(), key=lambda kv: kv[0] != "val")},
        task="classification",
        num_classes=len(classes),
        input_shape=(opts.channels, size, size),
        num_train=len(train_files),
        fingerprint=fingerprint,
        description=(f"image folder {root} ({layout} layout, {len(classes)} classes, {size}x{size}, "
                     + ", ".join(f"{k} = {v}" for k, v in roles.items()) + ")"),
        extras=extras,
    )


@dataclass
class _Found:
    """The images of a user's root: layout, split folders, classes and [(path, class index)] per split."""

    root: Path
    layout: str
    folders: dict[str, Path]
    classes: list[str]
    samples: dict[str, list[tuple[str, int]]]

    @property
    def paths(self) -> list[str]:
        return [p for split in self.samples.values() for p, _ in split]

    def relpaths(self) -> dict[str, str]:
        """path -> path relative to the root (the name a file has in the scan cache and the fingerprint)."""
        return dict(zip(self.paths, relative_paths(self.root, self.paths)))


def _find_images(opts: ImageFolderOptions) -> _Found:
    """List a user's images (with the layout checks and their messages); shared by the build and the run id."""
    root = Path(opts.root).expanduser()
    layout, folders = _layout(root)
    classes = _classes(folders["train"])
    if len(classes) < 2:
        found = f"only the class folder {classes[0]!r}" if classes else "no class folders"
        raise DatasetNotFoundError(f"image_folder: {folders['train']} has {found}; classification needs at least "
                                   f"2 classes, one sub-folder each. {LAYOUT_HELP}")
    samples = {split: list_images(folder, classes) for split, folder in folders.items()}
    counts = np.bincount([label for _, label in samples["train"]], minlength=len(classes))
    empty = [c for c, k in zip(classes, counts) if k == 0]
    if empty:
        raise DatasetNotFoundError(f"image_folder: no image files in the class folder(s) {empty[:10]} of "
                                   f"{folders['train']}" + (f" (and {len(empty) - 10} more)" if len(empty) > 10 else "")
                                   + f". {LAYOUT_HELP}")
    for split in ("val", "test"):
        if split in folders:
            extra = sorted(set(_classes(folders[split])) - set(classes))
            if extra:
                raise DatasetNotFoundError(f"image_folder: {folders[split]} has class folders that train/ lacks: "
                                           f"{extra[:10]}. Every evaluation class needs training images.")
            if not samples[split]:
                raise DatasetNotFoundError(f"image_folder: no image files under {folders[split]}. {LAYOUT_HELP}")
    return _Found(root, layout, folders, classes, samples)


@content_function("image_folder")
def image_folder_content(opts: ImageFolderOptions) -> str:
    """The run-id content of a user's image folder: every listed file's path (relative to data.root) and
    SHA-256, from the scan the build reuses (so the files are read once, then only `stat`ed)."""
    _check_options(opts)
    found = _find_images(opts)
    scan = scan_images(found.root, found.paths, cache_root(opts.cache_dir), opts.check_images)
    return f"image_folder:sha256={scan.fingerprint(list(found.relpaths().values()))}"


def _check_duplicates(splits: dict[str, "LabelledImageFiles"], relpath: dict[str, str], scan: ImageScan,
                      allow: bool) -> dict[str, int]:
    """Report files with identical content: within a split (a warning with the count) and across splits.

    A test image identical to a training image makes the test score partly a memorisation score: that is an
    error (exit 2) unless `data.allow_duplicates=true`, when it is a warning. Other overlaps (val with
    train or test) are warnings. Returns the counts, recorded with the data facts.
    """
    shas: dict[str, dict[str, str]] = {}  # split -> sha -> first file
    counts: dict[str, int] = {}
    for split, files in splits.items():
        first: dict[str, str] = {}
        repeated: list[str] = []
        for path, _ in files.samples:
            r = relpath[path]
            sha = scan.entries[r]["sha256"]
            if sha in first:
                repeated.append(f"{r} = {first[sha]}")
            else:
                first[sha] = r
        shas[split] = first
        if repeated:
            counts[split] = len(repeated)
            warnings.warn(f"image_folder: {len(repeated)} file(s) of the {split} split have the same content as "
                          f"another file of that split (each counts as an example): {_examples(repeated)}",
                          DataWarning, stacklevel=3)
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = [f"{shas[b][sha]} = {shas[a][sha]}" for sha in shas[b] if sha in shas[a]]
            if not common:
                continue
            counts[f"{a}/{b}"] = len(common)
            what = (f"{len(common)} {b} image(s) have the same content as {a} images: "
                    f"{_examples(common)}")
            if {a, b} == {"train", "test"} and not allow:
                raise UserError(f"image_folder: {what}. The test score would partly measure memorised training "
                                 "images. Remove the duplicates (e.g. symlinks between the splits), or set "
                                 "data.allow_duplicates=true to run anyway (the overlap is then a warning).")
            warnings.warn(f"image_folder: {what}", DataWarning, stacklevel=3)
    return counts


def _files(folder: Path, classes: list[str], samples: list[tuple[str, int]], opts: ImageFolderOptions
           ) -> LabelledImageFiles:
    return LabelledImageFiles(folder, classes, samples=samples, mode="RGB" if opts.channels == 3 else "L")


def _inferred_size(scan: ImageScan, rel_paths: Sequence[str]) -> int:
    """The training images' median shorter side, at most MAX_INFERRED_SIZE."""
    sides = [min(scan.entries[r]["w"], scan.entries[r]["h"]) for r in rel_paths]
    return int(min(MAX_INFERRED_SIZE, max(1, int(np.median(sides)))))

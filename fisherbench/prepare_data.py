#!/usr/bin/env python
"""Download, unpack and verify the datasets fisherbench can fetch; print their files, sizes and checksums.

    python -m fisherbench prepare-data                      # everything downloadable, into $FISHERBENCH_DATA
    python -m fisherbench prepare-data cifar10 wikitext2 --root /data/fisherbench
    python -m fisherbench prepare-data --check              # verify what is there, download nothing
    python -m fisherbench prepare-data imagenet --root /data/imagenet   # ImageNet: check a folder you provide

Targets: cifar10, cifar100 (torchvision archives, MD5-checked), tiny_imagenet (CS231n zip, MD5-checked,
`val/` sorted into class folders once), wikitext2 (HF `datasets` copy written as wiki.*.raw, tokenised with
GPT-1's BPE and cached), gpt1_tokenizer (openai-gpt vocab.json + merges.txt), imagenet (not downloadable:
checks the folder and prints how to obtain it). On a machine without network, run it elsewhere and copy
the printed folders to the same layout under `data.root`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from fisherbench.data import cifar, imagenet, tiny_imagenet, wikitext
from fisherbench.data.download import DatasetNotFoundError, describe_files, file_digest, human_size
from fisherbench.data.image_folder import LabelledImageFiles, check_counts, class_folders
from fisherbench.data.registry import default_root


def prepare_cifar(name: str) -> Callable[[argparse.Namespace], list[str]]:
    spec = cifar.CIFAR_SPECS[name]

    def run(args: argparse.Namespace) -> list[str]:
        folder = cifar.ensure_cifar(args.root, spec, download_missing=not args.check, verify=not args.no_verify)
        arrays = cifar.read_cifar(args.root, spec)
        files = [folder / f for f, _ in spec.files("train") + spec.files("test")] + [folder / spec.meta["filename"]]
        verified = "MD5s match torchvision's" if not args.no_verify else "MD5s not checked (--no-verify)"
        return [f"{folder}: {len(arrays.train_labels)} train / {len(arrays.test_labels)} test images, "
                f"{len(arrays.classes)} classes; {verified}", *describe_files(files)]

    return run


def prepare_tiny_imagenet(args: argparse.Namespace) -> list[str]:
    base = tiny_imagenet.ensure_tiny_imagenet(args.root, download_missing=not args.check)
    classes = tiny_imagenet.read_wnids(base)
    counts = {"classes": len(classes), "train": len(LabelledImageFiles(base / "train", classes)),
              "val": len(LabelledImageFiles(base / "val", classes))}
    if not args.no_verify:
        check_counts("tiny_imagenet", counts, tiny_imagenet.EXPECTED, base,
                     "Delete it and run this script again.")
    lines = [f"{base}: {counts['classes']} classes, {counts['train']} train / {counts['val']} val images "
             f"(val/ sorted into class folders)"]
    archive = Path(args.root) / f"{tiny_imagenet.FOLDER}.zip"
    if archive.is_file():
        lines += describe_files([archive])
    return lines


def prepare_tokenizer(args: argparse.Namespace) -> list[str]:
    folder = wikitext.ensure_tokenizer(wikitext.tokenizer_dir(args.tokenizer_dir, args.root),
                                       download_missing=not args.check)
    size = wikitext.gpt1_tokenizer(folder).get_vocab_size()
    if size != wikitext.GPT1_VOCAB_SIZE and not args.no_verify:
        raise DatasetNotFoundError(f"the tokenizer in {folder} has {size} tokens, GPT-1's has "
                                   f"{wikitext.GPT1_VOCAB_SIZE}: delete vocab.json / merges.txt and run again.")
    return [f"{folder}: GPT-1 BPE, vocabulary {size}",
            *describe_files([folder / name for name in wikitext.GPT1_FILES], "sha256")]


def prepare_wikitext2(args: argparse.Namespace) -> list[str]:
    files = wikitext.ensure_text(args.root, args.variant, download_missing=not args.check)
    lines = prepare_tokenizer(args)
    folder = wikitext.tokenizer_dir(args.tokenizer_dir, args.root)
    tokenizer = wikitext.gpt1_tokenizer(folder)
    for split, path in files.items():
        ids = wikitext.tokenize_split(path, folder, tokenizer, cache=True)
        seq_len = wikitext.WikiText2Options.seq_len
        windows = len(wikitext.make_windows(ids, seq_len)[0])
        lines.append(f"{path}  {human_size(path.stat().st_size)}  sha256:{file_digest(path, 'sha256')}  "
                     f"{split}: {len(ids):,} GPT-1 tokens = {windows:,} windows of {seq_len} (cached)")
    return lines


def check_imagenet(args: argparse.Namespace) -> list[str]:
    base = imagenet.find_imagenet(Path(args.imagenet_root or args.root))
    classes = class_folders(base / "train")
    counts = {"classes": len(classes), "train": len(LabelledImageFiles(base / "train", classes)),
              "val": len(LabelledImageFiles(base / "val", classes))}
    if not args.no_verify:
        check_counts("imagenet", counts, imagenet.EXPECTED, base, imagenet.HOW_TO_GET)
    return [f"{base}: {counts['classes']} classes, {counts['train']} train / {counts['val']} val images "
            f"(use data.root={base})"]


TARGETS: dict[str, Callable[[argparse.Namespace], list[str]]] = {
    "cifar10": prepare_cifar("cifar10"),
    "cifar100": prepare_cifar("cifar100"),
    "tiny_imagenet": prepare_tiny_imagenet,
    "gpt1_tokenizer": prepare_tokenizer,
    "wikitext2": prepare_wikitext2,
    "imagenet": check_imagenet,
}
DOWNLOADABLE = ["cifar10", "cifar100", "tiny_imagenet", "wikitext2"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("targets", nargs="*", metavar="target",
                   help=f"any of {', '.join(TARGETS)}, or all (= {', '.join(DOWNLOADABLE)}; the default)")
    p.add_argument("--root", type=Path, default=None,
                   help="data root (default: $FISHERBENCH_DATA or ~/.cache/fisherbench/data); the runs' data.root")
    p.add_argument("--check", action="store_true", help="verify what is present; download nothing")
    p.add_argument("--no-verify", action="store_true", help="skip checksum / size checks (hand-made subsets)")
    p.add_argument("--variant", default="raw", choices=sorted(wikitext.VARIANTS), help="WikiText-2 variant")
    p.add_argument("--tokenizer-dir", default=None, help="folder for GPT-1's vocab.json + merges.txt")
    p.add_argument("--imagenet-root", default=None, help="ImageNet folder (default: --root)")
    args = p.parse_args(argv)
    unknown = [t for t in args.targets if t not in TARGETS and t != "all"]
    if unknown:  # checked here: argparse rejects an empty list when nargs="*" has choices
        p.error(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}, all")
    args.root = Path(args.root).expanduser() if args.root else default_root()
    if not args.targets or "all" in args.targets:
        args.targets = DOWNLOADABLE + [t for t in args.targets if t not in DOWNLOADABLE and t != "all"]
    args.targets = list(dict.fromkeys(args.targets))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"data root: {args.root}")
    failed = []
    start = time.perf_counter()
    for i, target in enumerate(args.targets):
        # which target, and how long the ones before took (downloads show their own progress bar)
        print(f"\n== {target} ({i + 1}/{len(args.targets)}, {time.perf_counter() - start:.0f} s so far)", flush=True)
        try:
            for line in TARGETS[target](args):
                print(f"  {line}")
            print("  OK")
        except DatasetNotFoundError as e:
            failed.append(target)
            print(f"  FAILED: {e}")
    if failed:
        print(f"\n{len(failed)} of {len(args.targets)} failed: {', '.join(failed)}")
        return 1
    print("\nall OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

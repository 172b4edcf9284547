#!/usr/bin/env python
"""What a `data=image_folder` run pays before training for listing, hashing and checking its files.

Writes N small PNGs (flat layout, 10 classes) and times, in one process, with the arms interleaved over
--repeats rounds (report the spread: the machine may be shared):

* `listing`: torchvision's `make_dataset` over the class folders (no checks, no hashing): the baseline;
* `cold`: the run-id content fingerprint + the build with an empty cache (every file read, hashed, decoded);
* `warm`: the same with the cache filled (what every later launch pays: a listing and a `stat` per file,
  twice: once for the run id before the skip/resume decision, once in the build).

    PYTHONPATH=. python scripts/bench_image_folder_scan.py --files 10000 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fisherbench.data.registry import build_data, data_content


def make_tree(root: Path, n: int, classes: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", type=int, default=16, help="image side in pixels")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset  # imported before timing (~1.5 s)

    work = Path(tempfile.mkdtemp(prefix="bench-image-folder-"))
    root = work / "images"
    make_tree(root, args.files, args.classes, args.size)
    classes = {f"c{i}": i for i in range(args.classes)}
    times: dict[str, list[float]] = {"listing": [], "cold": [], "warm": []}
    for r in range(args.repeats):
        cache = work / f"cache{r}"
        opts = {"name": "image_folder", "root": str(root), "cache_dir": str(cache), "num_workers": 0,
                "mean": [0.5] * 3, "std": [0.25] * 3}
        t = time.perf_counter()
        make_dataset(str(root), classes, extensions=IMG_EXTENSIONS)
        times["listing"].append(time.perf_counter() - t)
        for arm in ("cold", "warm"):
            t = time.perf_counter()
            data_content(opts)
            build_data(opts)
            times[arm].append(time.perf_counter() - t)
    print(f"{args.files} PNGs of {args.size}x{args.size} px, {args.classes} classes; {args.repeats} rounds")
    for arm, ts in times.items():
        spread = statistics.stdev(ts) if len(ts) > 1 else 0.0
        print(f"{arm:8s} median {statistics.median(ts):7.3f} s  (sd {spread:.3f}; {' '.join(f'{t:.3f}' for t in ts)})")
    base = statistics.median(times["listing"])
    print(f"over the listing baseline: cold {statistics.median(times['cold']) - base:+.3f} s, "
          f"warm {statistics.median(times['warm']) - base:+.3f} s")


if __name__ == "__main__":
    main()

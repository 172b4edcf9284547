#!/usr/bin/env python
"""Time one CIFAR training epoch of data loading with each loader (no model): the `torch` loader
(torchvision per-image transforms in a DataLoader) and the `resident` loader (uint8 set on the device,
batched crop/flip/Cutout). Uses the real CIFAR-10 files when present under --root, else random images.

    python scripts/bench_data_loaders.py --device cpu --num-images 10000 --workers 0 2
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fisherbench.core.eta import Eta
from fisherbench.data import cifar
from fisherbench.data.augment import BatchAugment
from fisherbench.data.loaders import TensorBatchSource, TorchLoaderSource
from fisherbench.data.registry import default_root


def epoch_seconds(source, device: torch.device, epoch: int) -> tuple[float, int]:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    start, n = time.perf_counter(), 0
    for x, _ in source.iterate(epoch):
        n += len(x)
    sync()
    return time.perf_counter() - start, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=default_root())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-images", type=int, default=50_000, help="random images when CIFAR-10 is absent")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 4], help="DataLoader workers to try")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per loader (the first is a warm-up)")
    args = p.parse_args()
    device = torch.device(args.device)
    spec = cifar.CIFAR_SPECS["cifar10"]
    try:
        images, labels = (lambda a: (a.train_images, a.train_labels))(cifar.read_cifar(args.root, spec))
        source = f"CIFAR-10 from {args.root}"
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.num_images, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, args.num_images)
        source = "random images (CIFAR-10 not found)"
    print(f"{len(images)} {source}; batch {args.batch_size}; device {device}; torch threads {torch.get_num_threads()}")

    train_tf, _ = cifar.torchvision_transforms(spec, augment=True, cutout_length=16)
    loaders = {f"torch (workers={w})": TorchLoaderSource(cifar.ArrayImageDataset(images, labels, train_tf),
                                                         args.batch_size, shuffle=True, num_workers=w, device=device)
               for w in args.workers}
    chw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    loaders["resident"] = TensorBatchSource(chw, torch.from_numpy(labels), args.batch_size, shuffle=True,
                                            transform=BatchAugment(spec.mean, spec.std, cutout_length=16),
                                            device=device)
    eta = Eta("bench_data_loaders", len(loaders) * args.epochs, unit="epochs", every=0.0)
    for name, src in loaders.items():
        times = []
        for e in range(args.epochs):
            times.append(epoch_seconds(src, device, e))
            eta.step(f"{name}, epoch {e + 1}/{args.epochs} took {times[-1][0]:.1f} s")
        best = min(t for t, _ in times[1:] or times)
        print(f"{name:22s} {best:8.3f} s/epoch  {times[0][1] / best:10.0f} images/s")


if __name__ == "__main__":
    main()

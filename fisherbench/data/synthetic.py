"""Synthetic stand-ins of any image or token shape: learnable (labels depend on the inputs), tiny, offline.

Used by tests and by `python train.py model=<any> data=synthetic_*` smoke runs; never reported as results.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from fisherbench.data.loaders import TensorBatchSource
from fisherbench.data.registry import DATASETS, BuildContext, DataBundle, DataCapabilities, DataOptions

DATA_SEED = 1234  # the data itself is fixed; the run seed only changes order/augmentation


@dataclass
class SyntheticImageOptions(DataOptions):
    name: str = "synthetic_image"
    batch_size: int = 16
    shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    num_classes: int = 10
    num_train: int = 256
    num_test: int = 64
    noise: float = 1.0
    # training images for throughput work, e.g. 50000 for a set the size of CIFAR-10's training split
    # (`data=synthetic_cifar data.num_images=50000`); null = num_train. Set, it replaces num_train.
    num_images: Optional[int] = None


@DATASETS.register(
    "synthetic_image",
    schema=SyntheticImageOptions,
    capabilities=DataCapabilities(input_kind="image", task="classification", offline=True),
    summary="Gaussian images of any shape; each class has its own mean pattern (learnable). For tests.",
    source="fisherbench",
)
def build_synthetic_image(opts: SyntheticImageOptions, ctx: BuildContext) -> DataBundle:
    num_train = opts.num_images if opts.num_images is not None else opts.num_train
    if opts.num_classes < 2 or num_train < 1 or opts.num_test < 1:
        raise ValueError("synthetic_image needs num_classes >= 2 and num_train (or num_images), num_test >= 1")
    g = torch.Generator().manual_seed(DATA_SEED)
    shape = tuple(int(s) for s in opts.shape)
    n = num_train + opts.num_test
    labels = torch.randint(0, opts.num_classes, (n,), generator=g)
    # prototypes only for the classes that occur, each from its own seed: memory O(n), not O(classes)
    # (1,000 full-size 224x224 prototypes would take 600 MB)
    used = labels.unique()
    prototypes = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(DATA_SEED + 1 + int(c)))
                              for c in used])
    images = prototypes[torch.searchsorted(used, labels)] + opts.noise * torch.randn((n, *shape), generator=g)
    device = ctx.device if opts.loader in ("auto", "resident") else torch.device("cpu")
    common = dict(device=device, rank=ctx.rank, world_size=ctx.world_size)
    tr, te = slice(0, num_train), slice(num_train, n)
    return DataBundle(
        train=TensorBatchSource(images[tr], labels[tr], opts.batch_size, shuffle=True, seed=ctx.seed, **common),
        evals={"test": TensorBatchSource(images[te], labels[te], opts.eval_batch_size or opts.batch_size,
                                         shuffle=False, **common)},
        task="classification",
        num_classes=opts.num_classes,
        input_shape=shape,
        num_train=num_train,
        fingerprint=f"synthetic_image:{list(shape)}:c={opts.num_classes}:n={num_train}/{opts.num_test}",
        description="synthetic images",
    )


@dataclass
class SyntheticTokensOptions(DataOptions):
    name: str = "synthetic_tokens"
    batch_size: int = 4
    seq_len: int = 32
    vocab_size: int = 64
    num_train: int = 64  # windows
    num_test: int = 16


@DATASETS.register(
    "synthetic_tokens",
    schema=SyntheticTokensOptions,
    capabilities=DataCapabilities(input_kind="tokens", task="language_model", offline=True),
    summary="Token windows from a fixed random bigram chain (learnable); targets are inputs shifted by one",
    source="fisherbench",
)
def build_synthetic_tokens(opts: SyntheticTokensOptions, ctx: BuildContext) -> DataBundle:
    if opts.vocab_size < 2 or opts.seq_len < 2:
        raise ValueError("synthetic_tokens needs vocab_size >= 2 and seq_len >= 2")
    g = torch.Generator().manual_seed(DATA_SEED)
    # sparse bigram chain: each token has 4 successors with fixed probabilities (a table of V x 4, not a dense
    # V x V matrix, so GPT-1's 40,478-token vocabulary fits)
    successors = torch.randint(0, opts.vocab_size, (opts.vocab_size, 4), generator=g)
    successor_probs = torch.tensor([0.55, 0.25, 0.15, 0.05])
    n = opts.num_train + opts.num_test
    windows = torch.empty(n, opts.seq_len + 1, dtype=torch.long)
    windows[:, 0] = torch.randint(0, opts.vocab_size, (n,), generator=g)
    for t in range(1, opts.seq_len + 1):
        choice = torch.multinomial(successor_probs.expand(n, 4), 1, generator=g).squeeze(1)
        windows[:, t] = successors[windows[:, t - 1], choice]
    inputs, targets = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    device = ctx.device if opts.loader in ("auto", "resident") else torch.device("cpu")
    common = dict(device=device, rank=ctx.rank, world_size=ctx.world_size)
    tr, te = slice(0, opts.num_train), slice(opts.num_train, n)
    eval_bs = opts.eval_batch_size or opts.batch_size
    return DataBundle(
        train=TensorBatchSource(inputs[tr], targets[tr], opts.batch_size, shuffle=True, seed=ctx.seed, **common),
        evals={
            "val": TensorBatchSource(inputs[te], targets[te], eval_bs, shuffle=False, **common),
            "test": TensorBatchSource(inputs[te], targets[te], eval_bs, shuffle=False, **common),
        },
        task="language_model",
        num_classes=opts.vocab_size,
        input_shape=(opts.seq_len,),
        num_train=opts.num_train,
        fingerprint=f"synthetic_tokens:T={opts.seq_len}:V={opts.vocab_size}:n={opts.num_train}/{opts.num_test}",
        description="synthetic bigram token windows",
    )

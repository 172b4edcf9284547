"""Held-out validation splits carved from a training set (`data.val_fraction`).

The paper reports the maximum *test* accuracy over evaluations, so tuning on it tunes on the test set. With
`val_fraction > 0` every classification dataset moves a stratified, seeded share of its *training* examples
into an evaluation split named `val` (the training set shrinks by exactly those examples, so nothing is
both trained on and validated on); the test split is untouched. `val_fraction = 0` (the default) keeps the
paper's protocol bit for bit.

The split depends only on (the run seed, the labels, the fraction): the same seed gives the same split on
every machine and on resume; another seed gives another split (so the seed spread includes the split).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from fisherbench.core.errors import UserError
from fisherbench.data.loaders import mix_seed

VAL_SALT = 0x7661_6C69  # "vali": keeps the split's RNG stream apart from the run's order/augmentation streams


@dataclass(frozen=True)
class HoldOut:
    """The result of a split: indices into the original training set, both sorted."""

    train: np.ndarray
    val: np.ndarray
    fraction: float
    seed: int
    name: str = "val"  # the split the held-out part becomes

    @property
    def tag(self) -> str:
        """`val=<fraction>@seed<seed>:<n_train>/<n_val>:<hash of the val indices>` for fingerprints."""
        digest = hashlib.sha256(np.ascontiguousarray(self.val, dtype=np.int64).tobytes()).hexdigest()[:12]
        return f"{self.name}={self.fraction:g}@seed{self.seed}:{len(self.train)}/{len(self.val)}:{digest}"

    def record(self) -> dict:
        """What meta.json should say about the split (bundle.extras["split"])."""
        return {"val_fraction": self.fraction, "seed": self.seed, "num_train": int(len(self.train)),
                "num_val": int(len(self.val)), "val_indices_sha256": self.tag.rsplit(":", 1)[-1]}


def check_fraction(value: float, option: str = "data.val_fraction") -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise UserError(f"{option} must be in [0, 1) (the share of the training set held out), got {value:g}")
    return value


def hold_out(labels: Optional[Sequence[int] | np.ndarray], n: int, fraction: float, seed: int,
             what: str = "the training set", option: str = "data.val_fraction", name: str = "val",
             ) -> Optional[HoldOut]:
    """Split `range(n)` into (train, val) with `round(n_c * fraction)` validation examples per class `c`
    (stratified; `labels=None`: one group). Returns None for `fraction == 0`.

    Raises ValueError when the fraction leaves no validation example or no training example.
    """
    fraction = check_fraction(fraction, option)
    if fraction == 0.0:
        return None
    y = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    if len(y) != n:
        raise ValueError(f"labels ({len(y)}) and examples ({n}) differ in length")
    rng = np.random.default_rng(mix_seed(seed, VAL_SALT))
    train_parts, val_parts = [], []
    for c in np.unique(y):  # sorted classes, each permuted by the same generator in turn: deterministic
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * fraction))
        val_parts.append(idx[:k])
        train_parts.append(idx[k:])
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, dtype=np.int64)
    train = np.sort(np.concatenate(train_parts)) if train_parts else np.zeros(0, dtype=np.int64)
    if len(val) == 0:
        largest = int(np.bincount(y - y.min()).max()) if n else 0
        raise UserError(f"{option}={fraction:g} of {what} ({n} examples, at most {largest} per class) "
                         f"holds out no example: rounding per class gives 0. Use {option} >= "
                         f"{0.5 / max(largest, 1):.2g}")
    if len(train) == 0:
        raise UserError(f"{option}={fraction:g} leaves no training example of {what} ({n} examples)")
    return HoldOut(train, val, fraction, int(seed), name)

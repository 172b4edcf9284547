"""Plug-in datasets: a factory from the user's code returns the suite's `DataBundle` (docs/own-optimizer.md).

The factory is called like a built-in builder, `factory(options, context)`: `options` is the typed options
object (the base data options such as `batch_size`, plus the YAML's own keys), `context` the `BuildContext`
(seed, device, rank, world_size). `tensor_bundle` makes the bundle from tensors in a few lines.
"""
from __future__ import annotations

import hashlib
import inspect
from typing import Any, Optional

import torch

from fisherbench.core.errors import UserError
from fisherbench.core.plugins import PluginSpec, check_capabilities, describe_target, options_schema
from fisherbench.data.loaders import TensorBatchSource
from fisherbench.data.registry import DATASETS, BuildContext, DataBundle, DataCapabilities, DataOptions

PLUGIN_CAPABILITIES = {"input_kind": str, "task": str, "offline": bool}
TASKS = ("classification", "language_model")


def tensor_bundle(
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    options: Any,
    context: BuildContext,
    *,
    task: str = "classification",
    num_classes: Optional[int] = None,
    val: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    description: str = "",
) -> DataBundle:
    """A `DataBundle` from in-memory tensors: (inputs, targets) per split.

    Classification: targets are class indices (N,); language model: inputs and targets are token windows
    (N, seq_len), targets shifted by one, and `num_classes` is the vocabulary size. The training split is
    shuffled per epoch from the run seed (deterministic: a resumed run sees the same batches); the
    fingerprint is the SHA-256 of every tensor, so other data is another run.
    """
    if task not in TASKS:
        raise UserError(f"data '{name}': task must be one of {', '.join(TASKS)}, got {task!r}")
    if num_classes is None:
        if task != "classification":
            raise UserError(f"data '{name}': a language model needs num_classes (the vocabulary size)")
        num_classes = int(train[1].max()) + 1
    splits = {"train": train, "test": test, **({"val": val} if val is not None else {})}
    digest = hashlib.sha256()
    for split, (x, y) in splits.items():
        for t in (x, y):
            digest.update(f"{split}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    device = context.device if options.loader in ("auto", "resident") else torch.device("cpu")
    common = dict(device=device, rank=context.rank, world_size=context.world_size)
    eval_bs = options.eval_batch_size or options.batch_size
    evals = {s: TensorBatchSource(*splits[s], eval_bs, shuffle=False, **common) for s in ("val", "test") if s in splits}
    return DataBundle(
        train=TensorBatchSource(*train, options.batch_size, shuffle=True, seed=context.seed, **common),
        evals=evals,
        task=task,
        num_classes=int(num_classes),
        input_shape=tuple(int(s) for s in train[0].shape[1:]),
        num_train=len(train[0]),
        fingerprint=f"{name}:n={len(train[0])}/{len(test[0])}:sha256={digest.hexdigest()[:16]}",
        description=description or name,
    )


def register_plugin(spec: PluginSpec) -> None:
    """Register a plug-in dataset: `spec.target(options, context)` -> `DataBundle`."""
    factory = spec.target
    if not callable(factory):
        raise UserError(f"{spec.where}: `_target_` {describe_target(factory)} is not callable; point it at a "
                        "function (options, context) -> DataBundle")
    caps = check_capabilities(spec, PLUGIN_CAPABILITIES)
    if caps.get("task", "classification") not in TASKS:
        raise UserError(f"{spec.where}: capability task must be one of {', '.join(TASKS)}")
    try:
        inspect.signature(factory).bind(None, None)
    except TypeError:
        raise UserError(f"{spec.where}: {describe_target(factory)} must take (options, context) like the suite's "
                        "own dataset builders") from None
    except ValueError:
        pass  # no signature to check (a builtin)
    # the options are the YAML's keys (typed by their values) on top of the base data options
    schema = options_schema(spec, DataOptions, _accepts_any)

    def build(opts: Any, ctx: BuildContext) -> DataBundle:
        bundle = factory(opts, ctx)
        if not isinstance(bundle, DataBundle):
            raise UserError(f"{spec.where}: {describe_target(factory)} returned {type(bundle).__name__}, not a "
                            "DataBundle (fisherbench.data.plugins.tensor_bundle makes one from tensors)")
        if bundle.task != caps.get("task", bundle.task):
            raise UserError(f"{spec.where}: the bundle's task is {bundle.task!r} but the YAML declares "
                            f"{caps['task']!r}")
        return bundle

    task = caps.get("task", "classification")
    defaults = {"task": task, "input_kind": "tokens" if task == "language_model" else "image"}
    DATASETS.register(spec.name, schema=schema, capabilities=DataCapabilities(**{**defaults, **caps}),
                      summary=spec.summary, source=spec.where)(build)


def _accepts_any(**options: Any) -> None:
    """Signature stand-in for `options_schema`: a dataset's options are whatever its YAML declares."""


"""The model registry: config name -> builder, with what the trainer needs to know about each model."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import nn

from fisherbench.core.registry import Registry, options_from


@dataclass(frozen=True)
class ModelCapabilities:
    """What a model expects and is."""

    input_kind: str = "image"  # image | tokens (must match the dataset's input_kind)
    task: str = "classification"  # classification | language_model
    family: str = "cnn"  # cnn | vit | lm | mlp: selects the paper's per-family optimizer settings
    input_size: Optional[int] = None  # image side the architecture is defined for; None = any
    variant: str = "standard"  # standard | official (official-as-published definition)
    pretrained: bool = False  # can load ImageNet weights (`pretrained: true`)


@dataclass
class ModelOptions:
    """Options every model config has; entries subclass it."""

    name: str = "???"


MODELS: Registry = Registry("model")


def create_model(
    name: str,
    num_classes: int = 10,
    input_shape: Optional[Sequence[int]] = None,
    double_backward: bool = False,
    vocabulary: Optional[str] = None,
    **options: Any,
) -> nn.Module:
    """Build a registered model by its config name.

    `input_shape` is the per-example shape (e.g. (3, 32, 32) or (256,) for token windows). When
    `double_backward` is true (AdaHessian, Sophia-H: `backward(create_graph=True)`), attention is written
    out instead of using fused SDPA, whose second derivative is not implemented on CPU. `vocabulary` is the
    data's tokenizer family (`DataBundle.extras["vocabulary"]`, e.g. "gpt1"); it reaches only builders that
    take a `vocabulary` argument (the GPT models decide from it whether their embeddings train).
    """
    entry = MODELS.get(name)
    opts = options_from(entry.schema, {"name": name, **options})
    extra = {"vocabulary": vocabulary} if "vocabulary" in inspect.signature(entry.builder).parameters else {}
    return entry.builder(
        opts, num_classes=num_classes, input_shape=tuple(input_shape) if input_shape else None,
        double_backward=double_backward, **extra,
    )


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total

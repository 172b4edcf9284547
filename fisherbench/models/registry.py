"""The model registry: config name -> builder, with what the trainer needs to know about each model."""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import nn

from fisherbench.core.errors import UserError
from fisherbench.core.plugins import PluginSpec, check_capabilities, describe_target, options_schema, signature_options
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


# ------------------------------------------------------------------------------------------------------------
# plug-ins: a model from the user's code (an nn.Module class or a factory function)
# ------------------------------------------------------------------------------------------------------------
PLUGIN_CAPABILITIES = {"input_kind": str, "task": str, "family": str, "input_size": int}
# what the suite passes a plug-in factory that has a parameter of that name (never options)
PROVIDED = ("num_classes", "input_shape", "double_backward")


def register_plugin(spec: PluginSpec) -> None:
    """Register a plug-in model: `spec.target(**options, num_classes=..., input_shape=...)` -> nn.Module.

    `num_classes` (classes, or the vocabulary for a language model), `input_shape` (per example, e.g.
    (1, 28, 28) or (seq_len,)) and `double_backward` are passed where the factory has a parameter of that name.
    """
    factory = spec.target
    if not callable(factory):
        raise UserError(f"{spec.where}: `_target_` {describe_target(factory)} is not callable; point it at an "
                        "nn.Module class or a function that returns one")
    caps = check_capabilities(spec, PLUGIN_CAPABILITIES)
    params, var_kw = signature_options(factory)
    provided = [p for p in PROVIDED if p in params or var_kw]
    schema = options_schema(spec, ModelOptions, factory, skip=PROVIDED)

    def build(opts: Any, *, num_classes: int, input_shape: Optional[tuple[int, ...]],
              double_backward: bool) -> nn.Module:
        given = {"num_classes": num_classes, "input_shape": input_shape, "double_backward": double_backward}
        kwargs = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name != "name"}
        model = factory(**kwargs, **{k: given[k] for k in provided})
        if not isinstance(model, nn.Module):
            raise UserError(f"{spec.where}: {describe_target(factory)}(...) returned {type(model).__name__}, not "
                            "a torch.nn.Module")
        return model

    MODELS.register(spec.name, schema=schema, capabilities=ModelCapabilities(**caps), summary=spec.summary,
                    source=spec.where)(build)

"""Helpers shared by the model definitions: attention with a twice-differentiable path, hook-safe
activations, input-shape parsing.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fisherbench.core.errors import UserError


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    explicit: bool = False,
) -> torch.Tensor:
    """softmax(q kᵀ / √d + bias) v over the last two dims of (..., L, d) tensors.

    `explicit=True` writes the product out (matmul, softmax, matmul). Use it when the loss is
    differentiated twice (AdaHessian / Sophia-H call `backward(create_graph=True)`): the fused
    `scaled_dot_product_attention` kernels have no double backward on CPU. The causal mask is
    -inf above the diagonal in both paths, so the two agree to rounding.
    """
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, is_causal=causal)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if bias is not None:
        scores = scores + bias
    if causal:
        n, m = scores.shape[-2:]
        future = torch.ones(n, m, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return torch.matmul(weights, v)


def disable_inplace(model: nn.Module) -> nn.Module:
    """Turn off `inplace` on every activation/dropout of a library model (torchvision, timm).

    AdaFisher's full backward hooks wrap module outputs; an in-place op on such an output
    (`ReLU(inplace=True)` after a hooked BatchNorm) makes autograd raise (the reason the official AdaFisher README forbids in-place operations).
    """
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return model


def set_fused_attention(model: nn.Module, enabled: bool) -> nn.Module:
    """Set timm's per-module `fused_attn` flag (SDPA vs written-out attention) on every attention block."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled
    return model


def image_shape(input_shape: Optional[Sequence[int]], default: tuple[int, int, int]) -> tuple[int, int, int]:
    """(C, H, W) from the dataset's per-example shape, or the architecture's default when not given."""
    if input_shape is None:
        return default
    if len(input_shape) != 3:
        raise UserError(f"an image model needs input_shape (C, H, W), got {tuple(input_shape)}")
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


def require_size(model_name: str, shape: tuple[int, int, int], sizes: Sequence[int]) -> None:
    """Raise a clear error when an architecture is defined for fixed image sizes only."""
    _, h, w = shape
    if h != w or h not in sizes:
        allowed = " or ".join(f"{s}x{s}" for s in sizes)
        raise UserError(
            f"model '{model_name}' is defined for {allowed} images, got {h}x{w}. Pick a dataset of that size "
            f"(e.g. data=cifar10 for 32x32, data=tiny_imagenet for 64x64) or a model defined for {h}x{w}."
        )


def require_min_size(model_name: str, shape: tuple[int, int, int], min_size: int, why: str) -> None:
    """Refuse images smaller than `min_size` (the architecture's total downsampling, `why`): below it the last
    stages see 1x1 maps padded with zeros, and the run trains a different, degenerate network (an
    ImageNet-stem ResNet-50 on 8x8 digits stays at chance level) that would be stored as a result."""
    _, h, w = shape
    if min(h, w) < min_size:
        raise UserError(
            f"model '{model_name}' needs images of at least {min_size}x{min_size} ({why}), got {h}x{w}. Use "
            f"larger inputs (data=image_folder data.image_size={min_size} or more) or a model for small images "
            f"(e.g. small_cnn, resnet18_cifar)."
        )

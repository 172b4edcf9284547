"""A tiny Vision Transformer (timm) for fast tests of optimizers on attention models."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from fisherbench.core.errors import UserError
from fisherbench.models.common import disable_inplace, image_shape, set_fused_attention
from fisherbench.models.registry import MODELS, ModelCapabilities, ModelOptions


@dataclass
class TinyViTOptions(ModelOptions):
    name: str = "tiny_vit"
    patch_size: int = 8
    dim: int = 32
    depth: int = 2
    heads: int = 2
    mlp_ratio: float = 2.0


@MODELS.register(
    "tiny_vit",
    schema=TinyViTOptions,
    capabilities=ModelCapabilities(input_kind="image", family="vit", variant="standard"),
    summary="Tiny ViT for tests (timm VisionTransformer: patch 8, d 32, 2 blocks, 2 heads, class token)",
    source="timm",
)
def build_tiny_vit(opts: TinyViTOptions, *, num_classes: int, input_shape: Optional[tuple],
                   double_backward: bool) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer  # lazy: timm takes ~1 s to import

    c, h, w = image_shape(input_shape, (3, 32, 32))
    if h % opts.patch_size or w % opts.patch_size:
        raise UserError(f"{opts.name}: image {h}x{w} is not divisible by patch_size={opts.patch_size}")
    model = VisionTransformer(img_size=(h, w), patch_size=opts.patch_size, in_chans=c, num_classes=num_classes,
                              embed_dim=opts.dim, depth=opts.depth, num_heads=opts.heads, mlp_ratio=opts.mlp_ratio)
    return set_fused_attention(disable_inplace(model), enabled=not double_backward)

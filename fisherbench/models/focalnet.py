"""FocalNet for 32x32 inputs, in two variants.

`focalnet_official`: the official repo's definition (Microsoft FocalNet layout, `img_size=32, patch_size=2`,
width 96, depths (2,2,6,2), focal levels 2 with kernels 3 and 5, MLP x4, drop-path 0.1, LayerNorm after
every patch embedding). Its focal convolutions are **dense** (no `groups`), which makes it a 100.83 M-
parameter network (the official `Image_Classification/src/models/focalnet.py` never sets `groups`; the
standard FocalNet's focal convolutions are depthwise); that is the network behind the paper's FocalNet numbers. Tokens are
kept as (B, L, C) with `nn.Linear` projections and `nn.LayerNorm`, as in the official file.

`focalnet`: the standard FocalNet-T (SRF) from timm (depthwise focal convs, 27.66 M parameters) with a
stride-2 patch stem instead of timm's fixed stride 4, so a 32x32 image gives the same 16x16 first-stage grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
from torch import nn

from fisherbench.core.errors import UserError
from fisherbench.models.common import disable_inplace, image_shape
from fisherbench.models.registry import MODELS, ModelCapabilities, ModelOptions


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability p (scaled at train time)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class FocalModulation(nn.Module):
    def __init__(self, dim: int, focal_window: int, focal_level: int, focal_factor: int = 2,
                 proj_drop: float = 0.0, depthwise: bool = False) -> None:
        super().__init__()
        self.focal_level = focal_level
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1)
        self.h = nn.Conv2d(dim, dim, 1)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.focal_layers = nn.ModuleList()
        for k in range(focal_level):
            size = focal_factor * k + focal_window
            self.focal_layers.append(nn.Sequential(
                nn.Conv2d(dim, dim, size, padding=size // 2, groups=dim if depthwise else 1, bias=False),
                nn.GELU()))

    def forward(self, x):  # (B, H, W, C)
        c = x.shape[-1]
        q, ctx, gates = torch.split(self.f(x).permute(0, 3, 1, 2), (c, c, self.focal_level + 1), 1)
        ctx_all = 0
        for level, layer in enumerate(self.focal_layers):
            ctx = layer(ctx)
            ctx_all = ctx_all + ctx * gates[:, level:level + 1]
        ctx_global = self.act(ctx.mean((2, 3), keepdim=True))
        ctx_all = ctx_all + ctx_global * gates[:, self.focal_level:]
        out = (q * self.h(ctx_all)).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out))


class FocalNetBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, drop_path: float, focal_level: int, focal_window: int,
                 depthwise: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(dim, focal_window, focal_level, depthwise=depthwise)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, h: int, w: int):  # (B, L, C)
        b, n, c = x.shape
        y = self.modulation(self.norm1(x).view(b, h, w, c)).view(b, n, c)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cin: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # (B, C, H, W) -> (B, L, C'), H', W'
        x = self.proj(x)
        h, w = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class BasicLayer(nn.Module):
    def __init__(self, dim: int, out_dim: Optional[int], depth: int, mlp_ratio: float, drop_path: list[float],
                 focal_level: int, focal_window: int, depthwise: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([FocalNetBlock(dim, mlp_ratio, drop_path[i], focal_level, focal_window, depthwise)
                                     for i in range(depth)])
        self.downsample = PatchEmbed(dim, out_dim, 2) if out_dim is not None else None

    def forward(self, x, h: int, w: int):
        for block in self.blocks:
            x = block(x, h, w)
        if self.downsample is not None:
            x, h, w = self.downsample(x.transpose(1, 2).reshape(x.shape[0], -1, h, w))
        return x, h, w


class OfficialFocalNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, patch_size: int = 2, embed_dim: int = 96,
                 depths: list[int] = (2, 2, 6, 2), mlp_ratio: float = 4.0, drop_path_rate: float = 0.1,
                 focal_levels: list[int] = (2, 2, 2, 2), focal_windows: list[int] = (3, 3, 3, 3),
                 depthwise: bool = False) -> None:
        super().__init__()
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(in_channels, dims[0], patch_size)
        self.pos_drop = nn.Dropout(0.0)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.layers.append(BasicLayer(
                dims[i], dims[i + 1] if i + 1 < len(depths) else None, depth, mlp_ratio,
                dpr[sum(depths[:i]):sum(depths[:i + 1])], focal_levels[i], focal_windows[i], depthwise))
        self.norm = nn.LayerNorm(dims[-1])
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x, h, w = self.patch_embed(x)
        x = self.pos_drop(x)
        for layer in self.layers:
            x, h, w = layer(x, h, w)
        x = self.avgpool(self.norm(x).transpose(1, 2)).flatten(1)
        return self.head(x)


@dataclass
class OfficialFocalNetOptions(ModelOptions):
    name: str = "focalnet_official"
    patch_size: int = 2
    embed_dim: int = 96
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    focal_levels: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    focal_windows: list[int] = field(default_factory=lambda: [3, 3, 3, 3])
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1


@MODELS.register(
    "focalnet_official",
    schema=OfficialFocalNetOptions,
    capabilities=ModelCapabilities(input_kind="image", family="vit", input_size=32, variant="official"),
    summary="FocalNet as published: patch 2, width 96, (2,2,6,2), dense (not depthwise) focal convs "
            "(100.83 M / 100.90 M)",
    source="official definition (microsoft/FocalNet layout without groups)",
)
def build_focalnet_official(opts: OfficialFocalNetOptions, *, num_classes: int, input_shape: Optional[tuple],
                            double_backward: bool) -> nn.Module:
    c, h, w = image_shape(input_shape, (3, 32, 32))
    stride = opts.patch_size * 2 ** (len(opts.depths) - 1)
    if h % stride or w % stride:
        raise UserError(f"{opts.name}: input {h}x{w} must be divisible by patch_size * 2^(stages-1) = {stride}")
    return OfficialFocalNet(num_classes, c, opts.patch_size, opts.embed_dim, list(opts.depths), opts.mlp_ratio,
                            opts.drop_path_rate, list(opts.focal_levels), list(opts.focal_windows), depthwise=False)


@dataclass
class FocalNetOptions(ModelOptions):
    name: str = "focalnet"
    stem_stride: int = 2  # timm's stem has stride 4; 2 keeps a 16x16 first-stage grid on 32x32 images
    embed_dim: int = 96
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    focal_levels: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    focal_windows: list[int] = field(default_factory=lambda: [3, 3, 3, 3])
    drop_path_rate: float = 0.1


@MODELS.register(
    "focalnet",
    schema=FocalNetOptions,
    capabilities=ModelCapabilities(input_kind="image", family="vit", input_size=32, variant="standard"),
    summary="Standard FocalNet-T (SRF, depthwise focal convs; timm) with a stride-2 stem for 32x32 (27.66 M)",
    source="timm",
)
def build_focalnet(opts: FocalNetOptions, *, num_classes: int, input_shape: Optional[tuple],
                   double_backward: bool) -> nn.Module:
    # lazy: timm takes ~1 s to import; only the timm variants need it
    from timm.layers import LayerNorm2d
    from timm.models.focalnet import Downsample, FocalNet, _init_weights

    c, h, w = image_shape(input_shape, (3, 32, 32))
    stride = opts.stem_stride * 2 ** (len(opts.depths) - 1)
    if h % stride or w % stride:
        raise UserError(f"{opts.name}: input {h}x{w} must be divisible by stem_stride * 2^(stages-1) = {stride}")
    model = FocalNet(in_chans=c, num_classes=num_classes, embed_dim=opts.embed_dim, depths=tuple(opts.depths),
                     focal_levels=tuple(opts.focal_levels), focal_windows=tuple(opts.focal_windows),
                     drop_path_rate=opts.drop_path_rate)
    if opts.stem_stride != 4:
        model.stem = Downsample(c, opts.embed_dim, stride=opts.stem_stride,
                                norm_layer=partial(LayerNorm2d, eps=1e-5))
        model.stem.apply(_init_weights)
    return disable_inplace(model)

"""Swin Transformers: the official "Tiny Swin" and "Big Swin" (berniwal/swin-transformer-pytorch layout) and a
standard Swin-T from timm for 32x32 inputs.

Official layout (`Image_Classification/src/models/swin.py` of the official repository): every stage starts with a patch merge (`nn.Unfold` + Linear; the first one is
the patch embedding), then pairs of (regular, shifted) window-attention blocks, pre-norm, MLP x4 with GELU,
a learned (2w-1)x(2w-1) relative-position table per block, masks for the shifted windows stored as
`Parameter(requires_grad=False)`, mean-pool -> LayerNorm -> Linear. No norm after the patch merges, no
stochastic depth, no dropout.

* `swin_tiny_official` ("Tiny Swin", CIFAR): width 96, depths (2,2,6,2), heads (3,6,12,24), head dim 32,
  **window 2**, downscaling (2,2,2,1): token grids 16, 8, 4, 4. 26.60 M parameters with 10 classes.
* `swin_big` ("Big Swin", Tiny ImageNet 64x64): the paper gives no definition. We use the official repo's
  own `swin_b` (its ImageNet folder, commit 313a182): width 128, depths (2,2,18,2), heads (4,8,16,32),
  head dim 32, window 4, downscaling (2,2,2,1): token grids 32, 16, 8, 8.
* `swin_tiny`: timm's SwinTransformer with Swin-T widths/depths, patch 2 and window 4 for 32x32 (timm
  shrinks the last stage's window to its 2x2 grid and drops the shift there).

Module names and parameter order follow the official file: the official AdaFisher's parameter matching
(docs/adafisher.md, the `official` variant) walks them, and the frozen mask parameters are part of why it leaves 61% of Tiny Swin untrained.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from fisherbench.core.errors import UserError
from fisherbench.models.common import attention, disable_inplace, image_shape, set_fused_attention
from fisherbench.models.registry import MODELS, ModelCapabilities, ModelOptions


def shifted_window_masks(window: int, displacement: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-inf masks for the last row (upper/lower) and last column (left/right) of windows after a cyclic
    shift by `displacement`: tokens that came from opposite image borders must not attend to each other."""
    n, d = window, displacement
    upper_lower = torch.zeros(n * n, n * n)
    upper_lower[-d * n:, :-d * n] = float("-inf")
    upper_lower[:-d * n, -d * n:] = float("-inf")
    left_right = torch.zeros(n, n, n, n)  # (row_i, col_i, row_j, col_j)
    left_right[:, -d:, :, :-d] = float("-inf")
    left_right[:, :-d, :, -d:] = float("-inf")
    return upper_lower, left_right.reshape(n * n, n * n)


def relative_position_index(window: int) -> torch.Tensor:
    """(w², w², 2) index into a (2w-1)x(2w-1) table: offset of token j from token i, shifted to be >= 0."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"), -1).reshape(-1, 2)
    return coords[None, :, :] - coords[:, None, :] + window - 1


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, shifted: bool, window_size: int,
                 relative_pos_embedding: bool, explicit_attention: bool) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.window_size = window_size
        self.shifted = shifted
        self.relative_pos_embedding = relative_pos_embedding
        self.explicit_attention = explicit_attention
        self.displacement = window_size // 2
        if shifted:
            ul, lr = shifted_window_masks(window_size, self.displacement)
            # Frozen Parameters (not buffers), as published: they show up in model.parameters() with
            # requires_grad=False, which is what the official optimizer's matching loop stumbles on.
            self.upper_lower_mask = nn.Parameter(ul, requires_grad=False)
            self.left_right_mask = nn.Parameter(lr, requires_grad=False)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        if relative_pos_embedding:
            self.register_buffer("relative_indices", relative_position_index(window_size), persistent=False)
            self.pos_embedding = nn.Parameter(torch.randn(2 * window_size - 1, 2 * window_size - 1))
        else:
            self.pos_embedding = nn.Parameter(torch.randn(window_size ** 2, window_size ** 2))
        self.to_out = nn.Linear(inner, dim)

    def _bias(self, rows: int, cols: int) -> torch.Tensor:
        """Additive attention bias per window: position bias (+ shift masks on the last row/column of windows)."""
        if self.relative_pos_embedding:
            idx = self.relative_indices
            bias = self.pos_embedding[idx[..., 0], idx[..., 1]]
        else:
            bias = self.pos_embedding
        if not self.shifted:
            return bias
        zeros = torch.zeros(rows, cols, 1, 1, dtype=bias.dtype, device=bias.device)
        last_row = torch.zeros_like(zeros)
        last_row[-1] = 1.0
        last_col = torch.zeros_like(zeros)
        last_col[:, -1] = 1.0
        # 0 * -inf is nan, so select instead of multiplying
        masks = torch.where(last_row.bool(), self.upper_lower_mask, zeros) + \
            torch.where(last_col.bool(), self.left_right_mask, zeros)
        return bias + masks.reshape(rows * cols, *bias.shape)

    def forward(self, x):  # x: (B, H, W, C)
        if self.shifted:
            x = torch.roll(x, shifts=(-self.displacement, -self.displacement), dims=(1, 2))
        b, h, w, _ = x.shape
        n = self.window_size
        rows, cols = h // n, w // n

        def windows(t: torch.Tensor) -> torch.Tensor:  # (B, H, W, heads*d) -> (B, heads, windows, n*n, d)
            t = t.reshape(b, rows, n, cols, n, self.heads, self.head_dim)
            return t.permute(0, 5, 1, 3, 2, 4, 6).reshape(b, self.heads, rows * cols, n * n, self.head_dim)

        q, k, v = (windows(t) for t in self.to_qkv(x).chunk(3, dim=-1))
        out = attention(q, k, v, bias=self._bias(rows, cols), explicit=self.explicit_attention)
        out = out.reshape(b, self.heads, rows, cols, n, n, self.head_dim)
        out = out.permute(0, 2, 4, 3, 5, 1, 6).reshape(b, h, w, self.heads * self.head_dim)
        out = self.to_out(out)
        if self.shifted:
            out = torch.roll(out, shifts=(self.displacement, self.displacement), dims=(1, 2))
        return out


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.net(x)


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, shifted: bool, window_size: int,
                 relative_pos_embedding: bool, explicit_attention: bool) -> None:
        super().__init__()
        self.attention_block = Residual(PreNorm(dim, WindowAttention(
            dim, heads, head_dim, shifted, window_size, relative_pos_embedding, explicit_attention)))
        self.mlp_block = Residual(PreNorm(dim, FeedForward(dim, 4 * dim)))

    def forward(self, x):
        return self.mlp_block(self.attention_block(x))


class PatchMerging(nn.Module):
    """Non-overlapping f x f patches (channel-major, as `nn.Unfold` orders them) -> Linear."""

    def __init__(self, cin: int, cout: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.patch_merge = nn.Unfold(kernel_size=factor, stride=factor, padding=0)
        self.linear = nn.Linear(cin * factor ** 2, cout)

    def forward(self, x):  # (B, C, H, W) -> (B, H/f, W/f, C')
        b, _, h, w = x.shape
        x = self.patch_merge(x).view(b, -1, h // self.factor, w // self.factor).permute(0, 2, 3, 1)
        return self.linear(x)


class StageModule(nn.Module):
    def __init__(self, cin: int, dim: int, depth: int, factor: int, heads: int, head_dim: int, window_size: int,
                 relative_pos_embedding: bool, explicit_attention: bool) -> None:
        super().__init__()
        if depth % 2:
            raise UserError(f"Swin stage depths must be even (regular + shifted block pairs), got {depth}")
        self.patch_partition = PatchMerging(cin, dim, factor)
        self.layers = nn.ModuleList([
            nn.ModuleList([SwinBlock(dim, heads, head_dim, shifted, window_size, relative_pos_embedding,
                                     explicit_attention) for shifted in (False, True)])
            for _ in range(depth // 2)
        ])

    def forward(self, x):
        x = self.patch_partition(x)
        for regular, shifted in self.layers:
            x = shifted(regular(x))
        return x.permute(0, 3, 1, 2)


class OfficialSwin(nn.Module):
    def __init__(self, *, hidden_dim: int, layers: list[int], heads: list[int], num_classes: int, channels: int = 3,
                 head_dim: int = 32, window_size: int = 2, downscaling_factors: list[int] = (2, 2, 2, 1),
                 relative_pos_embedding: bool = True, explicit_attention: bool = False) -> None:
        super().__init__()
        dims = [hidden_dim * 2 ** i for i in range(4)]
        cins = [channels] + dims[:3]
        for i in range(4):
            self.add_module(f"stage{i + 1}", StageModule(
                cins[i], dims[i], layers[i], downscaling_factors[i], heads[i], head_dim, window_size,
                relative_pos_embedding, explicit_attention))
        self.mlp_head = nn.Sequential(nn.LayerNorm(dims[3]), nn.Linear(dims[3], num_classes))

    def forward(self, img):
        x = self.stage4(self.stage3(self.stage2(self.stage1(img))))
        return self.mlp_head(x.mean(dim=[2, 3]))


@dataclass
class OfficialSwinOptions(ModelOptions):
    name: str = "swin_tiny_official"
    hidden_dim: int = 96
    layers: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    head_dim: int = 32
    window_size: int = 2
    downscaling_factors: list[int] = field(default_factory=lambda: [2, 2, 2, 1])
    relative_pos_embedding: bool = True


@dataclass
class SwinBigOptions(OfficialSwinOptions):
    name: str = "swin_big"
    hidden_dim: int = 128
    layers: list[int] = field(default_factory=lambda: [2, 2, 18, 2])
    heads: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    window_size: int = 4


def _build_official(opts: OfficialSwinOptions, num_classes: int, input_shape: Optional[tuple],
                    default_size: int, double_backward: bool) -> OfficialSwin:
    c, h, w = image_shape(input_shape, (3, default_size, default_size))
    if not (len(opts.layers) == len(opts.heads) == len(opts.downscaling_factors) == 4):
        raise UserError(f"{opts.name}: layers, heads and downscaling_factors need 4 entries (one per stage)")
    side_h, side_w = h, w
    for i, f in enumerate(opts.downscaling_factors):
        if side_h % f or side_w % f or (side_h // f) % opts.window_size or (side_w // f) % opts.window_size:
            raise UserError(
                f"{opts.name}: a {h}x{w} input gives a {side_h // f}x{side_w // f} token grid in stage {i + 1}, "
                f"not divisible by window_size={opts.window_size} (downscaling {list(opts.downscaling_factors)}). "
                f"Use a {default_size}x{default_size} dataset or change model.window_size / "
                f"model.downscaling_factors.")
        side_h, side_w = side_h // f, side_w // f
    return OfficialSwin(hidden_dim=opts.hidden_dim, layers=list(opts.layers), heads=list(opts.heads),
                        num_classes=num_classes, channels=c, head_dim=opts.head_dim, window_size=opts.window_size,
                        downscaling_factors=list(opts.downscaling_factors),
                        relative_pos_embedding=opts.relative_pos_embedding, explicit_attention=double_backward)


@MODELS.register(
    "swin_tiny_official",
    schema=OfficialSwinOptions,
    capabilities=ModelCapabilities(input_kind="image", family="vit", input_size=32, variant="official"),
    summary="Tiny Swin as published (berniwal layout): width 96, (2,2,6,2), window 2 (26.60 M / 26.67 M)",
    source="official definition (berniwal/swin-transformer-pytorch layout)",
)
def build_swin_tiny_official(opts: OfficialSwinOptions, *, num_classes: int, input_shape: Optional[tuple],
                             double_backward: bool) -> nn.Module:
    return _build_official(opts, num_classes, input_shape, 32, double_backward)


@MODELS.register(
    "swin_big",
    schema=SwinBigOptions,
    capabilities=ModelCapabilities(input_kind="image", family="vit", input_size=64, variant="official"),
    summary="Big Swin for Tiny ImageNet: the official repo's swin_b, width 128, (2,2,18,2), window 4 "
            "(85.27 M with 200 classes)",
    source="official repository's swin_b (berniwal layout); the paper does not define Big Swin",
)
def build_swin_big(opts: SwinBigOptions, *, num_classes: int, input_shape: Optional[tuple],
                   double_backward: bool) -> nn.Module:
    return _build_official(opts, num_classes, input_shape, 64, double_backward)


@dataclass
class TimmSwinOptions(ModelOptions):
    name: str = "swin_tiny"
    embed_dim: int = 96
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    patch_size: int = 2
    window_size: int = 4
    drop_path_rate: float = 0.1


@MODELS.register(
    "swin_tiny",
    schema=TimmSwinOptions,
    capabilities=ModelCapabilities(input_kind="image", family="vit", input_size=32, variant="standard"),
    summary="Standard Swin-T (timm) for 32x32: patch 2, window 4, width 96, (2,2,6,2), drop-path 0.1",
    source="timm",
)
def build_swin_tiny(opts: TimmSwinOptions, *, num_classes: int, input_shape: Optional[tuple],
                    double_backward: bool) -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer  # lazy: timm takes ~1 s to import

    c, h, w = image_shape(input_shape, (3, 32, 32))
    if h != w or h % (opts.patch_size * 2 ** (len(opts.depths) - 1)):
        raise UserError(f"{opts.name}: a square input divisible by patch_size * 2^(stages-1) is needed, got {h}x{w}")
    model = SwinTransformer(img_size=h, patch_size=opts.patch_size, in_chans=c, num_classes=num_classes,
                            embed_dim=opts.embed_dim, depths=tuple(opts.depths), num_heads=tuple(opts.num_heads),
                            window_size=opts.window_size, drop_path_rate=opts.drop_path_rate)
    return set_fused_attention(disable_inplace(model), enabled=not double_backward)

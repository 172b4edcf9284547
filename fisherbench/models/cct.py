"""Compact Convolutional Transformer CCT-2/3x2 for 32x32 inputs, in two variants.

Both: convolutional tokenizer (conv 3x3 no bias -> ReLU -> max-pool 3/2/1, repeated), learned positional
embedding, 2 transformer layers with 2 heads and MLP ratio 1 (CCT's layer: x += DropPath(Attn(LN(x)));
x = LN(x); x += DropPath(MLP(x))), attention dropout 0.1, dropout 0, stochastic depth 0.1, sequence pooling,
LayerNorm, Linear. Linear layers trunc-normal(0.02), tokenizer convs kaiming-normal, positions
trunc-normal(0.2).

`cct_2_3x2_official`: as in the official repo: **width 256** and **one** conv layer with stride 2,
padding 3, so 32x32 images give **81 tokens** (0.821 M parameters with 10 classes).
`cct_2_3x2`: the original CCT-2/3x2 (Hassani et al. 2021): width 128, two conv layers (64 then 128
channels) with stride 1, padding 1: 64 tokens, 0.28 M parameters.

Module names and order follow the official file (`tokenizer.conv_layers`, `classifier.{positional_emb,
attention_pool, blocks, norm, fc}`) for the reason given in `resnet_cifar`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fisherbench.core.errors import UserError
from fisherbench.models.common import attention, image_shape
from fisherbench.models.focalnet import DropPath
from fisherbench.models.registry import MODELS, ModelCapabilities, ModelOptions


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attention_dropout: float, projection_dropout: float,
                 explicit: bool) -> None:
        super().__init__()
        self.heads = heads
        self.attention_dropout = attention_dropout
        self.explicit = explicit
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(projection_dropout)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, dropout_p=self.attention_dropout if self.training else 0.0, explicit=self.explicit)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class TransformerEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float, attention_dropout: float,
                 drop_path: float, explicit: bool) -> None:
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, attention_dropout, dropout, explicit)
        self.linear1 = nn.Linear(dim, ff_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.linear2 = nn.Linear(ff_dim, dim)
        self.dropout2 = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.self_attn(self.pre_norm(x)))
        x = self.norm1(x)
        y = self.linear2(self.dropout1(F.gelu(self.linear1(x))))
        return x + self.drop_path(self.dropout2(y))


class Tokenizer(nn.Module):
    def __init__(self, in_channels: int, dim: int, n_conv_layers: int, in_planes: int, kernel: int, stride: int,
                 padding: int) -> None:
        super().__init__()
        widths = [in_channels] + [in_planes] * (n_conv_layers - 1) + [dim]
        self.conv_layers = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.ReLU(inplace=False),
                          nn.MaxPool2d(3, 2, 1))
            for cin, cout in zip(widths[:-1], widths[1:])
        ])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):  # (B, C, H, W) -> (B, tokens, dim)
        return self.conv_layers(x).flatten(2).transpose(1, 2)


class TransformerClassifier(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, mlp_ratio: float, num_classes: int, sequence_length: int,
                 dropout: float, attention_dropout: float, stochastic_depth: float, explicit: bool) -> None:
        super().__init__()
        self.attention_pool = nn.Linear(dim, 1)
        self.positional_emb = nn.Parameter(torch.zeros(1, sequence_length, dim))
        nn.init.trunc_normal_(self.positional_emb, std=0.2)
        self.dropout = nn.Dropout(dropout)
        rates = torch.linspace(0, stochastic_depth, layers, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, attention_dropout, r, explicit)
            for r in rates])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.dropout(x + self.positional_emb)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        weights = self.attention_pool(x).squeeze(-1).softmax(dim=1)  # sequence pooling
        return self.fc(torch.einsum("bn,bnd->bd", weights, x))


class CCT(nn.Module):
    def __init__(self, num_classes: int, image: tuple[int, int, int], dim: int, n_conv_layers: int, in_planes: int,
                 kernel: int, stride: int, padding: int, layers: int, heads: int, mlp_ratio: float,
                 dropout: float, attention_dropout: float, stochastic_depth: float, explicit: bool) -> None:
        super().__init__()
        c, h, w = image
        self.tokenizer = Tokenizer(c, dim, n_conv_layers, in_planes, kernel, stride, padding)
        for _ in range(n_conv_layers):  # conv, then max-pool 3/2/1
            h, w = ((s + 2 * padding - kernel) // stride + 1 for s in (h, w))
            h, w = ((s - 1) // 2 + 1 for s in (h, w))
        self.sequence_length = h * w
        self.classifier = TransformerClassifier(dim, layers, heads, mlp_ratio, num_classes, self.sequence_length,
                                                dropout, attention_dropout, stochastic_depth, explicit)

    def forward(self, x):
        return self.classifier(self.tokenizer(x))


@dataclass
class CCTOptions(ModelOptions):
    name: str = "cct_2_3x2_official"
    dim: int = 256
    n_conv_layers: int = 1
    conv_in_planes: int = 64  # width of the tokenizer's inner conv layers (when n_conv_layers > 1)
    kernel_size: int = 3
    stride: int = 2
    padding: int = 3
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 1.0
    dropout: float = 0.0
    attention_dropout: float = 0.1
    stochastic_depth: float = 0.1


@dataclass
class OriginalCCTOptions(CCTOptions):
    name: str = "cct_2_3x2"
    dim: int = 128
    n_conv_layers: int = 2
    stride: int = 1
    padding: int = 1


def _build(opts: CCTOptions, num_classes: int, input_shape: Optional[tuple], double_backward: bool) -> CCT:
    if opts.dim % opts.heads:
        raise UserError(f"{opts.name}: dim={opts.dim} must be divisible by heads={opts.heads}")
    return CCT(num_classes, image_shape(input_shape, (3, 32, 32)), opts.dim, opts.n_conv_layers, opts.conv_in_planes,
               opts.kernel_size, opts.stride, opts.padding, opts.layers, opts.heads, opts.mlp_ratio, opts.dropout,
               opts.attention_dropout, opts.stochastic_depth, explicit=double_backward)


@MODELS.register(
    "cct_2_3x2_official",
    schema=CCTOptions,
    capabilities=ModelCapabilities(input_kind="image", family="vit", input_size=32, variant="official"),
    summary="CCT-2/3x2 as published: width 256, one stride-2 conv, 81 tokens (0.821 M / 0.844 M)",
    source="official definition (lucidrains/vit-pytorch CCT layout)",
)
def build_cct_official(opts: CCTOptions, *, num_classes: int, input_shape: Optional[tuple],
                       double_backward: bool) -> nn.Module:
    return _build(opts, num_classes, input_shape, double_backward)


@MODELS.register(
    "cct_2_3x2",
    schema=OriginalCCTOptions,
    capabilities=ModelCapabilities(input_kind="image", family="vit", input_size=32, variant="standard"),
    summary="Original CCT-2/3x2 (Hassani et al.): width 128, two stride-1 convs, 64 tokens (0.28 M)",
    source="fisherbench (same code as the official variant, original hyper-parameters)",
)
def build_cct(opts: OriginalCCTOptions, *, num_classes: int, input_shape: Optional[tuple],
              double_backward: bool) -> nn.Module:
    return _build(opts, num_classes, input_shape, double_backward)

"""CIFAR DenseNet-121 as the official code defines it (kuangliu/pytorch-cifar layout).

Growth 32, blocks [6,12,24,16], bottleneck width 4x growth, transitions halve the channels (reduction 0.5),
3x3 stem conv to 64 channels without BN, final BN-ReLU, AvgPool(4) (so 32x32 inputs only), linear head.
Official names and order (`conv1, dense1, trans1, ..., bn, linear`) are kept: see `resnet_cifar` for why.

A dense layer here concatenates `[new, input]`; torchvision's concatenates `[input, new]`. So the channel
order inside a block differs, which `torchvision_densenet_remap` undoes when loading ImageNet weights.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from fisherbench.core.errors import UserError
from fisherbench.models import pretrained as pt
from fisherbench.models.common import image_shape, require_size
from fisherbench.models.registry import MODELS, ModelCapabilities, ModelOptions

WEIGHTS = "DenseNet121_Weights.IMAGENET1K_V1"  # what the official trainer used


class DenseLayer(nn.Module):
    def __init__(self, in_planes: int, growth_rate: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.avgpool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.avgpool(self.conv(self.relu(self.bn(x))))


class CifarDenseNet(nn.Module):
    def __init__(self, blocks: list[int], growth_rate: int = 32, reduction: float = 0.5, num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.growth_rate = growth_rate
        self.block_inputs: list[int] = []  # channels entering each dense block (for weight remapping)
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
        for i, n in enumerate(blocks, start=1):
            self.block_inputs.append(planes)
            self.add_module(f"dense{i}", nn.Sequential(*[DenseLayer(planes + j * growth_rate, growth_rate)
                                                          for j in range(n)]))
            planes += n * growth_rate
            if i < len(blocks):
                out_planes = int(math.floor(planes * reduction))
                self.add_module(f"trans{i}", Transition(planes, out_planes))
                planes = out_planes
        self.num_blocks = len(blocks)
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, num_classes)
        self.relu = nn.ReLU(inplace=False)
        self.avgpool = nn.AvgPool2d(4)

    def forward(self, x):
        out = self.conv1(x)
        for i in range(1, self.num_blocks):
            out = getattr(self, f"trans{i}")(getattr(self, f"dense{i}")(out))
        out = getattr(self, f"dense{self.num_blocks}")(out)
        out = self.avgpool(self.relu(self.bn(out)))
        return self.linear(out.flatten(1))


def cifar_channel_order(block_input: int, growth_rate: int, layers_done: int) -> torch.Tensor:
    """Index into torchvision's channel order for each channel of our concatenation.

    After `layers_done` layers ours holds [new_k, ..., new_1, input]; torchvision's [input, new_1, ..., new_k].
    """
    parts = [torch.arange(block_input + (j - 1) * growth_rate, block_input + j * growth_rate)
             for j in range(layers_done, 0, -1)]
    return torch.cat(parts + [torch.arange(block_input)])


_TV_LAYER = re.compile(r"^features\.denseblock(\d+)\.denselayer(\d+)\.(norm1|conv1|norm2|conv2)\.(.+)$")
_TV_TRANS = re.compile(r"^features\.transition(\d+)\.(norm|conv)\.(.+)$")


def torchvision_densenet_remap(model: CifarDenseNet, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision DenseNet state dict -> ours, with input channels permuted to our concatenation order.

    The 7x7 stem (and its BN, which ours lacks) and the classifier are dropped (new stem, new head).
    """
    g = model.growth_rate
    blocks = [len(getattr(model, f"dense{i}")) for i in range(1, model.num_blocks + 1)]
    out: dict[str, torch.Tensor] = {}

    def permuted(t: torch.Tensor, order: torch.Tensor, conv: bool) -> torch.Tensor:
        if t.ndim == 0:  # num_batches_tracked
            return t
        return t[:, order] if conv else t[order]

    for key, t in source.items():
        if m := _TV_LAYER.match(key):
            b, i, part, rest = int(m[1]), int(m[2]), m[3], m[4]
            target = f"dense{b}.{i - 1}.{part.replace('norm', 'bn')}.{rest}"
            if part in ("norm1", "conv1"):  # these see the block's concatenation so far
                order = cifar_channel_order(model.block_inputs[b - 1], g, i - 1)
                t = permuted(t, order, conv=part == "conv1")
            out[target] = t
        elif m := _TV_TRANS.match(key):
            b, part, rest = int(m[1]), m[2], m[3]
            order = cifar_channel_order(model.block_inputs[b - 1], g, blocks[b - 1])
            out[f"trans{b}.{'bn' if part == 'norm' else 'conv'}.{rest}"] = permuted(t, order, conv=part == "conv")
        elif key.startswith("features.norm5."):
            order = cifar_channel_order(model.block_inputs[-1], g, blocks[-1])
            out["bn." + key[len("features.norm5."):]] = permuted(t, order, conv=False)
    return out


@dataclass
class CifarDenseNetOptions(ModelOptions):
    name: str = "densenet121_cifar"
    blocks: list[int] = field(default_factory=lambda: [6, 12, 24, 16])  # layers per dense block
    growth_rate: int = 32
    pretrained: bool = False
    # official: the official `load_state_dict(strict=False)`: torchvision's names (`features.*`) match none
    #           of ours, so nothing is copied and the model stays randomly initialised (as in the paper);
    # remap:    translate torchvision's names and channel order, copying every dense layer, transition and
    #           the final BN (new 3x3 stem and classifier).
    pretrained_keys: str = "official"


@MODELS.register(
    "densenet121_cifar",
    schema=CifarDenseNetOptions,
    capabilities=ModelCapabilities(input_kind="image", family="cnn", input_size=32, variant="official",
                                   pretrained=True),
    summary="CIFAR DenseNet-121: growth 32, [6,12,24,16], 3x3 stem, AvgPool(4) (6.96 M / 7.05 M)",
    source="official definition (kuangliu/pytorch-cifar layout)",
)
def build_densenet121_cifar(opts: CifarDenseNetOptions, *, num_classes: int, input_shape: Optional[tuple],
                            double_backward: bool) -> nn.Module:
    shape = image_shape(input_shape, (3, 32, 32))
    if len(opts.blocks) != 4:
        raise UserError(f"{opts.name}: blocks needs 4 entries (layers per dense block), got {list(opts.blocks)}")
    require_size(opts.name, shape, (32,))  # AvgPool(4) after three halvings: the head expects 32x32
    model = CifarDenseNet(list(opts.blocks), growth_rate=opts.growth_rate, num_classes=num_classes,
                          in_channels=shape[0])
    if opts.pretrained:
        if opts.pretrained_keys not in ("official", "remap"):
            raise UserError(f"{opts.name}: pretrained_keys must be official or remap, got {opts.pretrained_keys!r}")
        source = pt.fetch_torchvision_state_dict(WEIGHTS)
        if opts.pretrained_keys == "remap":
            source = torchvision_densenet_remap(model, source)
        else:  # the official replaced the classifier before loading; names decide the rest
            source = {k: v for k, v in source.items() if not k.startswith("classifier.")}
        report = pt.load_by_name(model, source)
        pt.log_report(opts.name, WEIGHTS, report)
    return model

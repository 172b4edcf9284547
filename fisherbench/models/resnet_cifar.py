"""CIFAR ResNet-18/50/101 as the official code defines them (kuangliu/pytorch-cifar layout).

3x3 stride-1 stem without max-pool, BasicBlock [2,2,2,2] / Bottleneck [3,4,6,3] and [3,4,23,3], 1x1 conv +
BN projection shortcuts, adaptive average pool, linear head, ReLU never in place (as `Image_Classification/src/models/resnet_cifar.py` of the official repository).
Module names and registration order follow the official file (`conv1, bn1, layer1..4, linear`, blocks with
`shortcut`), because two things depend on them: loading torchvision weights by name (`pretrained`) copies
exactly what the official code copied, and the parameter order is what the official AdaFisher's
parameter-to-module matching walks (docs/adafisher.md, the `official` variant).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from fisherbench.core.errors import UserError
from fisherbench.models import pretrained as pt
from fisherbench.models.common import image_shape, require_min_size
from fisherbench.models.registry import MODELS, ModelCapabilities, ModelOptions


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()  # identity (an empty Sequential, as the official file has it)
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))


class CifarResNet(nn.Module):
    def __init__(self, block: type, num_blocks: list[int], num_classes: int, in_channels: int = 3,
                 width: int = 64) -> None:
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 8 * width, num_blocks[3], 2)
        self.linear = nn.Linear(8 * width * block.expansion, num_classes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.relu = nn.ReLU(inplace=False)

    def _make_layer(self, block: type, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.avgpool(out).flatten(1))


PRETRAINED_KEYS = ("official", "remap")


@dataclass
class CifarResNetOptions(ModelOptions):
    name: str = "resnet18_cifar"
    width: int = 64  # channels of the stem and first stage (doubling per stage); 64 is the published network
    # Load torchvision ImageNet weights (transfer-learning table). Only resnet50_cifar / resnet101_cifar.
    pretrained: bool = False
    # official: copy what the official `load_state_dict(strict=False)` copied (body convs and BNs; the
    #           projection shortcuts keep their random init because torchvision calls them `downsample`);
    # remap:    also copy the projection shortcuts (`downsample.*` -> `shortcut.*`).
    # The 3x3 stem conv and the classifier are new in both.
    pretrained_keys: str = "official"


_ARCHS = {
    # name: (block, blocks per stage, torchvision weights or None)
    "resnet18_cifar": (BasicBlock, [2, 2, 2, 2], None),
    "resnet50_cifar": (Bottleneck, [3, 4, 6, 3], "ResNet50_Weights.IMAGENET1K_V2"),
    "resnet101_cifar": (Bottleneck, [3, 4, 23, 3], "ResNet101_Weights.IMAGENET1K_V2"),
}

_DOWNSAMPLE = re.compile(r"^(layer\d+\.\d+)\.downsample\.(\d+)\.(.+)$")


def torchvision_resnet_rename(keys: str) -> Callable[[str], Optional[str]]:
    """Source-key -> target-key map from a torchvision ResNet state dict to `CifarResNet`."""

    def rename(key: str) -> Optional[str]:
        if key.startswith("conv1.") or key.startswith("fc."):
            return None  # new 3x3 stem conv and new classifier (the official code replaced both)
        m = _DOWNSAMPLE.match(key)
        if m:
            return f"{m[1]}.shortcut.{m[2]}.{m[3]}" if keys == "remap" else None
        return key

    return rename


def load_imagenet_weights(model: CifarResNet, name: str, weights: str, keys: str) -> pt.LoadReport:
    if keys not in PRETRAINED_KEYS:
        raise UserError(f"{name}: pretrained_keys must be one of {PRETRAINED_KEYS}, got {keys!r}")
    report = pt.load_by_name(model, pt.fetch_torchvision_state_dict(weights), torchvision_resnet_rename(keys))
    pt.log_report(name, weights, report)
    return report


def _register(name: str, summary: str, params: str) -> None:
    block, blocks, weights = _ARCHS[name]

    @MODELS.register(
        name,
        schema=CifarResNetOptions,
        capabilities=ModelCapabilities(input_kind="image", family="cnn", input_size=32, variant="official",
                                       pretrained=weights is not None),
        summary=f"{summary} ({params})",
        source="official definition (kuangliu/pytorch-cifar layout)",
    )
    def build(opts: CifarResNetOptions, *, num_classes: int, input_shape: Optional[tuple], double_backward: bool):
        channels, h, w = image_shape(input_shape, (3, 32, 32))
        require_min_size(name, (channels, h, w), 8, "its three stride-2 stages downsample 8x")
        model = CifarResNet(block, blocks, num_classes, channels, opts.width)
        if opts.pretrained:
            if weights is None:
                raise UserError(f"{name} has no pretrained weights in the paper; pretrained=true is supported for "
                                 "resnet50_cifar, resnet101_cifar, densenet121_cifar, mobilenetv3_official, "
                                 "mobilenetv3 and resnet50")
            if channels != 3 or opts.width != 64:
                raise UserError(f"{name}: ImageNet weights need 3 input channels and width 64, got "
                                 f"{channels} and {opts.width}")
            load_imagenet_weights(model, name, weights, opts.pretrained_keys)
        return model


_register("resnet18_cifar", "CIFAR ResNet-18: 3x3 stem, no max-pool, BasicBlock [2,2,2,2]", "11.17 M / 11.22 M")
_register("resnet50_cifar", "CIFAR ResNet-50: 3x3 stem, no max-pool, Bottleneck [3,4,6,3]", "23.52 M / 23.71 M")
_register("resnet101_cifar", "CIFAR ResNet-101: 3x3 stem, no max-pool, Bottleneck [3,4,23,3]", "42.51 M / 42.70 M")

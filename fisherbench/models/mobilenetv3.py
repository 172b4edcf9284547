"""MobileNetV3-Large for 32x32 inputs, in two variants.

`mobilenetv3_official`: the official repo's definition (kuan-wang/pytorch-mobilenet-v3 layout, `input_size=32`
so the stem and the second block have stride 1). Its "depthwise" convolutions are **dense** (no `groups`),
which makes it a 70.05 M-parameter network (4.2 M with the standard depthwise convolutions); SE blocks are Linear (no bias) + hard
sigmoid; the head is a bias-free 1x1 conv 960->1280 (no BN), hard-swish, Dropout 0.2, Linear. This is the
network behind the paper's MobileNetV3 numbers.

`mobilenetv3`: the standard architecture (torchvision `mobilenet_v3_large`, depthwise convs, 4.2 M
parameters) with the same two strides set to 1 for 32x32 inputs. Its ImageNet weights load completely.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v3_large
from torchvision.models.mobilenetv3 import InvertedResidual

from fisherbench.core.errors import UserError
from fisherbench.models import pretrained as pt
from fisherbench.models.common import disable_inplace, image_shape, require_min_size
from fisherbench.models.registry import MODELS, ModelCapabilities, ModelOptions

WEIGHTS = "MobileNet_V3_Large_Weights.IMAGENET1K_V2"  # what the official trainer used

# kernel, expansion, out channels, squeeze-excite, nonlinearity, stride (None = 1 at 32x32, 2 at 224x224)
LARGE = [
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", None),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
]


class HardSigmoid(nn.Module):
    def forward(self, x):
        return F.relu6(x + 3.0) / 6.0


class HardSwish(nn.Module):
    def forward(self, x):
        return x * F.relu6(x + 3.0) / 6.0


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=False),
            nn.Linear(channels // reduction, channels, bias=False),
            HardSigmoid(),
        )

    def forward(self, x):
        b, c = x.shape[:2]
        return x * self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)


def _divisible(value: float, divisor: int = 8) -> int:
    """Round to a multiple of `divisor`, not below 90% of `value` (the TF MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _act(nl: str) -> nn.Module:
    return HardSwish() if nl == "HS" else nn.ReLU(inplace=False)


def _last_bn(channels: int, residual: bool) -> nn.Module:
    # The official file wraps the last BN of residual blocks as `lastBN` (for zero-gamma init); the extra
    # nesting changes parameter names only, kept so names match the official ones.
    bn = nn.BatchNorm2d(channels)
    return nn.Sequential(OrderedDict([("lastBN", bn)])) if residual else bn


class OfficialBottleneck(nn.Module):
    def __init__(self, cin: int, exp: int, cout: int, k: int, stride: int, se: bool, nl: str) -> None:
        super().__init__()
        self.use_residual = stride == 1 and cin == cout
        pad = (k - 1) // 2
        if exp == cin:  # no expansion: the (dense) "depthwise" conv comes first
            self.conv1 = nn.Sequential(
                nn.Conv2d(cin, exp, k, stride, pad, bias=False), nn.BatchNorm2d(exp),
                SqueezeExcite(exp) if se else nn.Sequential(), _act(nl))
            self.conv2 = nn.Sequential(nn.Conv2d(exp, cout, 1, bias=False), _last_bn(cout, self.use_residual))
        else:
            self.conv1 = nn.Sequential(nn.Conv2d(cin, exp, 1, bias=False), nn.BatchNorm2d(exp), _act(nl))
            self.conv2 = nn.Sequential(
                nn.Conv2d(exp, exp, k, stride, pad, bias=False),  # dense, as published (no groups=exp)
                nn.BatchNorm2d(exp),
                SqueezeExcite(exp) if se else nn.Sequential(),
                _act(nl),
                nn.Conv2d(exp, cout, 1, bias=False),
                _last_bn(cout, self.use_residual))

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        return out + x if self.use_residual else out


class OfficialMobileNetV3(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, small_input: bool = True, dropout: float = 0.2,
                 width_multiplier: float = 1.0) -> None:
        super().__init__()
        s = 1 if small_input else 2
        wm = width_multiplier
        cin = _divisible(16 * wm)
        last = _divisible(1280 * wm) if wm > 1 else 1280
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, cin, 3, s, 1, bias=False),
                                                 nn.BatchNorm2d(cin), HardSwish())]
        for k, exp, cout, se, nl, stride in LARGE:
            exp, cout = _divisible(exp * wm), _divisible(cout * wm)
            layers.append(OfficialBottleneck(cin, exp, cout, k, s if stride is None else stride, se, nl))
            cin = cout
        # the official scales the (already scaled) last expansion width once more; identical at wm = 1
        head = _divisible(exp * wm)
        layers.append(nn.Sequential(nn.Conv2d(cin, head, 1, bias=False), nn.BatchNorm2d(head), HardSwish()))
        self.featureList = nn.ModuleList(layers)
        self.last_stage_layers = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(head, last, 1, bias=False),
                                               HardSwish())
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        for layer in self.featureList:
            x = layer(x)
        return self.classifier(self.last_stage_layers(x).flatten(1))


@dataclass
class OfficialMobileNetV3Options(ModelOptions):
    name: str = "mobilenetv3_official"
    width_multiplier: float = 1.0  # the official class's option; the paper used 1.0
    dropout: float = 0.2
    # As in the official trainer: torchvision's ImageNet weights loaded by name with strict=False. Their names
    # (`features.*`) match none of this model's (`featureList.*`), and the dense convs could not take the
    # depthwise kernels anyway, so nothing is copied: the paper's "transfer" MobileNetV3 started from random
    # weights. Use model=mobilenetv3 for a real ImageNet initialisation.
    pretrained: bool = False


@MODELS.register(
    "mobilenetv3_official",
    schema=OfficialMobileNetV3Options,
    capabilities=ModelCapabilities(input_kind="image", family="cnn", input_size=32, variant="official",
                                   pretrained=True),
    summary="MobileNetV3-Large for 32x32 as published: dense (not depthwise) convs (70.05 M / 70.16 M)",
    source="official definition (kuan-wang/pytorch-mobilenet-v3 layout)",
)
def build_mobilenetv3_official(opts: OfficialMobileNetV3Options, *, num_classes: int, input_shape: Optional[tuple],
                               double_backward: bool) -> nn.Module:
    c, h, w = image_shape(input_shape, (3, 32, 32))
    # The official switch: 32 (CIFAR) and 56 inputs drop the first two stride-2s.
    require_min_size(opts.name, (c, h, w), 32, "it downsamples 8x at 32x32 and 56x56 and 32x at other sizes")
    model = OfficialMobileNetV3(num_classes, c, small_input=h in (32, 56), dropout=opts.dropout,
                                width_multiplier=opts.width_multiplier)
    if opts.pretrained:
        source = {k: v for k, v in pt.fetch_torchvision_state_dict(WEIGHTS).items()
                  if not k.startswith("classifier.3.")}  # the official replaced this head first
        pt.log_report(opts.name, WEIGHTS, pt.load_by_name(model, source))
    return model


def _hook_safe_inverted_residual():
    class HookSafeInvertedResidual(InvertedResidual):
        """torchvision's block with `result + input` instead of `result += input` (an in-place add on a hooked
        BatchNorm's output breaks full backward hooks, which the official AdaFisher registers). Same parameters
        and names."""

        def forward(self, input):
            result = self.block(input)
            return result + input if self.use_res_connect else result

    return InvertedResidual, HookSafeInvertedResidual


@dataclass
class MobileNetV3Options(ModelOptions):
    name: str = "mobilenetv3"
    width_mult: float = 1.0  # torchvision's width multiplier (ImageNet weights exist for 1.0)
    dropout: float = 0.2
    pretrained: bool = False  # torchvision ImageNet weights (all but the classifier's last Linear)


@MODELS.register(
    "mobilenetv3",
    schema=MobileNetV3Options,
    capabilities=ModelCapabilities(input_kind="image", family="cnn", input_size=32, variant="standard",
                                   pretrained=True),
    summary="MobileNetV3-Large, depthwise (torchvision), stem and block-2 stride 1 for 32x32 (4.21 M / 4.32 M)",
    source="torchvision",
)
def build_mobilenetv3(opts: MobileNetV3Options, *, num_classes: int, input_shape: Optional[tuple],
                      double_backward: bool) -> nn.Module:
    c, h, w = image_shape(input_shape, (3, 32, 32))
    require_min_size(opts.name, (c, h, w), 8, "it downsamples 8x below 128x128 (32x above)")
    if c != 3:
        raise UserError(f"{opts.name} (torchvision) takes 3-channel images, got {c}")
    model = mobilenet_v3_large(weights=None, num_classes=num_classes, dropout=opts.dropout, width_mult=opts.width_mult)
    if h < 128:  # CIFAR-sized: keep the resolution through the stem and the first stride-2 block
        model.features[0][0].stride = (1, 1)
        model.features[2].block[1][0].stride = (1, 1)
    if opts.pretrained:
        source = {k: v for k, v in pt.fetch_torchvision_state_dict(WEIGHTS).items()
                  if not k.startswith("classifier.3.")}
        pt.log_report(opts.name, WEIGHTS, pt.load_by_name(model, source))
    original, hook_safe = _hook_safe_inverted_residual()
    for block in model.modules():
        if type(block) is original:
            block.__class__ = hook_safe
    return disable_inplace(model)

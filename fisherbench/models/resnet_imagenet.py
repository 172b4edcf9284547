"""ResNet-50 with the ImageNet stem (7x7 stride-2 conv + max-pool), from torchvision: the paper's network for
Tiny ImageNet (64x64) and ImageNet (224x224). 23.92 M parameters with 200 classes, 25.56 M with 1000.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models import resnet50

from fisherbench.core.errors import UserError
from fisherbench.models import pretrained as pt
from fisherbench.models.common import disable_inplace, image_shape, require_min_size
from fisherbench.models.registry import MODELS, ModelCapabilities, ModelOptions

WEIGHTS = "ResNet50_Weights.IMAGENET1K_V2"


class HookSafeBottleneck(tv_resnet.Bottleneck):
    """torchvision's Bottleneck with `out = out + identity` instead of `out += identity`: the in-place add on
    the output of a hooked BatchNorm breaks full backward hooks (the reason the official AdaFisher README forbids
    in-place operations). Same parameters/names."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


@dataclass
class ResNet50Options(ModelOptions):
    name: str = "resnet50"
    pretrained: bool = False  # torchvision ImageNet weights for everything but the classifier (new head)


@MODELS.register(
    "resnet50",
    schema=ResNet50Options,
    capabilities=ModelCapabilities(input_kind="image", family="cnn", input_size=224, variant="standard",
                                   pretrained=True),
    summary="ResNet-50 with the ImageNet stem (torchvision) for Tiny ImageNet / ImageNet (23.92 M / 25.56 M)",
    source="torchvision",
)
def build_resnet50(opts: ResNet50Options, *, num_classes: int, input_shape: Optional[tuple],
                   double_backward: bool) -> nn.Module:
    c, h, w = image_shape(input_shape, (3, 224, 224))
    require_min_size(opts.name, (c, h, w), 32, "its stride-2 stem, max-pool and three stride-2 stages downsample 32x")
    model = resnet50(weights=None, num_classes=num_classes)
    if c != 3:
        model.conv1 = nn.Conv2d(c, 64, 7, 2, 3, bias=False)
    if opts.pretrained:
        if c != 3:
            raise UserError(f"{opts.name}: ImageNet weights need 3 input channels, got {c}")
        source = {k: v for k, v in pt.fetch_torchvision_state_dict(WEIGHTS).items() if not k.startswith("fc.")}
        pt.log_report(opts.name, WEIGHTS, pt.load_by_name(model, source))
    for block in model.modules():
        if type(block) is tv_resnet.Bottleneck:
            block.__class__ = HookSafeBottleneck
    return disable_inplace(model)  # torchvision uses ReLU(inplace=True), which breaks module hooks

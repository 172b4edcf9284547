"""A small CNN for the offline default run and for fast tests (conv-BN-ReLU x2, pool, linear head)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from models.registry import MODELS, ModelCapabilities, ModelOptions


@dataclass
class SmallCNNOptions(ModelOptions):
    name: str = "small_cnn"
    width: int = 32
    batch_norm: bool = True


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32, batch_norm: bool = True) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            return layers

        self.features = nn.Sequential(*block(in_channels, width), *block(width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@MODELS.register(
    "small_cnn",
    schema=SmallCNNOptions,
    capabilities=ModelCapabilities(input_kind="image", family="cnn"),
    summary="2-block conv-BN-ReLU-pool CNN + linear head (offline default run, tests)",
    source="fisherbench",
)
def build_small_cnn(opts: SmallCNNOptions, *, num_classes: int, input_shape: Optional[tuple], double_backward: bool):
    in_channels = input_shape[0] if input_shape else 3
    return SmallCNN(in_channels, num_classes, opts.width, opts.batch_norm)

"""A small CNN for the offline default run and for fast tests: two conv-BN-ReLU-pool blocks and an MLP head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from fisherbench.core.errors import UserError
from fisherbench.models.registry import MODELS, ModelCapabilities, ModelOptions


@dataclass
class SmallCNNOptions(ModelOptions):
    name: str = "small_cnn"
    width: int = 32  # channels of the first block (the second has 2x)
    hidden: int = 128  # width of the hidden linear layer (0 = global average pool + linear head)
    batch_norm: bool = True


class SmallCNN(nn.Module):
    def __init__(
        self, in_shape: tuple[int, int, int], num_classes: int, width: int = 32, hidden: int = 128,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        cin, h, w = in_shape

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            return layers + [nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(cin, width), *block(width, 2 * width))
        if hidden:
            flat = 2 * width * (h // 4) * (w // 4)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        else:
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


@MODELS.register(
    "small_cnn",
    schema=SmallCNNOptions,
    capabilities=ModelCapabilities(input_kind="image", family="cnn"),
    summary="2 conv-BN-ReLU-maxpool blocks + MLP head (offline default run, tests); any input size >= 4x4",
    source="fisherbench",
)
def build_small_cnn(opts: SmallCNNOptions, *, num_classes: int, input_shape: Optional[tuple], double_backward: bool):
    shape = tuple(input_shape) if input_shape else (3, 32, 32)
    if len(shape) != 3 or shape[1] < 4 or shape[2] < 4:
        raise UserError(f"small_cnn needs (C, H, W) inputs of at least 4x4, got {shape}")
    return SmallCNN(shape, num_classes, opts.width, opts.hidden, opts.batch_norm)

"""An own model and an own dataset for fisherbench (docs/own-optimizer.md, "Your own model and dataset").

    export PYTHONPATH=/path/to/my_model_and_data
    python -m fisherbench train --config-dir /path/to/my_model_and_data/conf model=mlp data=blobs optimizer=adam
"""
from __future__ import annotations

import torch
from torch import nn

from fisherbench.data.plugins import tensor_bundle


class MLP(nn.Module):
    """A perceptron with one hidden layer; `num_classes` and `input_shape` come from the dataset."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], hidden: int = 64) -> None:
        super().__init__()
        features = 1
        for size in input_shape:
            features *= size
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def blobs(options, context):
    """Gaussian blobs: `options.classes` centres in `options.dims` dimensions, `options.spread` noise; fixed
    data (seed 0), 80% train / 20% test."""
    g = torch.Generator().manual_seed(0)
    centres = 2.0 * torch.randn(options.classes, options.dims, generator=g)
    y = torch.randint(0, options.classes, (options.examples,), generator=g)
    x = centres[y] + options.spread * torch.randn(options.examples, options.dims, generator=g)
    cut = int(0.8 * options.examples)
    return tensor_bundle("blobs", (x[:cut], y[:cut]), (x[cut:], y[cut:]), options, context,
                         num_classes=options.classes, description=f"{options.classes} Gaussian blobs")

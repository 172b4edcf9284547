"""The official variants keep the official module layout: replaying the official AdaFisher's parameter matching
(fisherbench/optim/adafisher/official_map.py) on them reproduces what the official optimizer does on the official
model files
(measured by running it: the CCT head and 16.25 M of Tiny Swin's parameters are never updated).

If a model's parameter or module order drifted from the official file, these outcomes would change.
"""
from __future__ import annotations

import pytest
import torch

from fisherbench.models import create_model
from fisherbench.optim.adafisher import official_map

TRACKED = ("Linear", "Conv2d", "BatchNorm2d", "LayerNorm")  # the official tracks these class names exactly


def _replay(name: str, **kwargs):
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    names, params = zip(*model.named_parameters())
    modules = [m for m in model.modules() if type(m).__name__ in TRACKED]
    outcome = official_map.official_assignment(list(params), modules)
    module_names = {id(m): n for n, m in model.named_modules()}
    trainable = {n: a for n, p, a in zip(names, params, outcome) if p.requires_grad}  # frozen: never stepped
    return model, trainable, [module_names[id(m)] for m in modules]


def _never(assignments) -> list[str]:
    """Trainable parameters the official loop never updates."""
    return [n for n, a in assignments.items() if isinstance(a, official_map.NeverUpdated)]


def _ones(assignments) -> list[str]:
    return [n for n, a in assignments.items() if isinstance(a, official_map.OnesF)]


@pytest.mark.parametrize("name", ["resnet18_cifar", "mobilenetv3_official", "focalnet_official"])
def test_cnn_layouts_are_matched_cleanly(name):
    model, assignments, modules = _replay(name, num_classes=10)
    assert _never(assignments) == [] and _ones(assignments) == []
    # and every parameter got the F of the module it belongs to
    owner = {f"{mod}.{p}": mod for mod in modules for p in ("weight", "bias")}
    for param, a in assignments.items():
        assert modules[a.module] == owner[param], param


def test_cct_head_is_never_trained_and_positions_get_f_one():
    _, assignments, _ = _replay("cct_2_3x2_official", num_classes=10)
    assert _never(assignments) == ["classifier.fc.weight", "classifier.fc.bias"]
    assert _ones(assignments) == ["classifier.positional_emb"]


def test_tiny_swin_loses_61_percent_of_its_parameters():
    model, assignments, _ = _replay("swin_tiny_official", num_classes=10)
    never = _never(assignments)
    params = dict(model.named_parameters())
    assert len(never) == 42
    assert sum(params[n].numel() for n in never) == pytest.approx(16.25e6, rel=1e-3)
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert set(never) == {n for n in trainable if n.startswith(("stage4.", "mlp_head.", "stage3.layers.2.1."))}


def test_gpt1_last_mlp_never_updated_and_block0_fs_shuffled():
    _, assignments, modules = _replay("gpt1_small", num_classes=1000, input_shape=(256,))
    assert sorted(_never(assignments)) == sorted(f"layers.3.{m}.{p}" for m in ("mlp.0", "mlp.2", "norm2")
                                                 for p in ("weight", "bias"))
    attn = "layers.0.attention."
    module_of = {n: modules[a.module] for n, a in assignments.items() if isinstance(a, official_map.ModuleF)}
    assert module_of[attn + "weights_Q.weight"] == attn + "weights_K"  # Q gets K's F
    assert module_of[attn + "weights_V.weight"] == attn + "weights_Y"  # V gets Y's F
    assert assignments[attn + "weights_Y.weight"].f_shape == (768,)  # a (d,)-shaped F, broadcast
    assert {"layers.0.norm1.weight", "layers.0.norm1.bias"} & set(_ones(assignments))

"""Every model trains: forward + backward with AdaFisher-style hooks, one AdaFisher step, and a 2-step run of the
trainer on a matching synthetic dataset.

The default (fast) tests build each model with the same code at a reduced width/depth or input size; the
full-size versions of the same tests are marked `slow`.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fisherbench.models import MODELS, create_model

# name: (options, input shape, classes) at full size (the paper's inputs)
FULL = {
    "small_cnn": ({}, (3, 32, 32), 10),
    "resnet18_cifar": ({}, (3, 32, 32), 10),
    "resnet50_cifar": ({}, (3, 32, 32), 10),
    "resnet101_cifar": ({}, (3, 32, 32), 100),
    "densenet121_cifar": ({}, (3, 32, 32), 10),
    "mobilenetv3_official": ({}, (3, 32, 32), 10),
    "mobilenetv3": ({}, (3, 32, 32), 10),
    "swin_tiny_official": ({}, (3, 32, 32), 10),
    "swin_tiny": ({}, (3, 32, 32), 10),
    "swin_big": ({}, (3, 64, 64), 200),
    "focalnet_official": ({}, (3, 32, 32), 10),
    "focalnet": ({}, (3, 32, 32), 10),
    "cct_2_3x2_official": ({}, (3, 32, 32), 10),
    "cct_2_3x2": ({}, (3, 32, 32), 100),
    "resnet50": ({}, (3, 64, 64), 200),
    "gpt1_small": ({}, (64,), 500),
    "tiny_gpt": ({}, (16,), 64),
    "tiny_vit": ({}, (3, 32, 32), 10),
}

# The same code, small: fewer channels/blocks where the schema has such options, else a smaller input.
FAST = {
    **FULL,
    "resnet18_cifar": ({"width": 8}, (3, 32, 32), 10),
    "resnet50_cifar": ({"width": 8}, (3, 16, 16), 10),
    "resnet101_cifar": ({"width": 8}, (3, 16, 16), 10),
    "densenet121_cifar": ({"blocks": [1, 2, 1, 1], "growth_rate": 8}, (3, 32, 32), 10),
    "mobilenetv3_official": ({"width_multiplier": 0.25}, (3, 32, 32), 10),
    "mobilenetv3": ({"width_mult": 0.25}, (3, 16, 16), 10),
    "swin_tiny_official": ({"hidden_dim": 8, "head_dim": 4, "heads": [1, 1, 2, 2], "layers": [2, 2, 2, 2]},
                           (3, 32, 32), 10),
    "swin_tiny": ({"embed_dim": 8, "num_heads": [1, 1, 2, 2], "depths": [2, 2, 2, 2]}, (3, 32, 32), 10),
    "swin_big": ({"hidden_dim": 8, "head_dim": 4, "heads": [1, 1, 2, 2], "layers": [2, 2, 2, 2]},
                 (3, 64, 64), 200),
    "focalnet_official": ({"embed_dim": 8, "depths": [1, 1, 2, 1]}, (3, 32, 32), 10),
    "focalnet": ({"embed_dim": 8, "depths": [1, 1, 2, 1]}, (3, 32, 32), 10),
    "cct_2_3x2_official": ({"dim": 32}, (3, 32, 32), 10),
    "resnet50": ({}, (3, 32, 32), 10),
    "gpt1_small": ({"layers": 1}, (16,), 64),
}

TRACKED = ("Linear", "Conv2d", "BatchNorm2d", "LayerNorm")  # AdaFisher's tracked classes, by exact name


def test_every_registered_model_is_exercised():
    assert set(FULL) == set(MODELS.names()) == set(FAST)


def _build(name: str, case: tuple, double_backward: bool = False) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    options, shape, classes = case
    model = create_model(name, num_classes=classes, input_shape=shape, double_backward=double_backward, **options)
    g = torch.Generator().manual_seed(0)
    if MODELS.get(name).capabilities.input_kind == "tokens":
        x = torch.randint(0, classes, (2, *shape), generator=g)
        y = torch.randint(0, classes, (2, *shape), generator=g)
    else:
        x = torch.randn(2, *shape, generator=g)
        y = torch.randint(0, classes, (2,), generator=g)
    return model, x, y


def _loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs.flatten(0, -2), targets.flatten())


def _forward_backward_with_hooks(name: str, case: tuple) -> None:
    """Forward + backward with a forward hook and a *full* backward hook on every tracked module, as the
    official AdaFisher registers them: an in-place op on a hooked module's output raises here."""
    model, x, y = _build(name, case)
    model.train()
    seen_in, seen_out = set(), set()
    handles = []
    for mod_name, module in model.named_modules():
        if type(module).__name__ in TRACKED:
            handles.append(module.register_forward_hook(
                lambda m, inp, out, n=mod_name: seen_in.add(n) if torch.is_tensor(inp[0]) else None))
            handles.append(module.register_full_backward_hook(
                lambda m, gin, gout, n=mod_name: seen_out.add(n) if gout[0] is not None else None))
    outputs = model(x)
    expected = (2, case[1][0], case[2]) if outputs.ndim == 3 else (2, case[2])
    assert tuple(outputs.shape) == expected
    _loss(outputs, y).backward()
    for h in handles:
        h.remove()
    hooked = {n for n, m in model.named_modules() if type(m).__name__ in TRACKED}
    assert hooked and seen_in == hooked and seen_out == hooked, sorted(hooked - seen_out)[:5]
    for p_name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), p_name


@pytest.mark.parametrize("name", sorted(FAST))
def test_forward_backward_with_hooks(name):
    _forward_backward_with_hooks(name, FAST[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FULL))
def test_forward_backward_with_hooks_full_size(name):
    _forward_backward_with_hooks(name, FULL[name])


# ----------------------------------------------------------------------------------------------- AdaFisher
def _adafisher():
    from fisherbench.optim import AdaFisher

    return AdaFisher


def _adafisher_steps(name: str, case: tuple) -> None:
    AdaFisher = _adafisher()
    model, x, y = _build(name, case)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = AdaFisher(model, lr=1e-5)  # F ~ damping 1e-3: lr 1e-3 would be SGD at lr ~1 on a batch of 2
    for _ in range(2):  # step 0 collects statistics through the hooks; step 1 reuses them
        opt.zero_grad()
        loss = _loss(model(x), y)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    after = dict(model.named_parameters())
    assert all(torch.isfinite(after[n]).all() for n in before)
    changed = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert changed, "AdaFisher changed no parameter"


# By default a representative subset (every architecture family, the frozen-parameter layouts, the official
# dense convs, timm's channels-first LayerNorm2d in `focalnet`); every model at full size in the slow test.
ADAFISHER_FAST = ["cct_2_3x2_official", "densenet121_cifar", "focalnet", "focalnet_official", "gpt1_small",
                  "mobilenetv3_official", "resnet50_cifar", "swin_tiny_official", "tiny_gpt", "tiny_vit"]


@pytest.mark.parametrize("name", ADAFISHER_FAST)
def test_adafisher_trains_two_steps(name):
    _adafisher_steps(name, FAST[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FULL))
def test_adafisher_trains_two_steps_full_size(name):
    _adafisher_steps(name, FULL[name])


# ------------------------------------------------------------------------------------------------ trainer
def _runner():
    from fisherbench.engine.compose import compose_config
    from fisherbench.engine.lifecycle import run

    return compose_config, run


# model -> the synthetic data config with its shape
SYNTHETIC = {
    "resnet50": "synthetic_tiny_imagenet",
    "swin_big": "synthetic_tiny_imagenet",
    "gpt1_small": "synthetic_wikitext",
    "tiny_gpt": "synthetic_tokens",
}


def _overrides(options: dict) -> list[str]:
    def fmt(v):
        return "[" + ",".join(str(i) for i in v) + "]" if isinstance(v, list) else str(v)

    return [f"model.{k}={fmt(v)}" for k, v in options.items()]


def _two_steps(name: str, options: dict, tmp_path: Path, extra: list[str] = ()) -> None:
    compose_config, run = _runner()
    data = SYNTHETIC.get(name, "synthetic_cifar")
    cfg = compose_config([f"model={name}", f"data={data}", "optimizer=adam", "budget=steps", "budget.steps=2",
                          "logger=none", f"results_dir={tmp_path}", "eval.max_batches=1", "data.batch_size=4",
                          *_overrides(options), *extra])
    result = run(cfg)
    assert result.status == "completed", result.summary


@pytest.mark.parametrize("name", ["swin_tiny_official"])  # tiny_gpt: see the AdaHessian run below
def test_trainer_runs_two_steps(name, tmp_path):
    _two_steps(name, FAST[name][0], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FULL))
def test_trainer_runs_two_steps_full_size(name, tmp_path):
    _two_steps(name, {}, tmp_path)


ATTENTION_MODELS = ["tiny_vit", "cct_2_3x2_official", "cct_2_3x2", "swin_tiny_official", "swin_tiny",
                    "swin_big", "gpt1_small"]


@pytest.mark.parametrize("name", ["tiny_gpt"])
def test_trainer_runs_adahessian_through_attention(name, tmp_path):
    """AdaHessian differentiates twice: the trainer builds the model with double_backward=True."""
    _two_steps(name, FAST[name][0], tmp_path, ["optimizer=adahessian"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ATTENTION_MODELS)
def test_trainer_runs_adahessian_through_attention_reduced_models(name, tmp_path):
    _two_steps(name, FAST[name][0], tmp_path, ["optimizer=adahessian"])

"""Every registered optimizer through the real trainer (tiny CNN and tiny GPT), and through a checkpoint
save/resume that must continue bitwise."""
from __future__ import annotations

import math

import pytest
import torch

from fisherbench import optim
from fisherbench.optim import OPTIMIZERS

TINY_CNN = ["model=small_cnn", "model.width=4", "model.hidden=16", "data=synthetic_image", "data.shape=[3,8,8]",
            "data.num_train=32", "data.num_test=16", "data.batch_size=16"]
TINY_GPT = ["model=tiny_gpt", "model.layers=1", "model.d_model=16", "model.heads=2", "model.mlp_hidden=32",
            "model.freeze_embeddings=false", "data=synthetic_tokens", "data.seq_len=8", "data.vocab_size=32",
            "data.num_train=16", "data.num_test=8"]


@pytest.fixture
def captured_adapters(monkeypatch):
    """Record (model, parameters before training, adapter) for every optimizer the runner builds."""
    records = []
    original = optim.build_optimizer

    def build(options, model, context=None):
        before = {n: p.detach().clone() for n, p in optim.registry.unwrap(model).named_parameters() if p.requires_grad}
        adapter = original(options, model, context)
        records.append((model, before, adapter))
        return adapter

    monkeypatch.setattr(optim, "build_optimizer", build)
    return records


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("model", ["cnn", "gpt"])
@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_trains_three_steps_through_the_runner(name, model, tmp_path, captured_adapters):
    from fisherbench.engine.compose import compose_config
    from fisherbench.engine.lifecycle import run

    base = TINY_CNN if model == "cnn" else TINY_GPT
    cfg = compose_config([*base, f"optimizer={name}", "budget=steps", "budget.steps=3", "logger=none",
                          "eval.max_batches=1", "checkpoint.enabled=false", f"results_dir={tmp_path}"])
    result = run(cfg)
    assert result.summary["status"] == "completed", result.summary.get("error")
    assert result.summary["steps"] == 3
    (trained, before, adapter), = captured_adapters
    params = dict(optim.registry.unwrap(trained).named_parameters())
    assert all(torch.isfinite(params[n]).all() for n in before), name
    unchanged = [n for n, p0 in before.items() if torch.equal(params[n].detach(), p0)]
    assert not unchanged, f"{name} left {unchanged} unchanged"
    assert math.isfinite(result.summary["final"]["train/loss"])
    assert adapter.state_bytes() > 0


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_checkpoint_resume_continues_bitwise(name, tmp_path):
    """Train 2 steps, save through fisherbench.core.checkpoint (which refuses anything but tensors and plain data),
    load it back with load_latest (torch.load(weights_only=True)), rebuild model + adapter from scratch and
    continue 3 steps: identical parameters to the uninterrupted run (same RNG for stochastic curvature)."""
    from fisherbench import models
    from fisherbench.core import checkpoint

    def make():
        torch.manual_seed(7)
        return models.create_model("small_cnn", num_classes=5, input_shape=(3, 8, 8), width=4, hidden=16)

    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(5)]
    options = {"name": name}
    model = make()
    adapter = optim.build_optimizer(options, model)
    for inputs, targets in batches[:2]:
        adapter.train_step(model, inputs, targets, torch.nn.functional.cross_entropy)
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, {"run_id": name, "model": model.state_dict(), "optimizer": adapter.state_dict(),
                           "state": {"step": 2}, "ledger": {}, "rng": checkpoint.rng_state()})
    payload, notes = checkpoint.load_latest(path, name)
    assert payload is not None, notes

    resumed_model = make()
    resumed_model.load_state_dict(payload["model"])
    resumed = optim.build_optimizer(options, resumed_model)
    resumed.load_state_dict(payload["optimizer"])
    rng = torch.get_rng_state()
    for inputs, targets in batches[2:]:
        adapter.train_step(model, inputs, targets, torch.nn.functional.cross_entropy)
    torch.set_rng_state(rng)
    for inputs, targets in batches[2:]:
        resumed.train_step(resumed_model, inputs, targets, torch.nn.functional.cross_entropy)
    for (n, a), b in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), f"{name}: {n} differs after resume"

"""pytorch_optimizer baselines through our adapters: AdaHessian's Hutchinson diagonal, when create_graph is
used, schedule-free evaluation weights, Muon's parameter split."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisherbench.optim import build_optimizer, row
from fisherbench.optim.pytorch_optimizer_entries import muon_split


class Quadratic(nn.Module):
    """Outputs its parameter; the loss below makes the objective 0.5 θᵀHθ + bᵀθ."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.linspace(-1.0, 1.0, n, dtype=torch.float64))

    def forward(self, inputs):
        return self.theta


def test_adahessian_hutchinson_diagonal_is_unbiased_on_a_quadratic():
    n, probes = 6, 4000
    gen = torch.Generator().manual_seed(0)
    root = torch.randn(n, n, generator=gen, dtype=torch.float64)
    hessian = root @ root.T + torch.diag(torch.arange(1.0, n + 1, dtype=torch.float64))
    b = torch.randn(n, generator=gen, dtype=torch.float64)

    def loss_fn(theta, _targets):
        return 0.5 * theta @ hessian @ theta + b @ theta

    model = Quadratic(n)
    adapter = build_optimizer({"name": "adahessian", "num_samples": probes, "lr": 1e-3}, model)
    torch.manual_seed(1)
    adapter.train_step(model, torch.zeros(1), torch.zeros(1), loss_fn)
    estimate = adapter.optimizer.state[model.theta]["hessian"]
    # each Rademacher probe gives H_ii + Σ_{j≠i} H_ij z_i z_j: mean diag(H), variance Σ_{j≠i} H_ij²
    off_diagonal = hessian - torch.diag(torch.diagonal(hessian))
    std_of_mean = (off_diagonal.square().sum(1) / probes).sqrt()
    z = (estimate - torch.diagonal(hessian)) / std_of_mean
    assert z.abs().max() < 4.5, z
    assert not torch.allclose(estimate, torch.diagonal(hessian), rtol=1e-9)  # it is an estimate, not H itself


def test_hutchinson_optimizers_keep_the_graph_only_on_hessian_steps():
    """create_graph=True only when the library draws probes (every update_period steps)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    adapter = build_optimizer({"name": "sophia", "update_period": 2}, model)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    seen = []
    original_step = adapter.optimizer.step

    def step(*args, **kwargs):
        seen.append(model[0].weight.grad.requires_grad)
        return original_step(*args, **kwargs)

    adapter.optimizer.step = step
    for _ in range(4):
        adapter.train_step(model, x, y, F.cross_entropy)
        # the double-backward graph is dropped right after the step, not kept until the next zero_grad
        assert all(p.grad is None or not p.grad.requires_grad for p in model.parameters())
    assert seen == [True, False, True, False]


def test_adahessian_refuses_ddp():
    from fisherbench.optim import BuildContext

    with pytest.raises(ValueError, match="does not support DistributedDataParallel"):
        build_optimizer({"name": "adahessian"}, nn.Linear(2, 2), BuildContext(distributed=True))


def test_schedulefree_evaluates_with_the_averaged_weights_and_restores_the_training_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    adapter = build_optimizer({"name": "schedulefree_adamw", "lr": 0.05}, model)
    assert row("schedulefree_adamw").overrides("eval_weights")
    gen = torch.Generator().manual_seed(1)
    z_history = []
    for _ in range(5):
        x, y = torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)
        adapter.train_step(model, x, y, F.cross_entropy)
        z_history.append([adapter.optimizer.state[p]["z"].clone() for p in model.parameters()])
    # constant lr, r = 0, no warm-up: averaging weights c_t = 1/t, so x_T is the plain mean of z_1..z_T
    averaged = [torch.stack([zs[i] for zs in z_history]).mean(0) for i in range(len(z_history[0]))]
    training = [p.detach().clone() for p in model.parameters()]
    with adapter.eval_weights():
        for p, expected in zip(model.parameters(), averaged):
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
        assert not all(torch.allclose(p, t) for p, t in zip(model.parameters(), training))
    for p, t in zip(model.parameters(), training):
        assert torch.equal(p, t)  # exactly the training iterate, so evaluation cannot perturb training
    # and training continues as if no evaluation had happened
    twin = copy.deepcopy(model)
    twin_adapter = build_optimizer({"name": "schedulefree_adamw", "lr": 0.05}, twin)
    twin_adapter.load_state_dict(copy.deepcopy(adapter.state_dict()))
    x, y = torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    adapter.train_step(model, x, y, F.cross_entropy)
    twin_adapter.train_step(twin, x, y, F.cross_entropy)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.block = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))
        self.norm = nn.LayerNorm(6)
        self.lm_head = nn.Linear(6, 11, bias=False)

    def forward(self, tokens):
        return self.lm_head(self.norm(self.block(self.embed(tokens))))


def test_muon_sends_embeddings_head_and_vectors_to_adamw():
    model = TinyLM()
    muon, adamw = muon_split(model, [])
    assert [n for n, _ in muon] == ["block.0.weight", "block.2.weight"]
    assert {n for n, _ in adamw} == {"embed.weight", "block.0.bias", "block.2.bias", "norm.weight", "norm.bias",
                                     "lm_head.weight"}
    adapter = build_optimizer({"name": "muon"}, model)
    flags = [(g["use_muon"], len(g["params"])) for g in adapter.param_groups]
    assert flags == [(True, 2), (False, 6)]
    tokens = torch.randint(0, 11, (2, 5))
    out = adapter.train_step(model, tokens, tokens, lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten()))
    assert torch.isfinite(out.loss)
    # explicit list overrides the automatic head/embedding detection
    muon, adamw = muon_split(model, ["block.2"])
    assert [n for n, _ in muon] == ["block.0.weight", "lm_head.weight"]  # embeddings stay on AdamW

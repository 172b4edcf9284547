"""The three implementations of the functional AdaFisher update give the same trajectories.

`single` (a loop over tensors) is the reference; `foreach` must match it bitwise on CPU (its grouped kernels
run the same per-tensor arithmetic), also when F is formed in many small chunks; `compiled` (one fused
torch.compile kernel per tracked tensor, F never materialised) must match to rounding. Every variant, both
weight-decay forms, a bare untracked parameter (constant F), BatchNorm/LayerNorm factors, and the official
variant's broadcasting F are covered.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisherbench.optim.adafisher.functional as adafisher_functional
from fisherbench.optim import AdaFisher, AdaFisherW


class Net(nn.Module):
    """Conv -> BN -> tanh -> Linear -> LayerNorm -> Linear, times a bare (untracked) parameter."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc1 = nn.Linear(3 * 4 * 4, 6)
        self.norm = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x))).flatten(1)
        return self.fc2(torch.tanh(self.norm(self.fc1(h)))) * self.scale


class BroadcastNet(nn.Module):
    """A bare (4, 4) parameter first in parameters() order: the official loop hands it fc1's weight F, then
    hands fc1.weight fc1's bias F (shape (4,), broadcast over the rows), fc1.bias F = 1, and never reaches
    fc2."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.eye(4) + 0.1 * torch.randn(4, 4))
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x.flatten(1)[:, :4] @ self.mix)))


def batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 2, 4, 4, generator=gen), torch.randint(0, 3, (5,), generator=gen)) for _ in range(n)]


def run(model_cls, cls, variant, implementation, steps=6, **kw):
    torch.manual_seed(0)
    model = model_cls()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untracked-parameter notice
        opt = cls(model, lr=3e-3, update_interval=2, weight_decay=0.02, variant=variant,
                  implementation=implementation, **kw)
    for x, y in batches(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt


# (Net under the official loop would crash: its root parameter `scale` comes first and takes conv's F)
CASES = [(Net, cls, v) for cls in (AdaFisher, AdaFisherW) for v in ("default", "paper", "constf")]
CASES += [(BroadcastNet, cls, "official") for cls in (AdaFisher, AdaFisherW)]
IDS = [f"{m.__name__}-{c.__name__}-{v}" for m, c, v in CASES]


@pytest.mark.parametrize("model_cls,cls,variant", CASES, ids=IDS)
def test_foreach_equals_single_tensor_bitwise(model_cls, cls, variant, monkeypatch):
    reference, _ = run(model_cls, cls, variant, "single")
    grouped, opt = run(model_cls, cls, variant, "foreach")
    for name, p in reference.items():
        assert torch.equal(grouped[name], p), name
    # F formed in chunks of at most 8 elements (most tensors alone in a chunk, or together with small ones)
    monkeypatch.setattr(adafisher_functional, "_CHUNK_ELEMENTS", 8)
    monkeypatch.setattr(adafisher_functional, "_CHUNK_ELEMENTS_CPU", 8)
    chunked, _ = run(model_cls, cls, variant, "foreach")
    for name, p in reference.items():
        assert torch.equal(chunked[name], p), name


def test_broadcast_net_really_broadcasts_in_the_official_variant():
    _, opt = run(BroadcastNet, AdaFisher, "official", "foreach", steps=1)
    fishers = {opt._names[id(p)]: opt._fishers[id(p)] for p in opt.param_groups[0]["params"]}
    assert fishers["fc1.weight"].shape == (4,)  # fc1's bias F on fc1's weight
    assert fishers["fc1.bias"] == 1.0 and fishers["fc2.weight"] is None


def test_workspace_is_reused_and_bounded():
    _, opt = run(Net, AdaFisher, "default", "foreach", steps=3)
    largest = max(p.numel() for n, p in Net().named_parameters() if n != "scale")
    total = sum(p.numel() for n, p in Net().named_parameters() if n != "scale")
    assert opt._workspace.numel() == max(largest, min(total, adafisher_functional.chunk_elements(torch.device("cpu"))))
    _, single = run(Net, AdaFisher, "default", "single", steps=1)
    assert single._workspace.numel() == largest


def test_functional_rejects_foreach_and_compiled_together():
    with pytest.raises(ValueError, match="not both"):
        adafisher_functional.adafisher([], [], [], [], [], foreach=True, compiled=True, lr=1e-3, beta=0.9,
                                   weight_decay=0.0, damping=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("model_cls,cls,variant", [CASES[0], CASES[4], CASES[-1]], ids=[IDS[0], IDS[4], IDS[-1]])
def test_compiled_matches_single_tensor(model_cls, cls, variant):
    """torch.compile works on CPU with the project's toolchain; the fused kernel rounds differently (F is
    formed as s*h + damping inside the kernel, the step as p - c*m/F); steps are ~lr/damping * m, so the
    parameters (of order 1) differ by a few fp32 ulps."""
    reference, _ = run(model_cls, cls, variant, "single")
    fused, _ = run(model_cls, cls, variant, "compiled")
    for name, p in reference.items():
        torch.testing.assert_close(fused[name], p, rtol=1e-5, atol=2e-6, msg=name)

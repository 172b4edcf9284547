"""variant='official' against an independent re-implementation of the official index-loop step.

The reference below is written from the description of the official `step()` (docs/adafisher.md) and runs the way
the official code does: every step, on the real `.grad` pattern, handing out F tensors and applying the
official per-parameter update. It records which F each parameter received. The optimizer instead replays
the loop once at construction; both must agree on the assignment and on the parameter trajectories.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisherbench.optim import AdaFisher
from fisherbench.optim.adafisher.official_map import (
    ModuleF,
    NeverUpdated,
    OfficialLoopError,
    OnesF,
    official_assignment,
)
from fisherbench.optim.adafisher.stats import kind_of

LR, BETA, WD, LAM = 1e-2, 0.9, 5e-4, 1e-3


class FrozenScale(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.scale = nn.Parameter(torch.full(shape, 0.9), requires_grad=False)

    def forward(self, x):
        return x * self.scale if self.scale.ndim == 1 else x @ self.scale


class PosEmbNet(nn.Module):
    """A bare positional parameter (first in parameters() order) before the layers, as in CCT."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.pos = nn.Parameter(torch.randn(5, 8) * 0.1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: (B, 5, 4)
        return self.head(torch.tanh(self.norm(self.proj(x) + self.pos)).mean(1))


def frozen_vector_model():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), FrozenScale((6,)), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))


def frozen_matrix_model():
    return nn.Sequential(nn.Linear(4, 4), FrozenScale((4, 4)), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4),
                         nn.Tanh(), nn.Linear(4, 3))


MODELS = {
    "frozen_vector": (frozen_vector_model, (6, 4)),  # frozen param -> trailing layers never updated
    "last_module_skipped": (PosEmbNet, (6, 5, 4)),  # the classification head is never trained
    "shuffled": (frozen_matrix_model, (6, 4)),  # a layer gets the next layer's F
}


def tracked_modules(model):
    return [m for m in model.modules() if type(m).__name__ in ("Linear", "Conv2d", "BatchNorm2d", "LayerNorm")]


def official_F(module, factors, names):
    """F of a module as the official code builds it: outer(H, S)^T + lambda, split into weight/bias views."""
    H, S = factors[names[module]]
    full = torch.kron(H.unsqueeze(1), S.unsqueeze(0)).t() + LAM
    if module.bias is None:
        return [full.reshape(module.weight.shape)]
    return [full[:, :-1].reshape(module.weight.shape), full[:, -1:].reshape(module.bias.shape)]


def reference_official_step(model, factors, state, record):
    """The official step on the real gradient pattern: returns nothing, updates params, fills `record`."""
    params, modules = list(model.parameters()), tracked_modules(model)
    names = {m: n for n, m in model.named_modules()}
    ip = im = vector_skips = 0
    for _ in range(len(modules)):
        if params[ip].grad is None:
            ip += 1
            if params[ip].ndim > 1:
                im += 1
            else:
                vector_skips += 1
            if vector_skips == 2:
                im += 1
                vector_skips = 0
            continue
        module = modules[im]
        shapes = [module.weight.shape] + ([module.bias.shape] if module.bias is not None else [])
        if params[ip].shape in shapes:
            handed = official_F(module, factors, names)
            slots = [(names[module], s) for s in ("weight", "bias")[: len(handed)]]
            im += 1
        else:
            handed, slots = [torch.ones_like(params[ip])], ["ones"]
        for f, slot in zip(handed, slots):
            p = params[ip]
            st = state.setdefault(ip, {"step": 0, "m": torch.zeros_like(p)})
            st["step"] += 1
            g = p.grad.add(p, alpha=WD)
            st["m"].mul_(BETA).add_(g, alpha=1 - BETA)
            with torch.no_grad():
                p.addcdiv_(st["m"], f, value=-LR / (1 - BETA ** st["step"]))
            record[ip] = slot
            ip += 1


def describe(model, assignment):
    """official_assignment's outcome in the reference's vocabulary, by parameter index."""
    modules = tracked_modules(model)
    names = {m: n for n, m in model.named_modules()}
    out = {}
    for i, a in enumerate(assignment):
        if isinstance(a, ModuleF):
            out[i] = (names[modules[a.module]], a.slot)
        elif isinstance(a, OnesF):
            out[i] = "ones"
        else:
            assert isinstance(a, NeverUpdated)
    return out


@pytest.mark.parametrize("case", list(MODELS))
def test_official_assignment_and_trajectory_match_the_reference_loop(case):
    build, shape = MODELS[case]
    torch.manual_seed(0)
    model = build()
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="never updated"):
        opt = AdaFisher(model, lr=LR, beta=BETA, damping=LAM, weight_decay=WD, update_interval=2, variant="official")
    gen = torch.Generator().manual_seed(1)
    state, record = {}, {}
    for _ in range(3):
        x, y = torch.randn(*shape, generator=gen), torch.randint(0, 3, (shape[0],), generator=gen)
        for net in (model, reference):
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
        opt.step()
        reference_official_step(reference, opt.fisher_factors(), state, record)
        for (n, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    assert describe(model, official_assignment(list(model.parameters()), tracked_modules(model))) == record
    never = [n for i, (n, p) in enumerate(model.named_parameters()) if p.requires_grad and i not in record]
    assert never  # each case leaves trainable parameters untouched, as the official code does


def test_expected_official_outcomes_are_the_documented_bugs():
    torch.manual_seed(0)
    cases = {
        "last_module_skipped": ["pos: ones", "proj.weight: proj.weight", "proj.bias: proj.bias",
                                "norm.weight: norm.weight", "norm.bias: norm.bias", "head.weight: -", "head.bias: -"],
        "shuffled": ["0.weight: 0.weight", "0.bias: 0.bias", "1.scale: -", "2.weight: 4.weight", "2.bias: 4.bias",
                     "4.weight: ones", "4.bias: -", "6.weight: -", "6.bias: -"],
    }
    for case, expected in cases.items():
        model = MODELS[case][0]()
        got = describe(model, official_assignment(list(model.parameters()), tracked_modules(model)))
        names = [n for n, _ in model.named_parameters()]
        lines = [f"{n}: " + ("-" if i not in got else got[i] if got[i] == "ones" else ".".join(got[i]))
                 for i, n in enumerate(names)]
        assert lines == expected, case


def test_default_variant_updates_every_trainable_parameter_of_the_same_models():
    for build, shape in MODELS.values():
        torch.manual_seed(0)
        model = build()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = AdaFisher(model, lr=LR, update_interval=1)
        F.cross_entropy(model(torch.randn(*shape)), torch.randint(0, 3, (shape[0],))).backward()
        opt.step()
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]) != p.requires_grad, n


def test_a_model_the_official_loop_would_crash_on_is_a_clear_error():
    class Crash(nn.Module):  # a bias-shaped parameter would receive the next layer's (6, 6) weight F
        def __init__(self):
            super().__init__()
            self.mask = nn.Parameter(torch.ones(6), requires_grad=False)
            self.fc1, self.norm, self.fc2, self.fc3 = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.fc3(self.fc2(self.norm(self.fc1(x) * self.mask)))

    model = Crash()
    reference = copy.deepcopy(model)
    reference(torch.randn(2, 4)).sum().backward()
    factors = {}
    for n, m in reference.named_modules():
        kind = kind_of(m)
        if kind is not None:
            factors[n] = (torch.rand(kind.h_length(m)), torch.rand(kind.s_length(m)))
    with pytest.raises(RuntimeError):  # the reference loop fails the same way the official code would
        reference_official_step(reference, factors, {}, {})
    with pytest.raises(OfficialLoopError, match="cannot update parameter"):
        AdaFisher(model, variant="official")

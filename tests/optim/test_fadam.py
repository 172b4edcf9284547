"""FAdam against its equations (an independent numpy computation) and against pytorch_optimizer.FAdam."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisherbench.optim import FAdam, build_optimizer


def reference_step(theta, g, f, m, t, *, lr, beta1, beta2, eps, clip, p, wd):
    """One step of FAdam's six equations (docs/optimizers.md), float64 numpy, one tensor: (θ, f, m) after step t."""
    def rms(x):
        return float(np.sqrt(np.mean(x * x)))

    g = np.asarray(g, dtype=np.float64)
    b2 = beta2 * (1 - beta2 ** (t - 1)) / (1 - beta2**t)
    f = b2 * f + (1 - b2) * g * g
    eps_t = eps * min(1.0, rms(g)) if rms(g) > 0 else eps
    gbar = g / (f**p + eps_t)
    gbar = gbar / max(1.0, rms(gbar) / clip)
    m = beta1 * m + (1 - beta1) * gbar
    w = theta / (f**p + eps_t)
    w = w / max(1.0, rms(w) / clip)
    return theta - lr * (m + wd * w), f, m


def reference_fadam(thetas, grads_per_step, **hp):
    """FAdam's six equations, one tensor at a time. `grads_per_step[t][i]` may be None (no gradient for
    tensor i at step t: it is skipped and its own step counter does not advance)."""
    thetas = [np.array(t, dtype=np.float64) for t in thetas]
    f = [np.zeros_like(t) for t in thetas]
    m = [np.zeros_like(t) for t in thetas]
    steps = [0] * len(thetas)
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            if g is None:
                continue
            steps[i] += 1
            thetas[i], f[i], m[i] = reference_step(thetas[i], g, f[i], m[i], steps[i], **hp)
    return thetas, f, m


def _run_ours(thetas, grads_per_step, **hp):
    params = [nn.Parameter(torch.tensor(t, dtype=torch.float64)) for t in thetas]
    opt = FAdam(params, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"], clip=hp["clip"], p=hp["p"],
                weight_decay=hp["wd"])
    for grads in grads_per_step:
        for prm, g in zip(params, grads):
            prm.grad = None if g is None else torch.tensor(g, dtype=torch.float64)
        opt.step()
    return params, opt


# Three tensors, three steps. Chosen so every branch of the equations is exercised:
#  * tensor 0: large gradients (RMS > 1: ε_t = ε); the clip of w is inactive at its step 3;
#  * tensor 1: tiny gradients (RMS < 1: ε_t = ε·RMS) with a zero entry (f = 0 there at step 1); RMS(ḡ) > c
#    at step 2, so the clip of ḡ is active;
#  * tensor 2: no gradient at step 1, so its own step 1 happens at the trainer's step 2 (β̂2 = 0 again).
THETAS = [
    [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]],
    [0.1, -0.2, 0.3, 0.0],
    [[1.0, -1.0], [0.5, 2.0]],
]
GRADS = [
    [[[3.0, -2.0, 0.5], [1.0, 4.0, -6.0]], [1e-3, 0.0, -2e-3, 5e-4], None],
    [[[-1.0, 2.5, 0.5], [0.3, -0.2, 1.0]], [2e-3, 1e-3, 1e-3, -4e-3], [[0.2, -0.1], [0.05, 0.3]]],
    [[[0.7, 0.1, -3.0], [2.0, 0.0, 0.4]], [-1e-3, 3e-3, 0.0, 2e-3], [[-0.1, 0.4], [0.2, -0.2]]],
]
HP = dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-3, clip=1.0, p=0.5, wd=0.1)


def test_three_steps_match_the_equations():
    expected, f_exp, m_exp = reference_fadam(THETAS, GRADS, **HP)
    params, opt = _run_ours(THETAS, GRADS, **HP)
    for prm, exp, fe, me in zip(params, expected, f_exp, m_exp):
        np.testing.assert_allclose(prm.detach().numpy(), exp, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(opt.state[prm]["fisher"].numpy(), fe, rtol=1e-12, atol=1e-16)
        np.testing.assert_allclose(opt.state[prm]["momentum"].numpy(), me, rtol=1e-12, atol=1e-14)
    assert [opt.state[p]["step"] for p in params] == [3, 3, 2]


def test_first_step_fisher_is_the_squared_gradient():
    # β̂2 = 0 at t = 1, so f = g²; with p = 0.5, ḡ = g / (|g| + ε_t): entries ±1 before clipping, RMS ≈ 1
    params, opt = _run_ours(THETAS[:1], [GRADS[0][:1]], **{**HP, "eps": 0.0, "wd": 0.0})
    g = np.array(GRADS[0][0])
    np.testing.assert_allclose(opt.state[params[0]]["fisher"].numpy(), g * g)
    np.testing.assert_allclose(opt.state[params[0]]["momentum"].numpy(), 0.1 * np.sign(g))


def test_p_other_than_half_and_no_decay():
    hp = {**HP, "p": 0.75, "wd": 0.0, "clip": 0.5}
    expected, _, _ = reference_fadam(THETAS, GRADS, **hp)
    params, _ = _run_ours(THETAS, GRADS, **hp)
    for prm, exp in zip(params, expected):
        np.testing.assert_allclose(prm.detach().numpy(), exp, rtol=1e-12, atol=1e-14)


def test_all_zero_gradient_stays_finite():
    params, _ = _run_ours([[1.0, -2.0]], [[[0.0, 0.0]], [[0.0, 0.0]]], **HP)
    assert torch.isfinite(params[0]).all()


def test_entries_without_gradient_take_nearly_all_of_the_weight_decay():
    """A dead input feature (always 0) leaves a weight column whose gradient is always 0: f = 0 there, so
    w = θ/ε_t dwarfs every other entry of w and, after the RMS clip, the dead entries share all of it. Each
    then shrinks by the factor 1 − lr·λ·c·√N/‖θ_dead‖ per step (N entries in the tensor), far more than the
    nominal lr·λ, while m stays 0 there. Pinned against a brute-force run of the equations (its own model copy
    and autograd), against that closed form, and against pytorch_optimizer (it does the same)."""
    from pytorch_optimizer import FAdam as LibFAdam

    lr, wd, steps = 1e-2, 0.1, 5
    hp = dict(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, clip=1.0, p=0.5, wd=wd)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    brute, lib_model = copy.deepcopy(model), copy.deepcopy(model).float()
    dead0 = model[0].weight[:, 0].detach().clone()
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(steps):
        x = torch.randn(16, 12, generator=gen, dtype=torch.float64)
        x[:, 0] = 0.0  # feature 0 is dead: column 0 of the first weight never gets a gradient
        data.append((x, torch.randint(0, 3, (16,), generator=gen)))

    ours = FAdam(model.parameters(), lr=lr, weight_decay=wd)
    lib = LibFAdam(lib_model.parameters(), lr=lr, weight_decay=wd)
    state = {id(q): (np.zeros(q.shape), np.zeros(q.shape)) for q in brute.parameters()}
    for t, (x, y) in enumerate(data, start=1):
        for net, opt in ((model, ours), (lib_model, lib)):
            opt.zero_grad()
            F.cross_entropy(net(x.to(next(net.parameters()).dtype)), y).backward()
            opt.step()
        brute.zero_grad()
        F.cross_entropy(brute(x), y).backward()
        with torch.no_grad():
            for q in brute.parameters():
                f, m = state[id(q)]
                theta, f, m = reference_step(q.numpy(), q.grad.numpy(), f, m, t, **hp)
                state[id(q)] = (f, m)
                q.copy_(torch.from_numpy(theta))
        assert torch.equal(model[0].weight.grad[:, 0], torch.zeros(4, dtype=torch.float64))
    for a, b in zip(model.parameters(), brute.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)

    dead = dead0.clone()
    for _ in range(steps):  # the closed form: every dead entry shrinks by the same factor
        dead = dead * (1 - lr * wd * 1.0 * math.sqrt(model[0].weight.numel()) / dead.norm())
    torch.testing.assert_close(model[0].weight[:, 0].detach(), dead, rtol=1e-6, atol=0)
    torch.testing.assert_close(lib_model[0].weight[:, 0].detach().double(), dead, rtol=1e-5, atol=0)
    shrink = 1 - (dead.norm() / dead0.norm()).item()
    nominal = 1 - (1 - lr * wd) ** steps
    assert shrink > 10 * nominal, (shrink, nominal)  # here 10.6% in 5 steps, 21× the nominal 0.50%


def test_weight_decay_alone_is_the_clipped_natural_gradient_of_theta():
    # zero gradient after a first step: m decays, and θ moves by lr·λ·w with w clipped to RMS ≤ c
    hp = {**HP, "beta1": 0.0}
    expected, _, _ = reference_fadam([[2.0, -4.0]], [[[1.0, 1.0]], [[0.0, 0.0]]], **hp)
    params, _ = _run_ours([[2.0, -4.0]], [[[1.0, 1.0]], [[0.0, 0.0]]], **hp)
    np.testing.assert_allclose(params[0].detach().numpy(), expected[0], rtol=1e-12)


def _tiny_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_agrees_with_pytorch_optimizer_where_semantics_match():
    """pytorch_optimizer's ε_t is min(eps, eps_2·RMS(g))^(2p): equal to ours for eps_2 = eps and p = 0.5."""
    from pytorch_optimizer import FAdam as LibFAdam

    ours_model, lib_model = _tiny_model(), _tiny_model()
    ours = FAdam(ours_model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1)
    lib = LibFAdam(lib_model.parameters(), lr=1e-2, eps=1e-3, eps_2=1e-3, weight_decay=0.1, foreach=True)
    _train(ours_model, ours, 6)
    _train(lib_model, lib, 6)
    for a, b in zip(ours_model.parameters(), lib_model.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


def test_differs_from_pytorch_optimizer_defaults_as_documented():
    """With pytorch_optimizer's default eps_2 = 0.01 its ε_t is ε (RMS(g) ≥ 1e-6) where ours is ε·RMS(g)."""
    from pytorch_optimizer import FAdam as LibFAdam

    theta = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    grad = torch.tensor([0.0, 1e-3, 1e-3, 1e-3], dtype=torch.float64)  # entry 0 has f = 0: w there is θ/ε_t
    results = []
    lib_state_dtypes = dict(momentum_dtype=torch.float64, fim_dtype=torch.float64)
    for cls, kwargs in ((FAdam, {}), (LibFAdam, lib_state_dtypes)):
        prm = nn.Parameter(theta.clone())
        opt = cls([prm], lr=1.0, betas=(0.0, 0.999), eps=1e-8, weight_decay=1.0, **kwargs)
        prm.grad = grad.clone()
        opt.step()
        results.append(prm.detach().clone())
    rms_g = grad.square().mean().sqrt().item()

    def expected(eps_t: float) -> torch.Tensor:
        natural = grad / (grad.abs() + eps_t)
        natural = natural / max(1.0, natural.square().mean().sqrt().item())
        w = theta / (grad.abs() + eps_t)
        w = w / max(1.0, w.square().mean().sqrt().item())
        return theta - (natural + w)

    torch.testing.assert_close(results[0], expected(1e-8 * rms_g), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(results[1], expected(min(1e-8, 0.01 * rms_g)), rtol=1e-12, atol=1e-15)
    assert (results[0] - results[1]).abs().max() > 1e-6


def test_state_dict_round_trip_continues_bitwise():
    model = _tiny_model()
    opt = FAdam(model.parameters(), lr=1e-2)
    _train(model, opt, 3)
    clone = copy.deepcopy(model)
    clone_opt = FAdam(clone.parameters(), lr=1e-2)
    clone_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(model, opt, 3, seed=5)
    _train(clone, clone_opt, 3, seed=5)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_registry_entry_and_param_groups():
    model = _tiny_model()
    adapter = build_optimizer({"name": "fadam", "lr": 1e-2, "weight_decay": 0.1, "no_decay_bias_norm": True}, model)
    assert isinstance(adapter.optimizer, FAdam)
    assert [g["weight_decay"] for g in adapter.param_groups] == [0.1, 0.0]
    assert all(p.ndim <= 1 for p in adapter.param_groups[1]["params"])


@pytest.mark.parametrize("bad", [{"clip": 0.0}, {"p": -1.0}, {"betas": [1.0, 0.999]}])
def test_bad_hyperparameters_fail_clearly(bad):
    with pytest.raises(ValueError, match="FAdam"):
        build_optimizer({"name": "fadam", **bad}, _tiny_model())


@pytest.mark.gpu
def test_cuda_step_matches_cpu_and_never_syncs_with_the_host():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cpu_model = _tiny_model()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    cpu_opt, gpu_opt = FAdam(cpu_model.parameters(), lr=1e-2), FAdam(gpu_model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for model, opt, dev in ((cpu_model, cpu_opt, "cpu"), (gpu_model, gpu_opt, "cuda")):
        for step in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
            if dev == "cuda" and step == 2:
                torch.cuda.set_sync_debug_mode("error")  # any host sync inside step() raises
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(cpu_model.parameters(), gpu_model.parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-5, atol=1e-6)

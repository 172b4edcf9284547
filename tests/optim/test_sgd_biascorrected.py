"""`sgd_biascorrected`: against a brute-force loop, against AdaFisher `constf` at lr/λ (from step 1), and its
relation to torch SGD (the `sgd` arm: equal only once β^t is negligible)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisherbench.core.errors import UserError
from fisherbench.optim import SGDBiasCorrected, build_optimizer


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)
    ).double()


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 2, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen))
            for _ in range(n)]


@pytest.mark.parametrize("decoupled", [False, True])
def test_matches_a_brute_force_loop_with_two_param_groups(decoupled):
    model = cnn()
    ref = copy.deepcopy(model)
    conv = list(model[0].parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("0.")]
    opt = SGDBiasCorrected([{"params": conv, "lr": 0.3, "weight_decay": 0.01}, {"params": rest}],
                           lr=0.5, momentum=0.8, weight_decay=1e-3, decoupled_weight_decay=decoupled)
    hyper = {n: (0.3, 0.01) if n.startswith("0.") else (0.5, 1e-3) for n, _ in ref.named_parameters()}
    m = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    beta = 0.8
    for t, (x, y) in enumerate(batches(8), start=1):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                lr, wd = hyper[n]
                if decoupled:
                    m[n] = beta * m[n] + (1 - beta) * p.grad
                    p -= lr * (m[n] / (1 - beta**t) + wd * p)
                else:
                    m[n] = beta * m[n] + (1 - beta) * (p.grad + wd * p)
                    p -= lr * m[n] / (1 - beta**t)
        for (n, a), b in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=f"{n} at step {t}")
    assert all(opt.state[p]["step"] == 8 for p in model.parameters())


@pytest.mark.parametrize("name,lr,damping,wd", [
    ("adafisher", 1e-3, 1e-3, 5e-4), ("adafisher", 2e-3, 4e-3, 5e-4), ("adafisherw", 1e-3, 3e-3, 1e-2),
])
def test_equals_adafisher_constf_at_lr_over_damping_from_the_first_step(name, lr, damping, wd):
    """Both through the registry, float64: AdaFisher with F ≡ λ takes exactly this optimizer's steps at lr/λ
    (AdaFisherW: decoupled decay at λ·wd, so that the per-step shrinkage lr·wd is the same)."""
    constf_model, sgd_model = cnn(), cnn()
    constf = build_optimizer({"name": name, "variant": "constf", "lr": lr, "damping": damping,
                              "weight_decay": wd, "beta": 0.9}, constf_model)
    decoupled = name == "adafisherw"
    sgd = build_optimizer({"name": "sgd_biascorrected", "lr": lr / damping, "momentum": 0.9,
                           "weight_decay": damping * wd if decoupled else wd,
                           "decoupled_weight_decay": decoupled}, sgd_model)
    for t, (x, y) in enumerate(batches(10, seed=1), start=1):
        constf.train_step(constf_model, x, y, F.cross_entropy)
        sgd.train_step(sgd_model, x, y, F.cross_entropy)
        for (n, a), b in zip(constf_model.named_parameters(), sgd_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=f"{n} at step {t}")


def test_configs_keep_the_constf_equivalence():
    """fisherbench/configs/optimizer/sgd_biascorrected.yaml is adafisher_constf's update: lr = lr_AdaFisher / damping."""
    from omegaconf import OmegaConf

    from fisherbench.engine.compose import compose_config

    sgd = OmegaConf.to_container(compose_config(["optimizer=sgd_biascorrected"]).optimizer)
    constf = OmegaConf.to_container(compose_config(["optimizer=adafisher_constf"]).optimizer)
    assert constf["variant"] == "constf"
    assert sgd["lr"] == pytest.approx(constf["lr"] / constf["damping"], rel=1e-12)
    assert (sgd["momentum"], sgd["weight_decay"]) == (constf["beta"], constf["weight_decay"])
    assert sgd["decoupled_weight_decay"] is False  # adafisher (not adafisherw): coupled L2
    plain = OmegaConf.to_container(compose_config(["optimizer=sgd"]).optimizer)
    # the `sgd` arm is the steady-state equivalent: lr·(1 − β) with torch's undamped momentum buffer
    assert plain["lr"] == pytest.approx(sgd["lr"] * (1 - sgd["momentum"]), rel=1e-12)
    assert (plain["momentum"], plain["dampening"], plain["weight_decay"]) == (sgd["momentum"], 0.0, sgd["weight_decay"])


def test_steps_are_torch_sgd_steps_times_one_over_one_minus_beta_to_the_t():
    """On the same gradients, this optimizer at lr and torch SGD (dampening 0) at lr·(1 − β) differ in step
    size by exactly 1/(1 − β^t): 10× at t = 1 for β = 0.9, then → 1. That is why the `sgd` arm equals
    AdaFisher `constf` only in steady state."""
    beta, lr = 0.9, 1.0
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(40)]
    a = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    ours = SGDBiasCorrected([a], lr=lr, momentum=beta)
    torch_sgd = torch.optim.SGD([b], lr=lr * (1 - beta), momentum=beta, dampening=0.0)
    ratios = []
    for g in grads:
        before_a, before_b = a.detach().clone(), b.detach().clone()
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        torch_sgd.step()
        ratios.append((a.detach() - before_a) / (b.detach() - before_b))
    for t, ratio in enumerate(ratios, start=1):
        torch.testing.assert_close(ratio, torch.full_like(ratio, 1 / (1 - beta**t)), rtol=1e-10, atol=0)
    assert ratios[0][0].item() == pytest.approx(10.0)
    assert ratios[-1][0].item() == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("bad", [{"momentum": 1.0}, {"momentum": -0.1}, {"lr": 0.0}])
def test_bad_hyperparameters_fail_as_user_errors(bad):
    with pytest.raises(UserError):
        build_optimizer({"name": "sgd_biascorrected", **bad}, cnn())


def test_state_dict_round_trip_continues_bitwise():
    model = cnn()
    opt = SGDBiasCorrected(model.parameters(), lr=0.5, weight_decay=1e-3)
    data = batches(6, seed=2)
    for x, y in data[:3]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    clone = copy.deepcopy(model)
    clone_opt = SGDBiasCorrected(clone.parameters(), lr=0.5, weight_decay=1e-3)
    clone_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for net, o in ((model, opt), (clone, clone_opt)):
        for x, y in data[3:]:
            o.zero_grad()
            F.cross_entropy(net(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_cuda_step_matches_cpu_and_never_syncs_with_the_host():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cpu_model = cnn().float()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    data = [(x.float(), y) for x, y in batches(3, seed=4)]
    for model, dev in ((cpu_model, "cpu"), (gpu_model, "cuda")):
        opt = SGDBiasCorrected(model.parameters(), lr=0.5, weight_decay=1e-3)
        for step, (x, y) in enumerate(data):
            opt.zero_grad()
            F.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
            if dev == "cuda" and step == 2:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")  # any host sync inside step() raises
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(cpu_model.parameters(), gpu_model.parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-5, atol=1e-6)

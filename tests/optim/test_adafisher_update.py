"""AdaFisher / AdaFisherW updates against hand computations, state_dict round trips, bad input, the runner."""
import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisherbench import optim
from fisherbench.optim import AdaFisher, AdaFisherW

LAM = 1e-3


class Net(nn.Module):
    """Linear (bias) -> LayerNorm -> tanh -> Linear (no bias), times an untracked bare parameter."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.fc2 = nn.Linear(5, 3, bias=False)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x)))) * self.scale


def batches(n, seed=0, shape=(6, 4)):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=gen), torch.randint(0, 3, (shape[0],), generator=gen)) for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def expected_F(model, factors, untracked_f):
    """F per parameter name, written out from the factor definitions."""
    (H1, S1), (Hn, Sn), (H2, S2) = factors["fc1"], factors["norm"], factors["fc2"]
    return {
        "fc1.weight": S1[:, None] * H1[None, :4] + LAM,
        "fc1.bias": S1 * H1[4] + LAM,
        "norm.weight": Sn * Hn[0] + LAM,
        "norm.bias": Sn * Hn[1] + LAM,
        "fc2.weight": S2[:, None] * H2[None, :] + LAM,
        "scale": torch.full((3,), untracked_f),
    }


@pytest.mark.parametrize(
    "cls,variant,untracked_f",
    [(AdaFisher, "default", 1.0), (AdaFisherW, "default", 1.0), (AdaFisher, "paper", 1.0 + LAM)],
    ids=["adafisher", "adafisherw", "paper"],
)
def test_steps_match_hand_computed_update(cls, variant, untracked_f):
    torch.manual_seed(0)
    model = Net()
    named = dict(model.named_parameters())
    lr_fc1, wd_fc1, lr, wd, beta = 2e-3, 0.05, 1e-3, 0.01, 0.9
    groups = [{"params": [model.fc1.weight, model.fc1.bias], "lr": lr_fc1, "weight_decay": wd_fc1},
              {"params": [p for n, p in named.items() if not n.startswith("fc1")]}]
    opt = cls(model, lr=lr, beta=beta, damping=LAM, weight_decay=wd, update_interval=2, variant=variant,
              params=groups)
    hyper = {n: (lr_fc1, wd_fc1) if n.startswith("fc1") else (lr, wd) for n in named}
    # the reference runs in float64 from the fp32 parameters, gradients and factors: F is often ~damping, so a
    # step is ~lr/damping * m and fp32 rounding differences of the operation order are ~1e-8 absolute
    m = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named.items()}
    for t, (x, y) in enumerate(batches(4), start=1):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = {n: (p.detach().double(), p.grad.double()) for n, p in named.items()}
        opt.step()
        factors = {k: (h.double(), s.double()) for k, (h, s) in opt.fisher_factors().items()}
        Fs = expected_F(model, factors, untracked_f)  # folded before this step's update
        for n, p in named.items():
            p0, g = before[n]
            lr_n, wd_n = hyper[n]
            if cls is AdaFisher:
                m[n] = beta * m[n] + (1 - beta) * (g + wd_n * p0)
                want = p0 - lr_n / (1 - beta**t) * m[n] / Fs[n]
            else:
                m[n] = beta * m[n] + (1 - beta) * g
                want = p0 - lr_n * (m[n] / (1 - beta**t) / Fs[n] + wd_n * p0)
            torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=1e-7, msg=f"{n} at step {t}")


def test_constf_is_bias_corrected_ema_momentum_sgd_at_lr_over_damping():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3))
    ref = copy.deepcopy(model)
    lr, beta, wd, lam = 1e-3, 0.9, 5e-4, 1e-3
    opt = AdaFisher(model, lr=lr, beta=beta, damping=lam, weight_decay=wd, variant="constf")
    assert opt.fisher_factors() == {} and not model[0]._forward_hooks  # no statistics at all
    bufs = [torch.zeros_like(p) for p in ref.parameters()]
    for t, (x, y) in enumerate(batches(20, shape=(4, 2, 4, 4)), start=1):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        # the reference: a few lines of EMA-momentum SGD with bias correction, step lr/damping, coupled L2
        # (buf = beta*buf + (1-beta)*(g + wd*p), as lerp + add so that the rounding is the same)
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        with torch.no_grad():
            for p, buf in zip(ref.parameters(), bufs):
                buf.lerp_(p.grad, 1 - beta).add_(p, alpha=(1 - beta) * wd)
                p.add_(buf, alpha=-(lr / (1 - beta**t)) / lam)
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p, q)  # identical trajectories


def test_untracked_parameters_and_shared_embedding_are_reported_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.pos = nn.Parameter(torch.zeros(3, 4))
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight  # tied: tracked by the Linear, also used by the Embedding

        def forward(self, idx):
            return self.head(self.emb(idx) + self.pos)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = AdaFisher(Tied())
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "pos" in text and "F = 1" in text and "emb" in text and "head" in text
    assert opt.layer_names == ["head"]


@pytest.mark.parametrize("variant", ["default", "official", "paper", "constf"])
def test_state_dict_round_trip_mid_training_continues_bitwise(variant):
    data = batches(9, seed=3)
    torch.manual_seed(0)
    model = Net()
    opt = AdaFisherW(model, update_interval=3, weight_decay=0.01, variant=variant)
    train(model, opt, data[:4])  # stops between two statistics steps
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, data[4:])

    torch.manual_seed(1)  # different initial weights: everything must come from the checkpoint
    model2 = Net()
    # params in another order: the state is keyed by names, not positions
    opt2 = AdaFisherW(model2, update_interval=3, weight_decay=0.01, variant=variant,
                      params=list(reversed(list(model2.parameters()))))
    buf.seek(0)
    saved = torch.load(buf)
    pristine = copy.deepcopy(saved)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    train(model2, opt2, data[4:])

    for (n, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), n
    for name, (h, s) in opt.fisher_factors().items():
        h2, s2 = opt2.fisher_factors()[name]
        assert torch.equal(h, h2) and torch.equal(s, s2)
    assert opt2.steps == opt.steps == 9
    # the loaded dict was only read
    assert saved["opt"]["steps"] == pristine["opt"]["steps"] == 4
    for name, st in pristine["opt"]["state"].items():
        assert torch.equal(saved["opt"]["state"][name]["exp_avg"], st["exp_avg"])
    updated = {n for n, _ in Net().named_parameters()} - ({"fc2.weight"} if variant == "official" else set())
    assert set(saved["opt"]["state"]) == updated  # official: the bare `scale` (first in order) shifts fc2 out


def test_state_dict_rejects_a_different_variant_or_model():
    model = Net()
    sd = AdaFisher(model).state_dict()
    with pytest.raises(ValueError, match="variant"):
        AdaFisher(model, variant="paper").load_state_dict(sd)
    other = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="parameter names"):
        AdaFisher(other).load_state_dict(sd)


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(update_interval=0), "update_interval"),
    (dict(update_interval=2.5), "update_interval"),
    (dict(damping=-1e-3), "damping"),
    (dict(damping=0.0), "damping"),
    (dict(variant="fast"), "variant"),
    (dict(beta=1.0), "beta"),
    (dict(gamma=1.5), "gamma"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaFisher(Net(), **kwargs)


def test_model_without_supported_layer_raises_but_constf_works():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="no supported layer.*constf"):
        AdaFisher(model)
    AdaFisher(model, variant="constf")


def test_parameter_shared_by_two_tracked_layers_raises_naming_both():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    with pytest.raises(ValueError, match=r"'0', '1'|\['0', '1'\]"):
        AdaFisher(nn.Sequential(a, b))


def test_foreign_tensor_and_late_param_group_are_rejected():
    model = Net()
    with pytest.raises(ValueError, match="not"):
        AdaFisher(model, params=[nn.Parameter(torch.zeros(2))])
    opt = AdaFisher(model)
    with pytest.raises(NotImplementedError, match="constructor"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_layer_whose_forward_never_runs_is_reported_at_the_first_step():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 3)
            self.bypassed = nn.Linear(3, 2)

        def forward(self, x):
            return F.linear(self.used(x), self.bypassed.weight, self.bypassed.bias)

    model = Functional()
    opt = AdaFisher(model)
    model(torch.randn(4, 3)).sum().backward()
    with pytest.warns(UserWarning, match="bypassed"):
        opt.step()


def test_multihead_attention_projections_are_untracked():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0])

    with pytest.warns(UserWarning, match="attn.out_proj.weight"):
        opt = AdaFisher(Attn())
    assert opt.layer_names == ["head"]


def test_wrapped_model_hooks_inner_modules_with_plain_names():
    class Wrapper(nn.Module):  # what DistributedDataParallel looks like to unwrap()
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    inner = Net()
    opt = AdaFisher(Wrapper(inner), update_interval=1)
    assert opt.layer_names == ["fc1", "norm", "fc2"]
    assert set(opt.state_dict()["param_groups"][0]["param_names"]) == {n for n, _ in inner.named_parameters()}


def test_preconditioner_stats_and_state_bytes():
    torch.manual_seed(0)
    model = Net()
    opt = AdaFisher(model, update_interval=1)
    train(model, opt, batches(2))
    stats = opt.preconditioner_stats()
    lo, hi = stats["global"]["min"], stats["global"]["max"]
    every_F = torch.cat([f.flatten() for n, f in expected_F(model, opt.fisher_factors(), 1.0).items() if n != "scale"])
    assert lo == pytest.approx(every_F.min().item() / LAM, rel=1e-6)
    assert hi == pytest.approx(every_F.max().item() / LAM, rel=1e-6)
    assert set(stats["layers"]) == {"fc1", "norm", "fc2"}
    assert stats["untracked"] == {"tensors": 1, "F_over_lambda": pytest.approx(1 / LAM)}
    n_params = sum(p.numel() for p in model.parameters())
    factor_values = sum(h.numel() + s.numel() for h, s in opt.fisher_factors().values())
    assert opt.state_bytes() == 4 * (n_params + 2 * factor_values + 3)  # momentum + factors + pending + calls


# ---------------------------------------------------------------------------------------- registry, runner
def test_registry_entries_and_adapter_diagnostics():
    entry = optim.row("adafisher")
    caps = entry.capabilities
    assert entry.takes_model and entry.family == "diagonal-fisher" and caps.period_option == "update_interval"
    assert caps.supports_ddp and caps.supports_amp
    model = Net()
    adapter = optim.build_optimizer({"name": "adafisherw", "variant": "paper", "weight_decay": 0.01}, model)
    assert isinstance(adapter.optimizer, AdaFisherW) and adapter.optimizer.variant == "paper"
    x, y = batches(1)[0]
    adapter.train_step(model, x, y, F.cross_entropy)
    diag = adapter.diagnostics()
    assert set(diag) == {"F_over_lambda_min", "F_over_lambda_max"}
    assert 1.0 <= diag["F_over_lambda_min"] <= diag["F_over_lambda_max"] < math.inf


CONFIGS = ["adafisher", "adafisherw", "adafisher_official", "adafisher_paper", "adafisher_constf"]


@pytest.mark.parametrize("config,expected", [
    ("adafisherw_vit", dict(name="adafisherw", lr=1e-3, weight_decay=1e-2, damping=3e-3, update_interval=100)),
    ("adafisherw_lm", dict(name="adafisherw", lr=1e-4, weight_decay=0.1, damping=1e-3, update_interval=10)),
    ("adafisher", dict(name="adafisher", lr=1e-3, weight_decay=5e-4, damping=1e-3, update_interval=100,
                       gamma=0.8, beta=0.9, variant="default")),
])
def test_family_recipes_compose_and_build(config, expected):
    from omegaconf import OmegaConf

    from fisherbench.engine.compose import compose_config

    cfg = compose_config([f"optimizer={config}"])
    opts = OmegaConf.to_container(cfg.optimizer, resolve=True)
    assert {k: opts[k] for k in expected} == expected and "variant" in opts
    adapter = optim.build_optimizer(opts, Net())
    assert adapter.optimizer.damping == expected["damping"]


@pytest.mark.parametrize("config", CONFIGS)
def test_runner_three_steps_leave_finite_changed_parameters(config, run_train, monkeypatch):
    built = {}
    real_build = optim.build_optimizer

    def recording_build(options, model, ctx=None):
        built["model"] = model
        built["initial"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        built["variant"] = options["variant"]
        return real_build(options, model, ctx)

    monkeypatch.setattr(optim, "build_optimizer", recording_build)
    result = run_train(f"optimizer={config}", "budget=steps", "budget.steps=3")
    assert result.status == "completed"
    expected_variant = {"adafisher_official": "official", "adafisher_paper": "paper",
                        "adafisher_constf": "constf"}.get(config, "default")
    assert built["variant"] == expected_variant
    for name, p in built["model"].named_parameters():
        assert torch.isfinite(p).all(), name
        assert not torch.equal(p.detach(), built["initial"][name]), name


# ------------------------------------------------------------------------------------ implementations, GPU
@pytest.mark.slow
def test_compiled_update_matches_foreach():
    """implementation='compiled' (torch.compile kernel, F never materialised) == the eager foreach path."""
    results = []
    for implementation in ("foreach", "compiled"):
        torch.manual_seed(0)
        model = Net()
        opt = AdaFisherW(model, update_interval=2, weight_decay=0.01, implementation=implementation)
        train(model, opt, batches(4))
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["default", "paper"])
@pytest.mark.parametrize("implementation", ["foreach", "single", "compiled"])
def test_step_never_syncs_with_the_host_on_cuda(implementation, variant):
    model = Net().cuda()
    opt = AdaFisher(model, update_interval=2, weight_decay=5e-4, implementation=implementation, variant=variant)
    for x, y in batches(5):
        opt.zero_grad()
        F.cross_entropy(model(x.cuda()), y.cuda()).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()  # statistics steps (fold) and ordinary steps alike
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in model.parameters())

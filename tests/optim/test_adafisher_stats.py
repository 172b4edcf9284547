"""AdaFisher statistics against brute-force computations from per-example activations and output gradients.

Each test runs one statistics step of the real optimizer (update_interval=1) on a tiny model, captures the
layer's input and the gradient w.r.t. its output with its own hooks, builds the explicit factor matrices
(E[a a^T], E[g g^T]) in float64, takes their diagonals, and checks the optimizer's running state
`0.08 * 1 + 0.008 * minmax(diag)` (or the paper's convex EMA).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisherbench.optim import AdaFisher
from fisherbench.optim.adafisher.stats import (
    batchnorm_activation_stat,
    conv2d_activation_stat,
    layernorm_activation_stat,
    linear_activation_stat,
    minmax,
)

GAMMA = 0.8


def mm(x: torch.Tensor) -> torch.Tensor:
    """The documented scale-free min-max, written independently of the implementation."""
    x = x.double()
    return (x - x.min()) / (x.max() - x.min() + 1e-6 * x.abs().max())


def official_fold(stat: torch.Tensor) -> torch.Tensor:
    """State after one statistics step from ones: 0.1*gamma*1 + 0.01*gamma*minmax(stat)."""
    return 0.1 * GAMMA + 0.01 * GAMMA * mm(stat)


class Capture:
    """Records each module's input and the gradient w.r.t. its output (our own hooks, not the optimizer's)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.inputs, self.outputs = {}, {}
        for name, module in modules.items():
            module.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, inputs, output):
            if torch.is_grad_enabled():
                self.inputs[name] = inputs[0].detach().double()
                output.retain_grad()
                self.outputs[name] = output

        return hook

    def grad(self, name):
        return self.outputs[name].grad.double()


def stat_step(model, x, loss_fn=lambda out: (out.float() ** 2).sum() + out.float().sum(), **kw):
    opt = AdaFisher(model, update_interval=1, **kw)
    opt.zero_grad()
    loss_fn(model(x)).backward()
    opt.step()
    return opt


def rows_with_bias(a: torch.Tensor, bias: bool) -> torch.Tensor:
    a = a.reshape(-1, a.shape[-1])
    return torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1) if bias else a


def diag_of_second_moment(rows: torch.Tensor) -> torch.Tensor:
    """diag(E[r r^T]) via the explicit matrix (brute force)."""
    full = torch.einsum("ni,nj->ij", rows, rows) / rows.shape[0]
    return torch.diagonal(full)


# ------------------------------------------------------------------------------------------------ Linear
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_factors_match_brute_force(shape, bias):
    lin = nn.Linear(5, 4, bias=bias)
    model = nn.Sequential(lin, nn.Tanh(), nn.Linear(4, 3))
    cap = Capture({"0": lin})
    opt = stat_step(model, torch.randn(*shape))
    H, S = opt.fisher_factors()["0"]
    a, g = cap.inputs["0"], cap.grad("0")
    h_true = diag_of_second_moment(rows_with_bias(a, bias))
    s_true = diag_of_second_moment(g.reshape(-1, 4))
    assert H.dtype == S.dtype == torch.float32
    assert H.shape == (5 + bias,) and S.shape == (4,)
    torch.testing.assert_close(H.double(), official_fold(h_true), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(S.double(), official_fold(s_true), rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------------------ Conv2d
def unfold_diagonal(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Official definition via explicit patches: mean over (batch, group, position) of squared patch entries,
    groups pooled, + 1 for the bias. Padding applied explicitly (any mode, 'same' included)."""
    kh, kw = conv.kernel_size
    if isinstance(conv.padding, str):
        pads = []
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size)):
            total = 0 if conv.padding == "valid" else d * (k - 1)
            pads += [total // 2, total - total // 2]
    else:
        pads = [conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0]]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x.double(), pads, mode=mode)
    patches = F.unfold(xp, (kh, kw), dilation=conv.dilation, stride=conv.stride)  # (B, C*kh*kw, L)
    B, _, L = patches.shape
    G = conv.groups
    rows = patches.reshape(B, G, -1, L).permute(0, 1, 3, 2).reshape(B * G * L, -1)
    rows = rows_with_bias(rows, conv.bias is not None)
    return diag_of_second_moment(rows)


CONV_CASES = {
    "plain": dict(in_channels=3, out_channels=4, kernel_size=3, padding=1),
    "stride2_pad3_bias": dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, padding=3),
    "no_bias_5x5": dict(in_channels=2, out_channels=3, kernel_size=5, padding=2, bias=False),
    "groups2": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),
    "depthwise_stride2": dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=1, groups=4),
    "dilation2": dict(in_channels=3, out_channels=4, kernel_size=3, padding=2, dilation=2),
    "rect_kernel_stride": dict(in_channels=3, out_channels=4, kernel_size=(2, 3), stride=(2, 1), padding=(0, 1)),
    "same_even_kernel": dict(in_channels=2, out_channels=3, kernel_size=4, padding="same"),
    "same_dilated": dict(in_channels=2, out_channels=3, kernel_size=3, dilation=2, padding="same"),
    "reflect": dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    "circular_stride": dict(in_channels=2, out_channels=2, kernel_size=3, stride=2, padding=1, padding_mode="circular"),
    "valid_odd_size": dict(in_channels=3, out_channels=2, kernel_size=3, stride=3),
}


@pytest.mark.parametrize("case", list(CONV_CASES), ids=list(CONV_CASES))
def test_conv_diagonal_without_unfold_equals_unfold(case):
    conv = nn.Conv2d(**CONV_CASES[case])
    x = torch.randn(3, conv.in_channels, 9, 11)
    ours = conv2d_activation_stat(conv, x)
    torch.testing.assert_close(ours.double(), unfold_diagonal(x, conv), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["stride2_pad3_bias", "groups2", "dilation2"])
def test_conv_factors_match_brute_force(case):
    conv = nn.Conv2d(**CONV_CASES[case])
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, conv.in_channels, 8, 8))  # materialise the lazy head
    cap = Capture({"0": conv})
    opt = stat_step(model, torch.randn(4, conv.in_channels, 8, 8))
    H, S = opt.fisher_factors()["0"]
    g = cap.grad("0")
    s_true = diag_of_second_moment(g.permute(0, 2, 3, 1).reshape(-1, conv.out_channels))
    torch.testing.assert_close(H.double(), official_fold(unfold_diagonal(cap.inputs["0"], conv)), rtol=1e-5,
                               atol=1e-8)
    torch.testing.assert_close(S.double(), official_fold(s_true), rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------------- norm layers
def test_batchnorm2d_official_two_entry_h():
    bn = nn.BatchNorm2d(5)
    model = nn.Sequential(nn.Conv2d(2, 5, 3), bn, nn.Tanh(), nn.Flatten(), nn.Linear(5 * 4 * 4, 2))
    cap = Capture({"1": bn})
    opt = stat_step(model, torch.randn(3, 2, 6, 6) + 0.5)
    H, S = opt.fisher_factors()["1"]
    a, g = cap.inputs["1"], cap.grad("1")
    B, C, Hh, W = a.shape
    # official: C x 2 matrix with rows [m_c, 1], m_c = sum_{n,h,w} a / (HW)^2; squares summed down channels / B^2
    rows = torch.stack([a.sum((0, 2, 3)) / (Hh * W) ** 2, torch.ones(C, dtype=a.dtype)], 1)
    h_true = (rows**2).sum(0) / B**2
    s_true = g.sum((0, 2, 3)) ** 2 / B  # squared beta-gradient / B
    assert H.shape == (2,) and S.shape == (5,)
    torch.testing.assert_close(H.double(), official_fold(h_true), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(S.double(), official_fold(s_true), rtol=1e-5, atol=1e-8)
    assert sorted(mm(h_true).round().tolist()) == [0.0, 1.0]  # a 2-entry H becomes {0, ~1}


@pytest.mark.parametrize("shape", [(4, 6), (3, 5, 6)], ids=["BD", "BTD"])
def test_layernorm_official_two_entry_h(shape):
    ln = nn.LayerNorm(6)
    model = nn.Sequential(nn.Linear(6, 6), ln, nn.Tanh(), nn.Linear(6, 2))
    cap = Capture({"1": ln})
    opt = stat_step(model, torch.randn(*shape))
    H, S = opt.fisher_factors()["1"]
    a, g = cap.inputs["1"], cap.grad("1")
    B = a.shape[0]
    # official: reduce every dim except dim 1 (the sequence axis for (B, T, D)); k = reduced non-batch dims
    kept = a.shape[1]
    k = a.shape[2] if a.ndim == 3 else 1
    m = torch.stack([a[:, t].sum() for t in range(kept)]) / k**2
    h_true = torch.stack([(m**2).sum(), torch.tensor(float(kept), dtype=m.dtype)]) / B**2
    s_true = g.reshape(-1, 6).sum(0) ** 2 / B
    torch.testing.assert_close(H.double(), official_fold(h_true), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(S.double(), official_fold(s_true), rtol=1e-5, atol=1e-8)


def test_raw_statistics_before_minmax_are_the_official_numbers():
    """The constants that survive min-max (bias entry 1, the BN/LN divisors) checked before normalisation."""
    x = torch.rand(3, 4, 2, 5) + 0.3  # positive mean, so the two BN/LN entries are comparable
    lin = nn.Linear(5, 2)
    torch.testing.assert_close(
        linear_activation_stat(lin, x).double(), diag_of_second_moment(rows_with_bias(x.double(), True)))
    bn = nn.BatchNorm2d(4)
    m = x.double().sum((0, 2, 3)) / (2 * 5) ** 2
    torch.testing.assert_close(batchnorm_activation_stat(bn, x).double(),
                               torch.stack([(m**2).sum(), torch.tensor(4.0, dtype=m.dtype)]) / 3**2)
    ln = nn.LayerNorm(5)
    t = x.double().reshape(3, 8, 5)
    m = t.sum((0, 2)) / 5**2
    torch.testing.assert_close(layernorm_activation_stat(ln, t.float()).double(),
                               torch.stack([(m**2).sum(), torch.tensor(8.0, dtype=m.dtype)]) / 3**2)


# --------------------------------------------------------------------------------- running average, scale
def test_paper_variant_averages_raw_diagonals_then_normalises():
    """Eq. (3) on the raw diagonals, from the first statistic; Eq. (4) min-max of the average when F is formed."""
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin)
    cap = Capture({"0": lin})
    opt = AdaFisher(model, update_interval=1, variant="paper", gamma=GAMMA)
    assert torch.equal(opt.fisher_factors()["0"][0], torch.ones(5))  # identity before any statistic
    average = None
    for scale in (1.0, 10.0, 0.1):  # statistics of different magnitudes: the order of average and min-max matters
        opt.zero_grad()
        (model(scale * torch.randn(7, 4)) ** 2).sum().backward()
        opt.step()
        raw = diag_of_second_moment(rows_with_bias(cap.inputs["0"], True))
        average = raw if average is None else GAMMA * average + (1 - GAMMA) * raw
        torch.testing.assert_close(opt.fisher_factors()["0"][0].double(), mm(average), rtol=1e-5, atol=1e-8)
    # the raw average is what a checkpoint resumes from
    torch.testing.assert_close(opt.state_dict()["factors"]["0"]["H_avg"].double(), average, rtol=1e-5, atol=1e-9)


def test_minmax_is_scale_free():
    x = torch.rand(50) * 1e-9
    for scale in (1.0, 2.0**16, 1e12):
        torch.testing.assert_close(minmax(x * scale), minmax(x), rtol=1e-6, atol=1e-7)
    y = minmax(x)
    assert y.min() == 0 and 0.999 < y.max() < 1.0
    assert torch.equal(minmax(torch.zeros(4)), torch.zeros(4))  # no 0/0


def test_factors_do_not_depend_on_the_loss_scale():
    def factors(scale):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))
        opt = stat_step(model, torch.randn(5, 4), loss_fn=lambda out: scale * (out**2).mean() * 1e-6)
        return opt.fisher_factors()

    small, big = factors(1.0), factors(2.0**24)
    for name in small:
        for a, b in zip(small[name], big[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    # the gradients of this tiny loss are ~1e-7: with the official absolute eps the S state would collapse
    assert small["3"][1].max() > 0.0087


def test_statistics_in_fp32_under_bf16_autocast():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    cap = Capture({"2": model[2]})
    opt = AdaFisher(model, update_interval=1)
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        assert out.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()
    opt.step()
    H, S = opt.fisher_factors()["2"]
    assert H.dtype == S.dtype == torch.float32
    h_true = diag_of_second_moment(rows_with_bias(cap.inputs["2"], True))  # the bf16 input, exactly widened
    torch.testing.assert_close(H.double(), official_fold(h_true), rtol=1e-5, atol=1e-8)
    assert math.isfinite(S.sum().item())


# ------------------------------------------------------------------------------------ when statistics run
def test_statistics_only_on_statistics_steps_and_no_hooks_otherwise():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = AdaFisher(model, update_interval=3)
    history = []
    for step in range(7):
        hooked = bool(model[0]._forward_hooks)
        assert hooked == (step % 3 == 0) == opt.is_statistics_step
        opt.zero_grad()
        model(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
        history.append(opt.fisher_factors()["0"][0])
    changed = [not torch.equal(history[i], history[i - 1]) for i in range(1, 7)]
    assert changed == [False, False, True, False, False, True]  # after steps 3 and 6 (step 0: from ones)
    assert not torch.equal(history[0], torch.ones(4))


def test_no_statistics_without_grad_or_without_backward():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = AdaFisher(model, update_interval=1)
    with torch.no_grad():
        model(torch.randn(5, 3))  # evaluation
    model(torch.randn(5, 3))  # grad enabled, but never backpropagated
    assert not opt._factors.has_pending
    x = torch.randn(5, 3)
    cap = Capture({"0": model[0]})
    model(x).pow(2).sum().backward()
    opt.step()
    h_true = diag_of_second_moment(rows_with_bias(cap.inputs["0"], True))
    torch.testing.assert_close(opt.fisher_factors()["0"][0].double(), official_fold(h_true), rtol=1e-5, atol=1e-8)


def test_shared_module_called_twice_averages_its_calls():
    lin = nn.Linear(3, 3)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    model = Twice()
    inputs = []
    lin.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach().double()))
    opt = stat_step(model, torch.randn(4, 3))
    # sum of the two calls' per-call statistics == their average after the scale-free min-max
    h_true = sum(diag_of_second_moment(rows_with_bias(a, True)) for a in inputs)
    torch.testing.assert_close(opt.fisher_factors()["lin"][0].double(), official_fold(h_true), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_each_layer_once(reentrant):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(3)
    base = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(5, 4)

    def factors(wrap):
        model = nn.Sequential(*[copy.deepcopy(m) for m in base])
        opt = AdaFisher(model, update_interval=1)
        out = checkpoint(model, x.clone().requires_grad_(), use_reentrant=reentrant) if wrap else model(x)
        out.pow(2).sum().backward()
        opt.step()
        return opt.fisher_factors()

    plain, ckpt = factors(False), factors(True)
    for name in plain:
        for a, b in zip(plain[name], ckpt[name]):
            torch.testing.assert_close(a, b)


def test_channels_first_layernorm_subclass_timm_layernorm2d():
    from timm.layers import LayerNorm2d

    ln = LayerNorm2d(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), ln, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 6, 2))
    cap = Capture({"1": ln})
    opt = stat_step(model, torch.randn(4, 2, 5, 6))
    H, S = opt.fisher_factors()["1"]
    a, g = cap.inputs["1"], cap.grad("1")
    s_true = g.sum((0, 2, 3)) ** 2 / 4  # its bias gradient, per channel, squared, / B
    m = a.sum((0, 2, 3)) / (5 * 6) ** 2  # official LayerNorm rule: keep dim 1 (here the channels)
    h_true = torch.stack([(m**2).sum(), torch.tensor(3.0, dtype=m.dtype)]) / 4**2
    torch.testing.assert_close(S.double(), official_fold(s_true), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(H.double(), official_fold(h_true), rtol=1e-5, atol=1e-8)


def test_conv_subclass_that_pads_inside_forward_timm_conv2d_same():
    from timm.layers import Conv2dSame

    conv = Conv2dSame(3, 4, kernel_size=3, stride=2)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 7, 8)
    model(x)
    cap = Capture({"0": conv})
    opt = stat_step(model, x)
    # reference: the same TF-style padding done explicitly, then the unfold definition
    padded = nn.Conv2d(3, 4, 3, stride=2)
    pad_h, pad_w = max((4 - 1) * 2 + 3 - 7, 0), max((4 - 1) * 2 + 3 - 8, 0)
    xp = F.pad(cap.inputs["0"], (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    torch.testing.assert_close(opt.fisher_factors()["0"][0].double(), official_fold(unfold_diagonal(xp, padded)),
                               rtol=1e-5, atol=1e-8)

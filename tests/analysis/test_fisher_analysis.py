"""Fisher analysis: diagnostics on matrices with known structure, the Kronecker identities against
`torch.kron`, and factor collection against a per-example brute force (explicit patches, outer products)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisherbench.analysis import diagnostics as dg
from fisherbench.analysis.factors import (
    FactorCollector,
    collect_factors,
    default_layers,
    hook_free_copy,
    select_layers,
)
from fisherbench.analysis.sources import FactorCallback, adafisher_state_of


def _spd(n: int, p: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    return x @ x.T / p


# ------------------------------------------------------------------------------------ known structure
def test_diagonal_matrix_is_perfectly_diagonal():
    d = torch.tensor([3.0, 1.0, 0.5, 2.0, 0.01], dtype=torch.float64)
    m = torch.diag(d)
    assert dg.diag_energy_ratio(m) == 1.0
    centres, radii = dg.gershgorin(m)
    assert torch.equal(centres, d) and torch.all(radii == 0)
    assert dg.gershgorin_summary(centres, radii)["dominant_frac"] == 1.0
    assert dg.kron_diag_error(m, torch.diag(d[:3] + 1)) == 0.0
    assert torch.allclose(dg.eigenvalues(m), torch.sort(d).values)
    assert dg.snr_db(m, m) == math.inf  # no off-diagonal energy at all
    # noise only off the diagonal: E[sum_{i<j} M~_ij^2] = n(n-1)/2 sigma^2
    n, sigma = 400, 1e-2
    big = torch.diag(torch.linspace(0.5, 2.0, n, dtype=torch.float64))
    expected = 10 * math.log10(float(big.diagonal().square().sum()) / (n * (n - 1) / 2 * sigma**2))
    assert dg.snr_db(big, dg.add_offdiag_noise(big, sigma, seed=1)) == pytest.approx(expected, abs=0.1)


def test_offdiag_noise_is_symmetric_zero_diagonal_seeded():
    m = torch.zeros(300, 300, dtype=torch.float64)
    e = dg.add_offdiag_noise(m, 1e-3, seed=3)
    assert torch.equal(e, e.T) and torch.all(e.diagonal() == 0)
    assert float(torch.triu(e, 1)[torch.triu(torch.ones_like(e), 1) > 0].std()) == pytest.approx(1e-3, rel=0.02)
    assert torch.equal(e, dg.add_offdiag_noise(m, 1e-3, seed=3))
    assert not torch.equal(e, dg.add_offdiag_noise(m, 1e-3, seed=4))


def test_diagonally_dominant_discs_exclude_zero_and_hold_the_eigenvalues():
    g = torch.Generator().manual_seed(0)
    n = 30
    off = torch.rand(n, n, generator=g, dtype=torch.float64) * 0.1
    off = torch.triu(off, 1)
    off = off + off.T
    m = off + torch.diag(off.abs().sum(1) + 0.5 + torch.rand(n, generator=g, dtype=torch.float64))
    centres, radii = dg.gershgorin(m)
    assert torch.allclose(radii, off.abs().sum(1))
    assert dg.gershgorin_summary(centres, radii)["dominant_frac"] == 1.0
    assert torch.all(centres - radii > 0)  # every disc excludes 0 -> positive definite
    eig = dg.eigenvalues(m)
    assert float(eig.min()) > 0 and dg.fraction_above(eig, 0.4) == 1.0
    inside = (eig[:, None] - centres[None, :]).abs() <= radii[None, :] + 1e-12
    assert bool(inside.any(1).all())  # Gershgorin: each eigenvalue lies in some disc
    assert dg.diag_energy_ratio(m) > 0.5


def test_dense_random_matrices_have_known_energy():
    n = 300
    g = torch.Generator().manual_seed(1)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    goe = torch.triu(a) + torch.triu(a, 1).T  # iid N(0, 1) entries: diagonal energy ~ n of n^2
    assert dg.diag_energy_ratio(goe) == pytest.approx(1 / n, rel=0.2)
    assert dg.gershgorin_summary(*dg.gershgorin(goe))["dominant_frac"] == 0.0
    p = 50  # Wishart X Xᵀ/p: E M_ii^2 = 1 + 2/p, E M_ij^2 = 1/p
    w = _spd(n, p, seed=2)
    assert dg.diag_energy_ratio(w) == pytest.approx((p + 2) / (p + 2 + n - 1), rel=0.1)


def test_snr_is_equation_7_and_the_notebook_variant_adds_10_log10_n():
    m = _spd(7, 3, seed=5)
    noisy = dg.add_offdiag_noise(m, 0.05, seed=0)
    num = sum(float(m[i, i]) ** 2 for i in range(7))
    den = sum(float(noisy[i, j]) ** 2 for i in range(7) for j in range(i + 1, 7))
    assert dg.snr_db(m, noisy) == pytest.approx(10 * math.log10(num / den))
    assert dg.snr_db_notebook(m, noisy) == pytest.approx(dg.snr_db(m, noisy) + 10 * math.log10(7))
    d, o = dg.energy_parts(m)  # noise-free: the upper triangle holds half the off-diagonal energy
    assert dg.analyse_factor(m).metrics["snr_db_noise_free"] == pytest.approx(10 * math.log10(2 * d / o))


def test_fft_magnitude_matches_numpy():
    m = _spd(6, 4, seed=1)
    ref = 20 * np.log10(np.abs(np.fft.fftshift(np.fft.fft2(m.numpy()))))
    assert np.allclose(dg.fft_magnitude_db(m).numpy(), ref)


def test_noise_moves_eigenvalues_by_at_most_the_noise_norm():
    m = _spd(60, 200, seed=3)
    noisy = dg.add_offdiag_noise(m, 1e-3, seed=0)
    s = dg.perturbation_summary(dg.eigenvalues(m), dg.eigenvalues(noisy))
    assert s["max_abs_shift"] <= float(torch.linalg.matrix_norm(noisy - m, ord=2)) + 1e-12  # Weyl
    assert s["kaiser_threshold"] == pytest.approx(float(m.trace()) / 60)
    assert 0 < s["n_above_kaiser"] < 60 and s["max_rel_shift_above_kaiser"] < 1e-2


# ------------------------------------------------------------------------------- Kronecker identities
@pytest.mark.parametrize("symmetric", [True, False])
def test_kron_diag_error_equals_brute_force(symmetric):
    g = torch.Generator().manual_seed(7)
    if symmetric:
        h, s = _spd(5, 3, seed=1), _spd(4, 6, seed=2)
    else:
        h, s = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
    full = torch.kron(h, s)
    approx = torch.kron(torch.diag(h.diagonal()), torch.diag(s.diagonal()))
    brute = float(torch.linalg.matrix_norm(approx - full) / torch.linalg.matrix_norm(full))
    assert dg.kron_diag_error(h, s) == pytest.approx(brute, rel=1e-10)
    assert brute == pytest.approx(math.sqrt(1 - dg.diag_energy_ratio(h) * dg.diag_energy_ratio(s)), rel=1e-10)


def test_product_fraction_equals_the_kronecker_spectrum():
    h, s = _spd(6, 3, seed=3) + 0.05 * torch.eye(6), (_spd(5, 4, seed=4) + 0.1 * torch.eye(5)) * 1e-2
    eig_kron = torch.linalg.eigvalsh(torch.kron(h, s))
    eh, es = dg.eigenvalues(h), dg.eigenvalues(s)
    fractions = []
    for lam in (1e-5, 1e-4, 1e-3, 1e-2, 10.0):
        brute = float((eig_kron > lam).double().mean())
        assert dg.product_fraction_above(eh, es, lam) == pytest.approx(brute, abs=1.5 / eig_kron.numel())
        fractions.append(brute)
    assert fractions[0] == 1.0 and 0 < fractions[2] < 1 and fractions[-1] == 0.0  # the thresholds bite
    a, b = torch.rand(40, dtype=torch.float64), torch.rand(30, dtype=torch.float64)
    for lam in (0.01, 0.2, 0.5):
        assert dg.product_fraction_above(a, b, lam) == float((torch.outer(a, b) > lam).double().mean())


def test_official_state_reproduces_the_damping_dominance_bound():
    diag = torch.linspace(0.1, 5.0, 50, dtype=torch.float64)
    c = 0.008 / 0.92  # fixed point of x <- 0.08 x + 0.008 stat
    assert dg.steady_state_scale("default", 0.8) == pytest.approx(c)
    assert dg.steady_state_scale("paper", 0.8) == pytest.approx(1.0)
    r = dg.curvature_vs_damping(dg.official_state(diag), dg.official_state(diag), 1e-3)
    assert r["frac_above_damping"] == 0.0  # the spec's F/lambda in [1, 1.076]
    assert r["F_over_lambda_max"] == pytest.approx(1 + c**2 / 1e-3, rel=1e-5)
    h, s = dg.official_state(diag, "paper"), dg.official_state(diag.flip(0) ** 2, "paper")
    r = dg.curvature_vs_damping(h, s, 0.3)
    assert r["frac_above_damping"] == float((torch.outer(s, h) > 0.3).double().mean()) > 0


def test_sampled_block_extrapolates_the_full_factor():
    n, k = 500, 150
    m = _spd(n, 40, seed=6)
    idx = torch.sort(torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k]).values
    block = dg.Block(m[idx][:, idx], m.diagonal().clone(), idx)
    assert block.sampled and block.pair_scale == pytest.approx(n * (n - 1) / (k * (k - 1)))
    assert dg.diag_energy_ratio(block) == pytest.approx(dg.diag_energy_ratio(m), rel=0.1)
    assert dg.diag_energy_ratio(m[idx][:, idx]) > 2 * dg.diag_energy_ratio(m)  # naive sub-block is biased
    _, radii = dg.gershgorin(block)
    _, full_radii = dg.gershgorin(m)
    assert float(radii.mean()) == pytest.approx(float(full_radii[idx].mean()), rel=0.1)
    assert dg.kron_diag_error(block, block) == pytest.approx(dg.kron_diag_error(m, m), rel=0.05)


# ---------------------------------------------------------------------------------- factor collection
def _patches_brute(x: torch.Tensor, conv: nn.Conv2d) -> list[torch.Tensor]:
    """Per output position and group, the flattened input patch (channel-in-group, kh, kw), explicit loops."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    if conv.padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pad = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        pad = (conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0])
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x[None], pad, mode=mode)[0]
    oh = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    cg = conv.in_channels // conv.groups
    rows = []
    for i in range(oh):
        for j in range(ow):
            for grp in range(conv.groups):
                vals = [xp[c, i * sh + a * dh, j * sw + b * dw]
                        for c in range(grp * cg, (grp + 1) * cg) for a in range(kh) for b in range(kw)]
                rows.append(torch.stack(vals))
    return rows


class Tiny(nn.Module):
    def __init__(self, conv: nn.Conv2d, flat: int) -> None:
        super().__init__()
        self.conv = conv
        self.act = nn.Tanh()
        self.fc = nn.Linear(flat, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


CONVS = {
    "stride2_pad1_bias": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), 3 * 3 * 3),
    "groups_dilation_same_reflect": (
        lambda: nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=2, bias=False, padding_mode="reflect"),
        4 * 5 * 5),
}


@pytest.mark.parametrize("conv_name", list(CONVS))
@pytest.mark.parametrize("grad_scale", ["batch", "mean"])
def test_collection_equals_per_example_brute_force(conv_name, grad_scale):
    torch.manual_seed(0)
    make_conv, flat = CONVS[conv_name]
    model = Tiny(make_conv(), flat).double()
    b = 4
    x = torch.randn(b, model.conv.in_channels, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (b,))
    got = collect_factors(model, [(x, y)], F.cross_entropy, ["conv", "fc"], num_batches=1, grad_scale=grad_scale,
                          log=lambda m: None)
    scale = 1.0 if grad_scale == "batch" else 1.0 / b  # per-example loss gradient vs the batch-mean's
    conv, bias = model.conv, model.conv.bias is not None
    hc = torch.zeros_like(got["conv"].H.matrix)
    sc = torch.zeros_like(got["conv"].S.matrix)
    hf = torch.zeros_like(got["fc"].H.matrix)
    sf = torch.zeros_like(got["fc"].S.matrix)
    patch_rows = position_rows = 0
    for n in range(b):  # one example at a time: its own loss, its own gradients
        pre = conv(x[n:n + 1])
        hidden = model.act(pre).flatten(1)
        (g_conv,) = torch.autograd.grad(F.cross_entropy(model.fc(hidden), y[n:n + 1]), [pre])
        g_fc = torch.softmax(model.fc(hidden.detach()), 1)[0] - F.one_hot(y[n], 3).double()  # d loss / d logits
        for p in _patches_brute(x[n], conv):
            a = torch.cat([p, torch.ones(1, dtype=p.dtype)]) if bias else p
            hc += torch.outer(a, a)
            patch_rows += 1
        for i in range(g_conv.shape[2]):
            for j in range(g_conv.shape[3]):
                gv = g_conv[0, :, i, j] * scale
                sc += torch.outer(gv, gv)
                position_rows += 1
        af = torch.cat([hidden[0].detach(), torch.ones(1, dtype=torch.float64)])
        hf += torch.outer(af, af)
        sf += torch.outer(g_fc * scale, g_fc * scale)
    assert (got["conv"].rows_H, got["conv"].rows_S) == (patch_rows, position_rows)
    assert patch_rows == position_rows * conv.groups and got["fc"].rows_H == got["fc"].rows_S == b
    assert torch.allclose(got["conv"].H.matrix, hc / patch_rows, rtol=1e-10, atol=1e-12)
    assert torch.allclose(got["conv"].S.matrix, sc / position_rows, rtol=1e-10, atol=1e-14)
    assert torch.allclose(got["fc"].H.matrix, hf / b, rtol=1e-10, atol=1e-12)
    assert torch.allclose(got["fc"].S.matrix, sf / b, rtol=1e-10, atol=1e-14)
    assert torch.allclose(got["conv"].H.diag, got["conv"].H.matrix.diagonal())


def test_sampled_collection_is_the_sub_block_and_keeps_the_full_diagonal():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))
    x, y = torch.randn(16, 40), torch.randint(0, 5, (16,))
    full = collect_factors(model, [(x, y)], F.cross_entropy, ["1"], log=lambda m: None)["1"]
    messages = []
    part = collect_factors(model, [(x, y)], F.cross_entropy, ["1"], max_dim=12, seed=3, log=messages.append)["1"]
    assert any("sub-block" in m and "41x41" in m for m in messages) and any("30x30" in m for m in messages)
    for f, p in ((full.H, part.H), (full.S, part.S)):
        assert p.sampled and p.k == 12 and p.n == f.n
        assert torch.allclose(p.matrix, f.matrix[p.index][:, p.index], atol=1e-10)
        assert torch.allclose(p.diag, f.diag, atol=1e-10)


def test_collection_leaves_the_model_and_optimizer_hooks_alone():
    from fisherbench.optim.adafisher import AdaFisher

    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    opt = AdaFisher(model, update_interval=1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pending = opt._factors.pending.clone()
    got = collect_factors(model, [(x, y)] * 3, F.cross_entropy, ["0", "4"], num_batches=2, log=lambda m: None)
    assert got["4"].examples == 16 and got["4"].rows_H == 16
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN running stats too
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(opt._factors.pending, pending) and not opt._factors.has_pending
    copy_ = hook_free_copy(model)
    assert all(not m._forward_hooks for m in copy_.modules()) and any(m._forward_hooks for m in model.modules())


def test_layer_selection_and_errors():
    from fisherbench import models

    resnet = models.create_model("resnet18_cifar", num_classes=10, input_shape=(3, 32, 32))
    assert default_layers(resnet) == ["layer4.1.conv1", "linear"]  # the paper's 37th and 41st
    assert select_layers(resnet, "#37, linear") == ["layer4.1.conv1", "linear"]
    assert len(select_layers(resnet, "all")) == 21
    small = models.create_model("small_cnn", num_classes=10, input_shape=(1, 8, 8), width=4, hidden=16)
    assert default_layers(small) == ["features.4", "head.3"]
    with pytest.raises(ValueError, match="not a layer whose Kronecker factors"):
        select_layers(small, "features.1")  # BatchNorm2d
    with pytest.raises(ValueError, match="no module named 'nope'"):
        select_layers(small, "nope")
    with pytest.raises(ValueError, match="tracked layers"):
        select_layers(small, "#99")
    with pytest.raises(TypeError, match="supported: nn.Linear, nn.Conv2d"):
        FactorCollector({"bn": nn.BatchNorm2d(3)})


def test_callback_collects_at_the_chosen_evaluation_steps():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    data = [(torch.randn(8, 6), torch.randint(0, 2, (8,)))]
    cb = FactorCallback(model, lambda: iter(data), F.cross_entropy, ["0", "2"], steps=[5, 20], num_batches=1,
                        log=lambda m: None)
    for step in (1, 5, 10, 20, 20):
        cb({"step": step, "test/acc1": 0.5})
    assert sorted(cb.factors) == [5, 20]
    direct = collect_factors(model, data, F.cross_entropy, ["2"], log=lambda m: None)["2"]
    assert torch.allclose(cb.factors[20]["2"].S.matrix, direct.S.matrix)


def test_adafisher_state_is_found_in_a_checkpoint_payload():
    from fisherbench.optim.adafisher import AdaFisher

    model = nn.Sequential(nn.Linear(3, 2))
    opt = AdaFisher(model)
    found = adafisher_state_of({"optimizer": opt.state_dict()})
    assert list(found) == ["0"] and found["0"][0].numel() == 4 and found["0"][1].numel() == 2
    assert adafisher_state_of({"optimizer": {"state": {}, "param_groups": []}}) == {}

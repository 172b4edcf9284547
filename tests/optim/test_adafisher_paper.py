"""variant='paper' against a brute-force re-computation of the paper's Eqs. (3)-(4) and the update.

The reference below knows nothing of the implementation: it runs its own float64 copy of a small MLP with
explicit matrix products, takes per-sample activations and per-sample output gradients (of the batch-mean
loss, as delivered to the layer), builds the Kronecker factor matrices E[a a^T] and E[g g^T] explicitly, keeps
the convex running average of their diagonals from the first statistic (Eq. 3), min-max normalises the
averages when F is formed (Eq. 4, with the documented relative epsilon), and applies the update rule. The
optimizer's model is compared with it parameter by parameter after every step.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisherbench.optim import AdaFisher, AdaFisherW

LR, BETA, WD, LAM, GAMMA, T, EPS = 1e-3, 0.9, 0.05, 1e-2, 0.7, 2, 1e-6
STEPS = 7  # statistics on steps 0, 2, 4, 6 (0-based)


class MLP(nn.Module):
    """fc1 (bias) -> tanh -> fc2 (no bias), times a bare parameter (untracked: identity factors)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 4, bias=False)
        self.temp = nn.Parameter(torch.linspace(0.8, 1.2, 4))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * self.temp


def data():
    gen = torch.Generator().manual_seed(11)
    # inputs of changing magnitude: the raw diagonals differ in scale between statistics steps, so averaging
    # before or after the min-max gives different factors
    scales = [1.0, 1.0, 4.0, 1.0, 0.25, 1.0, 2.0]
    return [(s * torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randint(0, 4, (6,), generator=gen))
            for s in scales]


def minmax(d):
    return (d - d.min()) / (d.max() - d.min() + EPS * d.abs().max())


def explicit_diagonal(rows):
    """diag(1/N sum_n r_n r_n^T), from the explicit matrix."""
    return torch.diagonal(torch.einsum("ni,nj->ij", rows, rows) / rows.shape[0])


class Reference:
    """Float64 AdaFisher(W), variant paper, on MLP parameters given as plain tensors."""

    def __init__(self, params, decoupled):
        self.p = {n: t.detach().clone() for n, t in params.items()}
        self.m = {n: torch.zeros_like(t) for n, t in self.p.items()}
        self.avg = {}  # layer -> (H average, S average), raw diagonals
        self.history = []  # the raw statistics of each statistics step, {layer: (H_hat, S_hat)}
        self.decoupled = decoupled
        self.t = 0

    def loss_and_internals(self, x, y):
        p = {n: t.clone().requires_grad_(True) for n, t in self.p.items()}
        z1 = x @ p["fc1.weight"].T + p["fc1.bias"]
        a2 = torch.tanh(z1)
        z2 = a2 @ p["fc2.weight"].T
        loss = F.cross_entropy(z2 * p["temp"], y)
        grads = torch.autograd.grad(loss, [z1, z2, *p.values()])
        g1, g2, param_grads = grads[0], grads[1], dict(zip(p, grads[2:]))
        ones = torch.ones(x.shape[0], 1, dtype=x.dtype)
        stats = {  # per-sample rows: activations (with the bias column) and output gradients
            "fc1": (explicit_diagonal(torch.cat([x, ones], 1)), explicit_diagonal(g1)),
            "fc2": (explicit_diagonal(a2.detach()), explicit_diagonal(g2)),
        }
        return param_grads, stats

    def factors(self, layer):
        if layer not in self.avg:
            return None
        h, s = self.avg[layer]
        return minmax(h), minmax(s)  # Eq. (4): min-max of the averaged diagonals

    def fishers(self):
        (h1, s1), (h2, s2) = self.factors("fc1"), self.factors("fc2")
        return {
            "fc1.weight": torch.outer(s1, h1[:5]) + LAM,
            "fc1.bias": s1 * h1[5] + LAM,
            "fc2.weight": torch.outer(s2, h2) + LAM,
            "temp": torch.full((4,), 1.0 + LAM, dtype=torch.float64),  # identity factors
        }

    def step(self, x, y):
        grads, stats = self.loss_and_internals(x, y)
        if self.t % T == 0:
            self.history.append(stats)
            for layer, (h_new, s_new) in stats.items():  # Eq. (3), from the first statistic
                if layer in self.avg:
                    h, s = self.avg[layer]
                    self.avg[layer] = (GAMMA * h + (1 - GAMMA) * h_new, GAMMA * s + (1 - GAMMA) * s_new)
                else:
                    self.avg[layer] = (h_new, s_new)
        self.t += 1
        fishers = self.fishers()
        for n, p in self.p.items():
            g = grads[n]
            if self.decoupled:
                self.m[n] = BETA * self.m[n] + (1 - BETA) * g
                self.p[n] = p - LR * (self.m[n] / (1 - BETA**self.t) / fishers[n] + WD * p)
            else:
                self.m[n] = BETA * self.m[n] + (1 - BETA) * (g + WD * p)
                self.p[n] = p - LR / (1 - BETA**self.t) * self.m[n] / fishers[n]


@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW], ids=["adafisher", "adafisherw"])
@pytest.mark.parametrize("implementation", ["foreach", "single"])
def test_paper_variant_matches_brute_force_equations(cls, implementation):
    torch.manual_seed(0)
    model = MLP().double()
    ref = Reference(dict(model.named_parameters()), decoupled=cls is AdaFisherW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # `temp` is untracked, by design
        opt = cls(model, lr=LR, beta=BETA, damping=LAM, gamma=GAMMA, update_interval=T, weight_decay=WD,
                  variant="paper", implementation=implementation)
    separation = 0.0
    for step, (x, y) in enumerate(data()):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        ref.step(x, y)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), ref.p[n], rtol=1e-5, atol=1e-10, msg=f"{n} after step {step}")
        for layer in ("fc1", "fc2"):
            for mine, want in zip(opt.fisher_factors()[layer], ref.factors(layer)):
                torch.testing.assert_close(mine.double(), want, rtol=1e-5, atol=1e-6, msg=f"{layer} step {step}")
        # the official order (min-max each statistic, then average) gives the same factors from one statistic,
        # other factors once several statistics of different scales are averaged
        distance = official_order_distance(ref, opt)
        if step < 2:
            assert distance < 1e-5
        separation = max(separation, distance)
    assert separation > 0.1


def official_order_distance(ref, opt):
    """How far the factors of the other order (convex average of min-max normalised statistics, from the first
    one) are from the implementation's; shows the test above can tell the two orders apart."""
    normalised = {}
    for stats in ref.history:
        for layer, (h, s) in stats.items():
            h, s = minmax(h), minmax(s)
            if layer in normalised:
                h0, s0 = normalised[layer]
                h, s = GAMMA * h0 + (1 - GAMMA) * h, GAMMA * s0 + (1 - GAMMA) * s
            normalised[layer] = (h, s)
    return max((normalised[layer][k] - opt.fisher_factors()[layer][k].double()).abs().max().item()
               for layer in normalised for k in (0, 1))


def test_factors_are_identity_until_a_layer_receives_statistics():
    """Algorithm 1 starts from F = I: a layer without statistics yet gets F = 1 + damping (as an untracked
    parameter); its first statistic initialises the average (no blending with the identity)."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.late = nn.Linear(4, 2)  # not used in step 0 (the first statistics step)
            self.use_late = False

        def forward(self, x):
            h = torch.tanh(self.body(x))
            return self.late(h) if self.use_late else h[:, :2]

    torch.manual_seed(0)
    model = TwoHeads()
    inputs = []
    model.late.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach().double()))
    opt = AdaFisher(model, lr=LR, damping=LAM, gamma=GAMMA, update_interval=T, variant="paper")
    x = torch.randn(5, 3)
    for step in range(3):
        model.use_late = step > 0
        late_before = model.late.weight.detach().clone()
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        grad = model.late.weight.grad.clone() if step > 0 else None
        opt.step()
        H, S = opt.fisher_factors()["late"]
        if step < 2:  # no statistics for `late` yet (step 1 is not a statistics step)
            assert torch.equal(H, torch.ones(5)) and torch.equal(S, torch.ones(2))
            assert opt.state_dict()["factors"]["late"]["observed"].tolist() == [False, False]
        if step == 1:  # its first update: bias-corrected momentum (t = 1) at lr / (1 + damping)
            want = late_before - LR / (1 - BETA) * ((1 - BETA) * grad) / (1 + LAM)
            torch.testing.assert_close(model.late.weight.detach(), want, rtol=1e-6, atol=1e-9)
    # step 2: the first statistic of `late` is the average itself, not blended with the identity (min-max
    # would hide a blend with ones, so the raw average is checked)
    rows = torch.cat([inputs[-1], torch.ones(5, 1, dtype=torch.float64)], 1)
    saved = opt.state_dict()["factors"]["late"]
    torch.testing.assert_close(saved["H_avg"].double(), explicit_diagonal(rows), rtol=1e-6, atol=1e-9)
    assert saved["observed"].tolist() == [True, True]
    torch.testing.assert_close(H.double(), minmax(explicit_diagonal(rows)), rtol=1e-5, atol=1e-7)


def test_checkpoints_of_the_old_paper_order_are_refused_other_variants_load():
    model = MLP()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paper, default = AdaFisher(model, variant="paper"), AdaFisher(model)
    old_paper = {**paper.state_dict(), "format": "fisherbench.adafisher/1"}
    with pytest.raises(ValueError, match="predates"):
        paper.load_state_dict(old_paper)
    default.load_state_dict({**default.state_dict(), "format": "fisherbench.adafisher/1"})  # same layout
    no_raw = paper.state_dict()
    no_raw["factors"] = {n: {"H": f["H"], "S": f["S"]} for n, f in no_raw["factors"].items()}
    with pytest.raises(ValueError, match="H_avg"):
        paper.load_state_dict(no_raw)


# --------------------------------------------------------------------------- the statistics interval T
@pytest.mark.parametrize("config,interval", [
    ("adafisher_paper", 1),  # Algorithm 1: statistics on every minibatch, the paper names no interval
    ("adafisher", 100),  # the official CNN config's TCov
    ("adafisher_official", 100),
    ("adafisherw", 100),
    ("adafisherw_lm", 10),
])
def test_paper_config_computes_statistics_every_step_official_ones_keep_their_interval(config, interval):
    from omegaconf import OmegaConf

    from fisherbench.engine.compose import compose_config
    from fisherbench.optim import build_optimizer

    options = OmegaConf.to_container(compose_config([f"optimizer={config}"]).optimizer, resolve=True)
    assert options["update_interval"] == interval
    model = MLP().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bare `temp` parameter is untracked
        opt = build_optimizer(options, model).optimizer
    collected = []
    for x, y in data()[:3]:
        collected.append(opt.is_statistics_step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert collected == [True, interval == 1, interval == 1]


def test_fixed_arms_run_the_paper_variant_every_step_on_every_recipe():
    """The `fixed` arm set's "paper eqs." row uses T = 1 on the ViT and LM recipes too, not their official T."""
    import yaml
    from omegaconf import OmegaConf

    from fisherbench.engine.compose import compose_config
    from fisherbench.sweep.spec import SPEC_DIR

    arms = yaml.safe_load((SPEC_DIR / "_fixed.yaml").read_text())["arms"]["fixed"]
    rows = [overrides for row in arms.values() for overrides in row.values()]
    paper = []
    for overrides in rows:
        options = OmegaConf.to_container(compose_config(list(overrides)).optimizer, resolve=True)
        if options.get("variant") == "paper":
            paper.append(options["update_interval"])
    assert paper == [1, 1, 1]

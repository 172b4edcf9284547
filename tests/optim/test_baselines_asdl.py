"""K-FAC and Shampoo (ASDL) through our adapters: preconditioning against explicit computations, the plain
mean loss, library limits (Shampoo restriction, embeddings, DDP) and state round-trips."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisherbench.optim import BuildContext, build_optimizer

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def capture_preconditioned_grads(adapter) -> dict:
    """Wrap the inner SGD step to record the gradients it is given (after ASDL preconditioning)."""
    captured: dict = {}
    original = adapter.optimizer.step

    def step(*args, **kwargs):
        captured.clear()
        for group in adapter.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    captured[p] = p.grad.detach().clone()
        return original(*args, **kwargs)

    adapter.optimizer.step = step
    return captured


def mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()


def explicit_kfac(A: torch.Tensor, B: torch.Tensor, grad_w: torch.Tensor, grad_b: torch.Tensor, damping: float):
    """((A + d_A I) ⊗ (B + d_B I))⁻¹ vec(∇W) with an explicit Kronecker product, and (B + d_B I)⁻¹ ∇b.

    ASDL's damping is factored Tikhonov: d_A = √λ·π, d_B = √λ/π with π² = (tr A / dim A) / (tr B / dim B).
    vec() stacks columns, so vec(B⁻¹ ∇W A⁻¹) = (A ⊗ B)⁻¹ vec(∇W) for symmetric A, B."""
    pi = torch.sqrt((A.trace() / A.shape[0]) / (B.trace() / B.shape[0]))
    d_a, d_b = max(damping**0.5 * pi.item(), 1e-7), max(damping**0.5 / pi.item(), 1e-7)
    eye_a, eye_b = torch.eye(A.shape[0], dtype=A.dtype), torch.eye(B.shape[0], dtype=B.dtype)
    big = torch.kron(A + d_a * eye_a, B + d_b * eye_b)
    vec_g = grad_w.T.reshape(-1)
    pre_w = torch.linalg.solve(big, vec_g).reshape(grad_w.shape[1], grad_w.shape[0]).T
    pre_b = torch.linalg.solve(B + d_b * eye_b, grad_b)
    return pre_w, pre_b


def test_kfac_preconditioned_gradient_matches_explicit_kronecker_inverse():
    model = mlp()
    n, damping = 6, 1e-2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    lin1, lin2 = model[0], model[2]

    # brute force: per-example activations and output gradients of each layer
    with torch.no_grad():
        z1 = x @ lin1.weight.T + lin1.bias
        h = z1.relu()
        z2 = h @ lin2.weight.T + lin2.bias
        e2 = z2.softmax(1) - F.one_hot(y, 3).double()  # d loss_i / d z2_i
        e1 = (e2 @ lin2.weight) * (z1 > 0)  # d loss_i / d z1_i
    expected = {
        lin1: explicit_kfac(x.T @ x / n, e1.T @ e1 / n, e1.T @ x / n, e1.sum(0) / n, damping),
        lin2: explicit_kfac(h.T @ h / n, e2.T @ e2 / n, e2.T @ h / n, e2.sum(0) / n, damping),
    }

    adapter = build_optimizer(
        {"name": "kfac", "lr": 0.1, "weight_decay": 0.0, "grad_clip": None, "damping": damping,
         "curvature_interval": 1, "fisher_type": "fisher_emp"}, model,
    )
    captured = capture_preconditioned_grads(adapter)
    out = adapter.train_step(model, x, y, F.cross_entropy)
    torch.testing.assert_close(out.loss, F.cross_entropy(z2, y))
    for layer, (pre_w, pre_b) in expected.items():
        torch.testing.assert_close(captured[layer.weight], pre_w, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(captured[layer.bias], pre_b, rtol=1e-9, atol=1e-12)


class TinySeqModel(nn.Module):
    """Token sequence -> per-position logits, like a language model (outputs (B, T, V))."""

    def __init__(self, vocab: int = 7, dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.out(torch.tanh(self.hidden(self.embed(tokens))))


def lm_loss(outputs, targets):
    return F.cross_entropy(outputs.flatten(0, -2), targets.flatten())


def test_kfac_mc_fisher_preconditions_the_mean_loss_gradient_on_curvature_and_plain_steps():
    """Default (paper) settings with sequence outputs: ASDL's summed-loss path must give the mean-loss
    gradient (data_size = number of loss terms), preconditioned with the factors ASDL stored; our loss is the
    plain mean, not ASDL's curvature-step value; the embedding is excluded with a warning."""
    torch.manual_seed(0)
    model = TinySeqModel()
    with pytest.warns(UserWarning, match=r"kfac: not preconditioning embed: nn\.Embedding"):
        adapter = build_optimizer({"name": "kfac", "curvature_interval": 2, "grad_clip": None}, model)
    captured = capture_preconditioned_grads(adapter)
    gen = torch.Generator().manual_seed(1)
    for _step in range(3):  # curvature, plain, curvature
        x = torch.randint(0, 7, (3, 5), generator=gen)
        y = torch.randint(0, 7, (3, 5), generator=gen)
        reference = TinySeqModel()
        reference.load_state_dict(model.state_dict())
        ref_loss = lm_loss(reference(x), y)
        ref_loss.backward()
        out = adapter.train_step(model, x, y, lm_loss)
        assert out.loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
        for name in ("hidden", "out"):
            layer, ref_layer = getattr(model, name), getattr(reference, name)
            kron = layer.fisher.kron
            torch.testing.assert_close(captured[layer.weight], kron.B_inv @ ref_layer.weight.grad @ kron.A_inv,
                                       rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(captured[layer.bias], kron.B_inv @ ref_layer.bias.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(captured[model.embed.weight], reference.embed.weight.grad)  # plain gradient


def test_kfac_with_ddp_fails_at_build_time_with_a_message():
    with pytest.raises(ValueError, match="does not support DistributedDataParallel"):
        build_optimizer({"name": "kfac"}, mlp().float(), BuildContext(distributed=True))


def test_kfac_state_round_trip_restores_factors_and_step():
    """A fresh model + adapter loaded from a state continues bitwise like the original (factors included:
    the next steps are non-curvature steps that need the stored inverses)."""
    def make():
        torch.manual_seed(5)
        return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))

    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(3)]
    options = {"name": "kfac", "curvature_interval": 3, "lr": 0.05}
    model = make()
    adapter = build_optimizer(options, model)
    adapter.train_step(model, *batches[0], F.cross_entropy)
    state = copy.deepcopy(adapter.state_dict())  # as a checkpoint would (torch's load aliases tensors)
    assert state["grad_maker"]["step"] == 1 and set(state["grad_maker"]["factors"]) == {"0", "3"}

    resumed_model = make()
    resumed_model.load_state_dict(model.state_dict())
    resumed = build_optimizer(options, resumed_model)
    resumed.load_state_dict(state)
    for inputs, targets in batches[1:]:
        adapter.train_step(model, inputs, targets, F.cross_entropy)
        resumed.train_step(resumed_model, inputs, targets, F.cross_entropy)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert resumed.state_bytes() > 0


class WithBigEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, tokens):
        return self.norm(self.head(torch.tanh(self.body(self.embed(tokens).mean(1)))))


def test_shampoo_restricts_itself_to_factorable_matrices_and_warns_once():
    torch.manual_seed(0)
    model = WithBigEmbedding()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = build_optimizer(
            {"name": "shampoo", "max_factor_dim": 50, "lr": 0.1, "weight_decay": 0.0, "grad_clip": None}, model
        )
    messages = [str(w.message) for w in caught if "shampoo" in str(w.message)]
    assert len(messages) == 1 and "embed.weight (100, 8)" in messages[0]
    assert "body.weight" not in messages[0] and "head.weight" not in messages[0]
    preconditioned = [pre.param for pre in adapter.grad_maker.preconditioners]
    assert preconditioned == [model.body.weight, model.head.weight]
    assert all(s.shape[0] <= 50 for pre in adapter.grad_maker.preconditioners for s in pre.statistics)

    captured = capture_preconditioned_grads(adapter)
    tokens, targets = torch.randint(0, 100, (32, 3)), torch.randint(0, 3, (32,))  # batch 32: full-rank G
    reference = WithBigEmbedding()
    reference.load_state_dict(model.state_dict())
    F.cross_entropy(reference(tokens), targets).backward()
    before = model.embed.weight.detach().clone()
    adapter.train_step(model, tokens, targets, F.cross_entropy)
    # excluded and 1-D parameters: plain gradient, plain SGD step (momentum buffer = grad on step 1)
    torch.testing.assert_close(captured[model.embed.weight], reference.embed.weight.grad)
    torch.testing.assert_close(captured[model.norm.weight], reference.norm.weight.grad)
    torch.testing.assert_close(model.embed.weight.detach(), before - 0.1 * reference.embed.weight.grad)
    # preconditioned matrices: L^(-1/4) G R^(-1/4) with L = εI + G Gᵀ, R = εI + Gᵀ G (first step, damping tiny)
    # with G = U S Vᵀ of full rank that is U S^(-1/2) Uᵀ · U S Vᵀ · V S^(-1/2) Vᵀ = U Vᵀ. ASDL's coupled-Newton
    # inverse root is approximate (fp32, condition number ~1e7 here): a few percent, not 1e-6.
    u, _, vh = torch.linalg.svd(reference.body.weight.grad.double())
    error = torch.linalg.norm(captured[model.body.weight].double() - u @ vh) / torch.linalg.norm(u @ vh)
    assert error < 0.03


def test_shampoo_state_round_trip():
    def make():
        torch.manual_seed(4)
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))

    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(3)]
    options = {"name": "shampoo", "curvature_interval": 2, "lr": 0.05}
    model = make()
    adapter = build_optimizer(options, model)
    adapter.train_step(model, *batches[0], F.cross_entropy)
    resumed_model = make()
    resumed_model.load_state_dict(model.state_dict())
    resumed = build_optimizer(options, resumed_model)
    resumed.load_state_dict(copy.deepcopy(adapter.state_dict()))
    rng = torch.get_rng_state()
    for inputs, targets in batches[1:]:
        adapter.train_step(model, inputs, targets, F.cross_entropy)
    torch.set_rng_state(rng)  # ASDL's power iteration draws from the global RNG
    for inputs, targets in batches[1:]:
        resumed.train_step(resumed_model, inputs, targets, F.cross_entropy)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)

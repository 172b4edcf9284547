"""Numerical checks of the hand-written layers against brute-force loops, and of the two attention paths."""
from __future__ import annotations

import math

import pytest
import torch

from fisherbench.models import create_model
from fisherbench.models.common import attention
from fisherbench.models.swin import WindowAttention


def _window_attention_by_loops(mod: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Shifted-window attention written token by token: the standard Swin rule, independent of the masks.

    After the cyclic shift by -d, a token at (i, j) may attend to a token at (i', j') iff both lie in the same
    n x n window and on the same side of the wrap-around seams (rows >= H-d came from the top of the image,
    columns >= W-d from the left). Position bias: table[i'-i + n-1, j'-j + n-1].
    """
    b, h, w, _ = x.shape
    n, d, heads, hd = mod.window_size, mod.displacement, mod.heads, mod.head_dim
    if mod.shifted:
        x = torch.roll(x, shifts=(-d, -d), dims=(1, 2))
    q, k, v = mod.to_qkv(x).chunk(3, dim=-1)
    out = torch.zeros(b, h, w, heads * hd, dtype=torch.float64)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                for head in range(heads):
                    sl = slice(head * hd, (head + 1) * hd)
                    scores, values = [], []
                    for i2 in range(i // n * n, i // n * n + n):
                        for j2 in range(j // n * n, j // n * n + n):
                            if mod.shifted and ((i >= h - d) != (i2 >= h - d) or (j >= w - d) != (j2 >= w - d)):
                                continue
                            s = (q[bi, i, j, sl].double() @ k[bi, i2, j2, sl].double()) / math.sqrt(hd)
                            s = s + mod.pos_embedding[i2 - i + n - 1, j2 - j + n - 1].double()
                            scores.append(s)
                            values.append(v[bi, i2, j2, sl].double())
                    weights = torch.stack(scores).softmax(0)
                    out[bi, i, j, sl] = (weights[:, None] * torch.stack(values)).sum(0)
    out = mod.to_out(out.float())
    if mod.shifted:
        out = torch.roll(out, shifts=(d, d), dims=(1, 2))
    return out


@pytest.mark.parametrize("window,shifted", [(2, True), (2, False), (4, True)])
@pytest.mark.parametrize("explicit", [False, True])
def test_swin_window_attention_matches_loops(window, shifted, explicit):
    torch.manual_seed(0)
    mod = WindowAttention(dim=6, heads=2, head_dim=3, shifted=shifted, window_size=window,
                          relative_pos_embedding=True, explicit_attention=explicit)
    x = torch.randn(2, 2 * window, 2 * window, 6)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), _window_attention_by_loops(mod, x), atol=1e-5, rtol=1e-5)


def test_attention_paths_agree_and_are_causal():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    bias = torch.randn(5, 5)
    for causal in (False, True):
        ref = attention(q, k, v, causal=causal, bias=None if causal else bias, explicit=True)
        fused = attention(q, k, v, causal=causal, bias=None if causal else bias, explicit=False)
        torch.testing.assert_close(ref, fused, atol=1e-5, rtol=1e-5)
    # brute force for the causal case: position t attends to 0..t only
    out = attention(q, k, v, causal=True, explicit=True)
    for t in range(5):
        w = (torch.einsum("bhd,bhsd->bhs", q[..., t, :], k[..., : t + 1, :]) / math.sqrt(4)).softmax(-1)
        torch.testing.assert_close(out[..., t, :], torch.einsum("bhs,bhsd->bhd", w, v[..., : t + 1, :]))


def test_gpt_is_causal_and_both_attention_paths_give_the_same_model():
    torch.manual_seed(0)
    fast = create_model("tiny_gpt", num_classes=20, input_shape=(6,))
    explicit = create_model("tiny_gpt", num_classes=20, input_shape=(6,), double_backward=True)
    explicit.load_state_dict(fast.state_dict())
    tokens = torch.randint(0, 20, (2, 6))
    logits = fast(tokens)
    torch.testing.assert_close(explicit(tokens), logits, atol=1e-5, rtol=1e-5)
    changed = tokens.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 20  # change the future
    torch.testing.assert_close(fast(changed)[:, :4], logits[:, :4])
    assert not torch.allclose(fast(changed)[:, 4:], logits[:, 4:])


def test_gpt_block_is_post_ln():
    """x = LN(x + Attn(x)); x = LN(x + MLP(x)), recomputed from the block's own parts."""
    torch.manual_seed(0)
    block = create_model("tiny_gpt", num_classes=10, input_shape=(5,)).layers[0]
    x = torch.randn(2, 5, 32)
    a = block.norm1(x + block.attention(x))
    expected = block.norm2(a + block.mlp(a))
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("name,shape,options", [
    ("tiny_gpt", (6,), {}),
    ("cct_2_3x2_official", (3, 16, 16), {"dim": 16}),
    ("swin_tiny_official", (3, 16, 16), {"hidden_dim": 8, "head_dim": 4, "heads": [1, 1, 2, 2],
                                          "layers": [2, 2, 2, 2]}),
    ("swin_tiny", (3, 16, 16), {"embed_dim": 8, "num_heads": [1, 1, 2, 2], "depths": [2, 2, 2, 2]}),
    ("tiny_vit", (3, 16, 16), {}),
])
def test_double_backward_through_attention(name, shape, options):
    """double_backward=True: a Hessian-vector product (AdaHessian's create_graph) runs and matches finite
    differences of the gradient."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, input_shape=shape, double_backward=True, **options).eval().double()
    x = torch.randint(0, 10, (2, *shape)) if len(shape) == 1 else torch.randn(2, *shape, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    vec = [torch.randn_like(p) for p in params]

    def loss_fn():
        return model(x).square().mean()

    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vec)), params)
    eps = 1e-5
    with torch.no_grad():
        for p, v in zip(params, vec):
            p.add_(eps * v)
    g_plus = torch.autograd.grad(loss_fn(), params)
    with torch.no_grad():
        for p, v in zip(params, vec):
            p.sub_(2 * eps * v)
    g_minus = torch.autograd.grad(loss_fn(), params)
    fd = sum(((gp - gm) / (2 * eps) * v).sum() for gp, gm, v in zip(g_plus, g_minus, vec))
    exact = sum((h * v).sum() for h, v in zip(hv, vec))
    assert torch.isfinite(exact)
    assert exact.item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-8)

"""The paper's small GPT-1 (WikiText-2) and a tiny model from the same code for tests.

Official `MiniGPT1` (`Language_Model/GPT1.py` of the official repository): post-LN blocks `x = LN(x + Attn(x)); x = LN(x + MLP(x))`, separate Q/K/V/Y
Linear layers with bias, causal attention, MLP 4d with GELU, no dropout, no final LayerNorm, learned
position table with one row per position of the (fixed) sequence length, and an output Linear without
bias whose weight *is* the token-embedding matrix. The embeddings come from pretrained GPT-1 and are frozen,
so the trainable parameters are the blocks only: 4 x 7,087,872 = 28,351,488 for d=768.

Frozen or trained (`freeze_embeddings`, default null = by the data's tokenizer, `embeddings_frozen`): frozen
where the token ids may be GPT-1's — GPT-1's BPE (data=wikitext2, a GPT-1 tokenizer folder in text_files)
and ids of no tokenizer (the synthetic stand-ins for WikiText-2) — as the paper's protocol has them; trained
with any other tokenizer (byte, char, a BPE trained on the text, a GPT-2 folder), whose ids no pretrained
table fits: frozen random embeddings there leave the model at loss ln V.

Input: token ids (B, T) with T <= seq_len. Output: logits (B, T, vocab) (the official returns log-softmax;
cross-entropy on logits is the same loss). `embeddings` selects the frozen (or trainable) embedding
tables: `random` (N(0, 0.02)), `gpt1` (OpenAI GPT-1's token and position embeddings from the Hugging Face
hub, `openai-community/openai-gpt`), or a path to an `.npz` with arrays `tokens` (V x d) and `position`
(T x d): the official `data/embeddings.npz` format.

Differences from the official file, none of which changes the published setting (frozen pretrained
embeddings): no `padding_idx=0` on the token embedding (it only zeroes row 0 at random init and blocks
its gradient when embeddings are trained), and random embeddings are N(0, 0.02) instead of N(0, 1).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from fisherbench.core.errors import UserError
from fisherbench.models.common import attention
from fisherbench.models.registry import MODELS, ModelCapabilities, ModelOptions

log = logging.getLogger(__name__)

GPT1_HUB_REPO = "openai-community/openai-gpt"


class MultiHeadedAttention(nn.Module):
    def __init__(self, dim: int, heads: int, explicit: bool) -> None:
        super().__init__()
        self.heads = heads
        self.explicit = explicit
        # Registration order Q, V, K, Y as in the official file: it fixes the parameter order that the
        # official AdaFisher's shape-based parameter matching walks (docs/adafisher.md, "official" variant).
        self.weights_Q = nn.Linear(dim, dim)
        self.weights_V = nn.Linear(dim, dim)
        self.weights_K = nn.Linear(dim, dim)
        self.weights_Y = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = attention(heads(self.weights_Q(x)), heads(self.weights_K(x)), heads(self.weights_V(x)), causal=True,
                      explicit=self.explicit)
        return self.weights_Y(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_hidden: int, explicit: bool) -> None:
        super().__init__()
        self.attention = MultiHeadedAttention(dim, heads, explicit)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.norm1(self.attention(x) + x)
        return self.norm2(self.mlp(x) + x)


class GPT1Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int, seq_len: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(seq_len, dim)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, tokens):
        t = tokens.shape[1]
        if t > self.position.num_embeddings:
            raise UserError(f"sequence of {t} tokens is longer than the model's position table "
                             f"({self.position.num_embeddings}); set model.seq_len")
        positions = torch.arange(t, device=tokens.device)
        return self.tokens(tokens) + self.position(positions)


class MiniGPT(nn.Module):
    def __init__(self, vocab: int, dim: int, seq_len: int, heads: int, layers: int, mlp_hidden: int,
                 freeze_embeddings: bool, explicit_attention: bool) -> None:
        super().__init__()
        if dim % heads:
            raise UserError(f"d_model={dim} must be divisible by heads={heads}")
        self.embedding = GPT1Embedding(vocab, dim, seq_len)
        self.layers = nn.ModuleList([Block(dim, heads, mlp_hidden, explicit_attention) for _ in range(layers)])
        self.classifier = nn.Linear(dim, vocab, bias=False)
        self.classifier.weight = self.embedding.tokens.weight  # tied
        self.embedding.requires_grad_(not freeze_embeddings)

    def forward(self, tokens):
        x = self.embedding(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x)


class EmbeddingsUnavailable(UserError):
    """The pretrained GPT-1 embeddings could not be downloaded or read."""


def fetch_gpt1_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    """OpenAI GPT-1's token (40478 x 768) and position (512 x 768) embeddings from the Hugging Face hub."""
    try:  # lazy: not declared dependencies (timm brings them); a missing one is reported like an offline hub
        from huggingface_hub import hf_hub_download
        from safetensors.torch import load_file

        path = hf_hub_download(GPT1_HUB_REPO, "model.safetensors")
        state = load_file(path)
    except Exception as exc:  # offline, hub errors, missing file
        raise EmbeddingsUnavailable(
            f"could not get GPT-1's embeddings from the Hugging Face hub ({GPT1_HUB_REPO}, model.safetensors): "
            f"{type(exc).__name__}: {exc}. Run once with network access (the file is cached in "
            f"~/.cache/huggingface), or pass model.embeddings=<path to an .npz with arrays 'tokens' and "
            f"'position'>, or model.embeddings=random."
        ) from exc
    return _pick(state, "tokens_embed.weight"), _pick(state, "positions_embed.weight")


def _pick(state: dict[str, torch.Tensor], suffix: str) -> torch.Tensor:
    for key, value in state.items():
        if key.endswith(suffix):
            return value
    raise EmbeddingsUnavailable(f"{GPT1_HUB_REPO}: no tensor named *{suffix} in model.safetensors")


def load_npz_embeddings(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not os.path.isfile(path):
        raise EmbeddingsUnavailable(f"embeddings file {path!r} does not exist (expected an .npz with arrays "
                                    f"'tokens' and 'position', like the official data/embeddings.npz)")
    with np.load(path) as data:
        missing = {"tokens", "position"} - set(data.files)
        if missing:
            raise EmbeddingsUnavailable(f"{path}: missing arrays {sorted(missing)} (has {data.files})")
        return torch.from_numpy(data["tokens"]).float(), torch.from_numpy(data["position"]).float()


def load_embeddings(model: MiniGPT, tokens: torch.Tensor, positions: torch.Tensor, source: str) -> None:
    """Copy pretrained tables into the model. Extra vocabulary rows of the model keep their init."""
    emb = model.embedding
    vocab, dim = emb.tokens.weight.shape
    seq_len = emb.position.num_embeddings
    if tokens.shape[1] != dim or positions.shape[1] != dim:
        raise UserError(f"{source}: embeddings have width {tokens.shape[1]}, the model has d_model={dim}")
    if tokens.shape[0] > vocab:
        raise UserError(f"{source}: {tokens.shape[0]} token embeddings but the dataset's vocabulary has {vocab} "
                         f"tokens; tokenise with the same vocabulary as the embeddings")
    if positions.shape[0] < seq_len:
        raise UserError(f"{source}: {positions.shape[0]} position embeddings, the model needs {seq_len}")
    with torch.no_grad():
        emb.tokens.weight[: tokens.shape[0]].copy_(tokens)
        emb.position.weight.copy_(positions[:seq_len])
    if tokens.shape[0] < vocab:
        log.warning("%s: %d of %d token embeddings are pretrained; the other %d keep a random init",
                    source, tokens.shape[0], vocab, vocab - tokens.shape[0])


@dataclass
class GPTOptions(ModelOptions):
    name: str = "gpt1_small"
    layers: int = 4
    d_model: int = 768
    heads: int = 12
    mlp_hidden: int = 3072
    seq_len: Optional[int] = None  # position-table rows; default: the dataset's sequence length
    # true | false | null = by the data's tokenizer (`embeddings_frozen`): frozen for GPT-1's BPE (the official
    # setting: pretrained embeddings and the tied output layer frozen), trained for a tokenizer of its own
    freeze_embeddings: Optional[bool] = None
    embeddings: str = "random"  # random | gpt1 (Hugging Face hub) | path to an .npz (tokens, position)


@dataclass
class TinyGPTOptions(GPTOptions):
    name: str = "tiny_gpt"
    layers: int = 2
    d_model: int = 32
    heads: int = 2
    mlp_hidden: int = 128


# `vocabulary` values (DataBundle.extras["vocabulary"]) whose ids may be GPT-1's: its BPE, and None (ids of
# no tokenizer: the synthetic token sets that stand in for WikiText-2)
GPT1_COMPATIBLE_VOCABULARIES = (None, "gpt1")


def embeddings_frozen(freeze_embeddings: Optional[bool], vocabulary: Optional[str]) -> bool:
    """The one place that decides whether the token/position embeddings (and the tied output layer) train:
    `model.freeze_embeddings` when set, else frozen exactly when the data's ids may be GPT-1's (the paper's
    frozen pretrained GPT-1 embeddings), trained for any other tokenizer."""
    if freeze_embeddings is not None:
        return bool(freeze_embeddings)
    return vocabulary in GPT1_COMPATIBLE_VOCABULARIES


def _build_gpt(opts: GPTOptions, num_classes: int, input_shape: Optional[tuple], double_backward: bool,
               default_seq_len: int, vocabulary: Optional[str]) -> MiniGPT:
    if input_shape is not None and len(input_shape) != 1:
        raise UserError(f"{opts.name} takes token windows: input_shape (T,), got {tuple(input_shape)}")
    seq_len = opts.seq_len or (int(input_shape[0]) if input_shape else default_seq_len)
    model = MiniGPT(num_classes, opts.d_model, seq_len, opts.heads, opts.layers, opts.mlp_hidden,
                    embeddings_frozen(opts.freeze_embeddings, vocabulary), explicit_attention=double_backward)
    if opts.embeddings == "gpt1":
        load_embeddings(model, *fetch_gpt1_embeddings(), source=GPT1_HUB_REPO)
    elif opts.embeddings != "random":
        load_embeddings(model, *load_npz_embeddings(opts.embeddings), source=opts.embeddings)
    return model


@MODELS.register(
    "gpt1_small",
    schema=GPTOptions,
    capabilities=ModelCapabilities(input_kind="tokens", task="language_model", family="lm", variant="official"),
    summary="Small GPT-1: 4 post-LN blocks, d 768, 12 heads, MLP 3072, tied frozen embeddings "
            "(28,351,488 trainable)",
    source="official definition (MiniGPT1)",
)
def build_gpt1_small(opts: GPTOptions, *, num_classes: int, input_shape: Optional[tuple],
                     double_backward: bool, vocabulary: Optional[str] = None) -> nn.Module:
    return _build_gpt(opts, num_classes, input_shape, double_backward, default_seq_len=256, vocabulary=vocabulary)


@MODELS.register(
    "tiny_gpt",
    schema=TinyGPTOptions,
    capabilities=ModelCapabilities(input_kind="tokens", task="language_model", family="lm", variant="standard"),
    summary="Tiny GPT for tests: the gpt1_small code with 2 blocks, d 32, 2 heads",
    source="fisherbench",
)
def build_tiny_gpt(opts: TinyGPTOptions, *, num_classes: int, input_shape: Optional[tuple],
                   double_backward: bool, vocabulary: Optional[str] = None) -> nn.Module:
    return _build_gpt(opts, num_classes, input_shape, double_backward, default_seq_len=32, vocabulary=vocabulary)

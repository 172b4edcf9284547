"""What every layer needs to know about `nn.Module`s: the module inside wrappers, and a parameter hash."""
from __future__ import annotations

import hashlib

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def params_sha256(model: nn.Module) -> str:
    """SHA-256 over the model's parameters in name order (dtype and shape included)."""
    h = hashlib.sha256()
    for name, p in sorted(unwrap(model).named_parameters(), key=lambda kv: kv[0]):
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

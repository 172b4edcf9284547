"""torch.optim rows: the `implementation` option picks torch's kernels from the parameters' device."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fisherbench.core.errors import UserError
from fisherbench.optim import build_optimizer


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("implementation,flags", [
    ("auto", {"foreach": True}), ("foreach", {"foreach": True}), ("for-loop", {"foreach": False}),
])
def test_implementation_on_cpu(name, implementation, flags):
    adapter = build_optimizer({"name": name, "implementation": implementation}, nn.Linear(3, 2))
    assert {k: adapter.optimizer.defaults[k] for k in flags} == flags
    assert not adapter.optimizer.defaults.get("fused")


def test_unknown_implementation_is_a_user_error():
    with pytest.raises(UserError, match="implementation must be auto\\|fused\\|foreach\\|for-loop"):
        build_optimizer({"name": "adam", "implementation": "fast"}, nn.Linear(3, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_auto_is_fused_on_cuda(name):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    adapter = build_optimizer({"name": name}, nn.Linear(3, 2).cuda())
    assert adapter.optimizer.defaults["fused"] is True

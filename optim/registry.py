"""The optimizer registry and the adapter interface the trainer talks to.

The training loop never branches on an optimizer's name. It asks the registry to build an
`OptimizerAdapter` and then only calls `train_step()`, `eval_weights()`, `diagnostics()`,
`state_dict()`/`load_state_dict()` and `state_bytes()`. What differs between optimizers (hooks on the
model, a second backward with `create_graph`, a gradient maker that owns forward+backward, eval-mode
weights) is declared in `Capabilities` and implemented inside the adapter.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Optional

import torch
from torch import nn

from fisherbench.modules import unwrap  # noqa: F401  (re-exported: adapters and AdaFisher use it)
from fisherbench.errors import UserError
from fisherbench.registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AutocastFactory = Callable[[], ContextManager[Any]]


@dataclass(frozen=True)
class Capabilities:
    """What an optimizer needs from, and offers to, the training loop."""

    needs_model: bool = False  # constructor takes the model (module hooks / per-layer statistics)
    needs_create_graph: bool = False  # backward(create_graph=True): models must avoid fused SDPA
    owns_forward_backward: bool = False  # the adapter runs forward+backward itself (ASDL gradient makers)
    supports_ddp: bool = True
    supports_amp: bool = True
    eval_weights: bool = False  # evaluation must use weights other than the training iterate (schedule-free)
    family: str = "first-order"  # first-order | diagonal-fisher | kronecker | hessian | ...
    period_option: Optional[str] = None  # option holding the curvature-update interval (calibration covers it)
    # works with a torch.compile'd model (compile=true); None = derived: not for optimizers that hook modules
    # (needs_model), run their own forward/backward or need create_graph, none of which torch.compile traces
    supports_compile: Optional[bool] = None

    @property
    def compiles(self) -> bool:
        if self.supports_compile is not None:
            return self.supports_compile
        return not (self.needs_model or self.owns_forward_backward or self.needs_create_graph)


@dataclass
class OptimizerOptions:
    """Options every optimizer config has. Entries subclass this with their own hyper-parameters."""

    name: str = "???"
    lr: float = 1e-3
    weight_decay: float = 0.0
    # timm-style rule: no weight decay on biases and normalisation parameters (1-D tensors)
    no_decay_bias_norm: bool = False
    # clip the global gradient norm before the step (None = off)
    grad_clip: Optional[float] = None


@dataclass(frozen=True)
class BuildContext:
    """What a builder may need to know about the run besides the model and its own options."""

    device: torch.device = torch.device("cpu")
    distributed: bool = False  # model is wrapped in DistributedDataParallel
    steps_per_epoch: int = 1
    total_steps: Optional[int] = None  # None when the budget is wall-clock seconds


@dataclass
class StepOutput:
    """Result of one training step: the plain mean loss of the batch and the model outputs (both detached)."""

    loss: torch.Tensor
    outputs: torch.Tensor


OPTIMIZERS: Registry = Registry("optimizer")


def param_groups(
    model: nn.Module, weight_decay: float, no_decay_bias_norm: bool = False
) -> list[dict[str, Any]]:
    """Trainable parameters as optimizer groups; optionally biases/norm weights (ndim <= 1) get no decay.

    Each group carries `param_names` so that optimizers that key state by name can use it.
    """
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if no_decay_bias_norm and p.ndim <= 1 else decay).append((name, p))
    groups = []
    for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append(
                {"params": [p for _, p in members], "param_names": [n for n, _ in members], "weight_decay": wd}
            )
    return groups


def strip_names(groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Param groups without `param_names`, for optimizers that reject unknown group keys."""
    return [{k: v for k, v in g.items() if k != "param_names"} for g in groups]


def tensor_bytes(obj: Any) -> int:
    """Total bytes of all tensors reachable in nested dicts/lists/tuples (optimizer state size)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class OptimizerAdapter:
    """The standard forward -> backward -> (clip) -> step, for any `torch.optim.Optimizer`.

    Subclasses override `train_step` (gradient makers that own forward/backward), `eval_weights`
    (schedule-free), `diagnostics` (cheap numbers the trainer logs at eval time) or the state methods.
    """

    capabilities: Capabilities = Capabilities()

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        capabilities: Optional[Capabilities] = None,
        grad_clip: Optional[float] = None,
    ) -> None:
        self.optimizer = optimizer
        if capabilities is not None:
            self.capabilities = capabilities
        if grad_clip is not None and not (grad_clip > 0 and math.isfinite(grad_clip)):
            raise UserError(f"grad_clip must be a positive number or null, got {grad_clip}")
        self.grad_clip = grad_clip

    # -- the one call the training loop makes per step -------------------------------------------------
    def train_step(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: LossFn,
        autocast: AutocastFactory = contextlib.nullcontext,
    ) -> StepOutput:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast():
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
        loss.backward(create_graph=self.capabilities.needs_create_graph)
        self.clip_gradients()
        self.optimizer.step()
        if self.capabilities.needs_create_graph:
            # drop the graph kept alive by create_graph through .grad (otherwise memory grows every step)
            self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss.detach(), outputs.detach())

    def clip_gradients(self) -> None:
        if self.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)

    # -- evaluation and training modes -----------------------------------------------------------------
    def eval_weights(self) -> ContextManager[Any]:
        """Context in which the model holds the weights that evaluation must use."""
        return contextlib.nullcontext()

    # -- cheap diagnostics, called at evaluation time only -----------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        return {}

    # -- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def state_bytes(self) -> int:
        """Bytes held in optimizer state (moments, curvature factors, ...), not counting parameters/grads."""
        return tensor_bytes(self.optimizer.state)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups


def build_optimizer(
    options: Any, model: nn.Module, context: Optional[BuildContext] = None
) -> OptimizerAdapter:
    """Build the adapter for `options` (a schema dataclass, mapping or DictConfig with a `name`)."""
    from fisherbench.registry import options_from

    name = options["name"] if isinstance(options, dict) else getattr(options, "name", None)
    if name is None and hasattr(options, "get"):
        name = options.get("name")
    entry = OPTIMIZERS.get(str(name))
    opts = options_from(entry.schema, options)
    ctx = context or BuildContext()
    caps: Capabilities = entry.capabilities or Capabilities()
    if ctx.distributed and not caps.supports_ddp:
        raise UserError(
            f"optimizer '{entry.name}' does not support DistributedDataParallel; run it on one process "
            "(drop torchrun / set nproc_per_node=1) or choose another optimizer."
        )
    if opts.lr <= 0 or not math.isfinite(opts.lr):
        raise UserError(f"optimizer.lr must be a positive finite number, got {opts.lr}")
    if opts.weight_decay < 0:
        raise UserError(f"optimizer.weight_decay must be >= 0, got {opts.weight_decay}")
    try:
        adapter = entry.builder(model, opts, ctx)
    except UserError:
        raise
    except ValueError as exc:
        # torch.optim's convention: a constructor raises ValueError for an invalid hyper-parameter value
        raise UserError(f"optimizer '{entry.name}': {exc}") from exc
    adapter.capabilities = caps
    return adapter

"""The optimizer factory as data: one `OptimizerRow` per optimizer, one builder, one adapter interface.

The training loop never branches on an optimizer's name: it asks `build_optimizer(options, model, ctx)` for
an `OptimizerAdapter` and only calls `train_step()`, `eval_weights()`, `diagnostics()`, `state_dict()` /
`load_state_dict()`, `state_bytes()` and `param_groups`. Everything that differs between optimizers is a
field of its row (class, options schema, adapter, parameter-group policy, capabilities); docs/optimizers.md
describes the fields, how options reach the constructor, the adapter hooks and where rows live.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from fisherbench.core.errors import UserError
from fisherbench.core.modules import unwrap
from fisherbench.core.plugins import PluginSpec, check_capabilities, describe_target, options_schema, signature_options
from fisherbench.core.registry import Registry, options_from

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AutocastFactory = Callable[[], ContextManager[Any]]


@dataclass(frozen=True)
class Capabilities:
    """What the run layer must know about an optimizer before it builds it (each field names its reader)."""

    # fisherbench/engine/build.py builds the model with double_backward=True (no fused SDPA, which has no 2nd derivative)
    needs_create_graph: bool = False
    supports_ddp: bool = True  # build_optimizer refuses a DistributedDataParallel run otherwise
    supports_amp: bool = True  # fisherbench/engine/build.py refuses precision != fp32 otherwise
    # option holding the curvature-update interval: fisherbench/engine/calibrate.py and the benchmark time whole periods
    period_option: Optional[str] = None
    # fisherbench/engine/build.py refuses compile=true otherwise: torch.compile does not trace module hooks (AdaFisher's
    # statistics), a gradient maker's own forward/backward (ASDL) or double backward (create_graph)
    supports_compile: bool = True


@dataclass
class OptimizerOptions:
    """Options every optimizer config has. Each optimizer's schema subclasses this with its own options."""

    name: str = "???"
    lr: float = 1e-3
    weight_decay: float = 0.0
    # timm-style rule: no weight decay on biases and normalisation parameters (1-D tensors)
    no_decay_bias_norm: bool = False
    # clip the global gradient norm before the step (None = off)
    grad_clip: Optional[float] = None


@dataclass(frozen=True)
class BuildContext:
    """What a build may need to know about the run besides the model and its own options."""

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


# ------------------------------------------------------------------------------------------------------------
# parameter-group policies: (model, options) -> the constructor's `params`
# ------------------------------------------------------------------------------------------------------------
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


def decay_groups(model: nn.Module, opts: OptimizerOptions) -> list[dict[str, Any]]:
    """The default policy: every trainable parameter, no decay on ndim <= 1 if `no_decay_bias_norm`."""
    return strip_names(param_groups(model, opts.weight_decay, opts.no_decay_bias_norm))


decay_groups.reads = ("no_decay_bias_norm",)  # type: ignore[attr-defined]


def named_decay_groups(model: nn.Module, opts: OptimizerOptions) -> list[dict[str, Any]]:
    """`decay_groups` with each group's `param_names` (for optimizers that key their state by name)."""
    return param_groups(model, opts.weight_decay, opts.no_decay_bias_norm)


named_decay_groups.reads = ("no_decay_bias_norm",)  # type: ignore[attr-defined]


def tensor_bytes(obj: Any) -> int:
    """Total bytes of all tensors reachable in nested dicts/lists/tuples (optimizer state size)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# ------------------------------------------------------------------------------------------------------------
# the adapter the trainer talks to
# ------------------------------------------------------------------------------------------------------------
class OptimizerAdapter:
    """zero_grad -> `forward_backward` (forward, then `backward(loss)`) -> clip -> `optimizer.step()`.

    Subclasses override hooks, never `train_step`:

    * `backward(loss)`: how gradients are made from the loss (e.g. `create_graph=True` for Hessian probes);
    * `forward_backward(model, inputs, targets, loss_fn, autocast) -> (loss, outputs)`: for gradient makers
      that own the forward pass too (ASDL); it must leave the gradients in `.grad` and return the plain mean
      loss of the batch and the model outputs;
    * `eval_weights()`: the weights evaluation must use (schedule-free averages);
    * `diagnostics()`, `state_dict()`/`load_state_dict()`, `state_bytes()`.

    `reads` lists the options the adapter consumes; they are not passed to the optimizer's constructor.
    """

    reads: ClassVar[tuple[str, ...]] = ("grad_clip",)

    def __init__(self, optimizer: torch.optim.Optimizer, *, model: nn.Module, options: OptimizerOptions) -> None:
        self.optimizer = optimizer
        grad_clip = options.grad_clip
        if grad_clip is not None and not (grad_clip > 0 and math.isfinite(grad_clip)):
            raise UserError(f"optimizer.grad_clip must be a positive number or null, got {grad_clip}")
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
        loss, outputs = self.forward_backward(model, inputs, targets, loss_fn, autocast)
        self.clip_gradients()
        self.optimizer.step()
        return StepOutput(loss.detach(), outputs.detach())

    def forward_backward(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
        autocast: AutocastFactory,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast():
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
        self.backward(loss)
        return loss, outputs

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_gradients(self) -> None:
        if self.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)

    # -- evaluation --------------------------------------------------------------------------------------
    def eval_weights(self) -> ContextManager[Any]:
        """Context in which the model holds the weights that evaluation must use."""
        return contextlib.nullcontext()

    # -- cheap diagnostics, called at evaluation time only -----------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        return {}

    # -- state (tensors and plain data only: checkpoints load with torch.load(weights_only=True)) ---------
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


# ------------------------------------------------------------------------------------------------------------
# rows and the one builder
# ------------------------------------------------------------------------------------------------------------
GroupPolicy = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True, eq=False)
class OptimizerRow:
    """One optimizer: everything `build_optimizer` needs, as data.

    Every option is passed to the constructor under its own name (lists as tuples) except `name` and the
    options the adapter or the group policy declares in `reads`; each passed option must be a named parameter
    of the constructor, so an option no one uses fails the build instead of vanishing into a library's
    `**kwargs`. A string `optimizer` ("package.module:Name") is imported at build time.
    """

    name: str
    optimizer: Union[Callable[..., torch.optim.Optimizer], str]
    schema: type
    summary: str
    source: str  # where the optimizer class comes from (a library, or "fisherbench" for ours)
    family: str = "first-order"  # first-order | diagonal-fisher | kronecker | hessian | orthogonalized
    adapter: type[OptimizerAdapter] = OptimizerAdapter
    groups: GroupPolicy = decay_groups
    takes_model: bool = False
    fixed: Mapping[str, Any] = field(default_factory=dict)  # constructor keywords that are not options
    capabilities: Capabilities = Capabilities()

    def __call__(self, model: nn.Module, opts: Any, ctx: BuildContext) -> OptimizerAdapter:
        """The registry entry's builder: the same generic construction for every row."""
        factory = self.resolve()
        kwargs = {**self.constructor_options(opts), **self.fixed}
        accepted = accepted_keywords(factory)
        unused = sorted(set(kwargs) - accepted)
        if unused:
            # a bug in the row or its schema, not something a user can fix: no UserError
            raise TypeError(
                f"optimizer '{self.name}': options {unused} are not parameters of {describe(factory)} and no "
                f"adapter or group policy reads them"
            )
        groups = self.groups(model, opts)
        optimizer = factory(model, params=groups, **kwargs) if self.takes_model else factory(groups, **kwargs)
        return self.adapter(optimizer, model=model, options=opts)

    def resolve(self) -> Callable[..., torch.optim.Optimizer]:
        """The constructor (a `"module:attr"` reference is imported now: the libraries are heavy to import)."""
        if not isinstance(self.optimizer, str):
            return self.optimizer
        module, _, attr = self.optimizer.partition(":")
        return getattr(importlib.import_module(module), attr)

    def constructor_options(self, opts: Any) -> dict[str, Any]:
        """Options passed to the constructor: all but `name` and what the adapter or group policy reads."""
        held_back = {"name", *self.adapter.reads, *getattr(self.groups, "reads", ())}
        return {
            f.name: tuple(v) if isinstance(v := getattr(opts, f.name), list) else v
            for f in dataclasses.fields(opts) if f.name not in held_back
        }

    def overrides(self, hook: str) -> bool:
        """Whether the adapter replaces a base hook (e.g. "forward_backward", "eval_weights")."""
        return getattr(self.adapter, hook) is not getattr(OptimizerAdapter, hook)


def accepted_keywords(factory: Callable[..., Any]) -> set[str]:
    """Named keyword parameters of a constructor; a wrapper may declare its own as `keywords`."""
    declared = getattr(factory, "keywords", None)
    if declared is not None:
        return set(declared)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n for n, p in inspect.signature(factory).parameters.items() if p.kind in kinds}


def describe(factory: Any) -> str:
    """`module.Class` of a constructor (or of the class a wrapper constructs); torch.optim's public name."""
    target = getattr(factory, "cls", factory)
    if getattr(torch.optim, target.__qualname__, None) is target:
        return f"torch.optim.{target.__qualname__}"
    return f"{target.__module__}.{target.__qualname__}"


def register(*rows: OptimizerRow) -> None:
    """Add rows to `OPTIMIZERS` (the row is the entry's builder; Hydra types the config group by its schema)."""
    for r in rows:
        OPTIMIZERS.register(r.name, schema=r.schema, capabilities=r.capabilities, summary=r.summary,
                            source=r.source, tags=(r.family,))(r)


def row(name: str) -> OptimizerRow:
    """The row registered as `name` (raises the registry's 'unknown optimizer' error otherwise)."""
    return OPTIMIZERS.get(name).builder


def build_optimizer(
    options: Any, model: nn.Module, context: Optional[BuildContext] = None
) -> OptimizerAdapter:
    """Build the adapter for `options` (a schema dataclass, mapping or DictConfig with a `name`)."""
    # a mapping or DictConfig (a MutableMapping), or a schema instance
    entry = OPTIMIZERS.get(str(options.get("name") if isinstance(options, Mapping) else options.name))
    opts = options_from(entry.schema, options)
    ctx = context or BuildContext()
    caps: Capabilities = entry.capabilities
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
        return entry.builder(model, opts, ctx)
    except UserError:
        raise
    except ValueError as exc:
        # torch.optim's convention: a constructor raises ValueError for an invalid hyper-parameter value
        raise UserError(f"optimizer '{entry.name}': {exc}") from exc


# ------------------------------------------------------------------------------------------------------------
# plug-ins: an optimizer class from the user's code (a YAML with `_target_`, or an entry point)
# ------------------------------------------------------------------------------------------------------------
# `_capabilities_` a plug-in may declare, with their types (docs/own-optimizer.md says what each one means)
PLUGIN_CAPABILITIES = {
    "needs_closure": bool, "second_order_backward": bool, "create_graph": bool, "statistics_period": str,
    "supports_compile": bool, "supports_ddp": bool, "supports_amp": bool, "family": str,
}


def drop_graph_carrying_grads(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Step post-hook: .grad of a create_graph backward holds the double-backward graph (and a parameter <->
    grad cycle); drop it as soon as the step has used it, not at the next zero_grad (evaluation would keep it
    alive)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.requires_grad:
                p.grad = None


class PluginAdapter(OptimizerAdapter):
    """The adapter of a plug-in optimizer: the base loop, plus what its capabilities declare.

    `weight_decay` is held back (and must stay 0) when the class takes no `weight_decay`: the option exists
    for every optimizer, and a value the class would never see must not be recorded as if it had been used.
    """

    create_graph: ClassVar[bool] = False
    needs_closure: ClassVar[bool] = False
    takes_weight_decay: ClassVar[bool] = True
    plugin_name: ClassVar[str] = ""

    def __init__(self, optimizer: torch.optim.Optimizer, *, model: nn.Module, options: OptimizerOptions) -> None:
        super().__init__(optimizer, model=model, options=options)
        if not self.takes_weight_decay and options.weight_decay:
            raise UserError(f"optimizer '{self.plugin_name}': {describe(type(optimizer))} takes no weight_decay, "
                            f"so optimizer.weight_decay={options.weight_decay} would not be used; leave it at 0")
        if self.create_graph:
            optimizer.register_step_post_hook(drop_graph_carrying_grads)

    def backward(self, loss: torch.Tensor) -> None:
        if not self.create_graph:
            loss.backward()
            return
        with warnings.catch_warnings():
            # torch warns that create_graph makes .grad reference the graph; the post-step hook drops it
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            loss.backward(create_graph=True)

    def train_step(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: LossFn,
        autocast: AutocastFactory = contextlib.nullcontext,
    ) -> StepOutput:
        if not self.needs_closure:
            return super().train_step(model, inputs, targets, loss_fn, autocast)
        # torch.optim's closure contract (LBFGS): the optimizer calls the closure for every evaluation it
        # needs, the first one included, so the suite evaluates nothing itself (no step pays twice)
        first: list[tuple[torch.Tensor, torch.Tensor]] = []

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss, outputs = self.forward_backward(model, inputs, targets, loss_fn, autocast)
            self.clip_gradients()
            if not first:
                first.append((loss.detach(), outputs.detach()))
            return loss

        self.optimizer.step(closure)
        if not first:
            raise RuntimeError(f"optimizer '{self.plugin_name}' declares needs_closure but its step() never called "
                               "the closure (declare needs_closure: false, or call closure() in step)")
        return StepOutput(*first[0])


def plugin_row(spec: PluginSpec) -> OptimizerRow:
    """The row of a plug-in optimizer (a `torch.optim.Optimizer` subclass; UserError naming its file else)."""
    cls = spec.target
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        kind = "a class" if isinstance(cls, type) else type(cls).__name__
        raise UserError(f"{spec.where}: `_target_` {describe_target(cls)} is {kind} but not a subclass of "
                        f"torch.optim.Optimizer; point `_target_` at your optimizer class (class "
                        f"MyOpt(torch.optim.Optimizer) with __init__(self, params, lr=..., ...) and step())")
    caps = check_capabilities(spec, PLUGIN_CAPABILITIES)
    params, _ = signature_options(cls, skip=("params",))
    if "lr" not in params:
        raise UserError(f"{spec.where}: {describe(cls)}.__init__ takes no `lr`; the suite's schedules set each "
                        "param group's 'lr', so the class needs an `lr` parameter")
    create_graph = bool(caps.get("second_order_backward") or caps.get("create_graph"))
    takes_wd = "weight_decay" in params
    adapter = type(f"{cls.__name__}Adapter", (PluginAdapter,), {
        "create_graph": create_graph, "needs_closure": bool(caps.get("needs_closure")),
        "takes_weight_decay": takes_wd, "plugin_name": spec.name,
        "reads": (*PluginAdapter.reads, *(() if takes_wd else ("weight_decay",))),
    })
    schema = options_schema(spec, OptimizerOptions, cls, skip=("params",))
    period = caps.get("statistics_period")
    if period is not None:
        hint = {f.name: f.type for f in dataclasses.fields(schema)}.get(period)
        if hint not in (int, Optional[int]):
            raise UserError(f"{spec.where}: statistics_period names the option that holds the statistics period "
                            f"(an int option, e.g. update_interval), got {period!r}")
    capabilities = Capabilities(
        needs_create_graph=create_graph,
        supports_ddp=caps.get("supports_ddp", True),
        supports_amp=caps.get("supports_amp", True),
        period_option=period,
        # torch.compile does not trace a double backward
        supports_compile=caps.get("supports_compile", not create_graph),
    )
    return OptimizerRow(spec.name, cls, schema, summary=spec.summary, source=spec.where,
                        family=caps.get("family", "first-order"), adapter=adapter, capabilities=capabilities)

"""A plug-in optimizer's row: the adapter does what its capabilities declare (closure, second-order backward),
and options the class would not see are refused."""
import pytest
import torch

from fisherbench.core.errors import UserError
from fisherbench.core.plugins import PluginSpec, Provenance
from fisherbench.optim.registry import plugin_row


def spec(cls, values=None, capabilities=None, name="t_plugin"):
    return PluginSpec("optimizer", name, cls, dict(values or {}), dict(capabilities or {}), "test",
                      Provenance(f"tests.{cls.__name__}", None, None, "test.yaml"))


class TwoLookSGD(torch.optim.Optimizer):
    """Calls the closure twice per step (a SAM-like optimizer), then steps on the second gradient."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr))
        self.calls = 0

    def step(self, closure=None):
        for _ in range(2):
            with torch.enable_grad():
                closure()
            self.calls += 1
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(p.grad, alpha=-group["lr"])


class Lazy(torch.optim.Optimizer):
    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr))

    def step(self, closure=None):
        pass


class SeesGraph(torch.optim.Optimizer):
    """Records whether each gradient carries its graph (a create_graph backward)."""

    def __init__(self, params, lr=0.1, interval: int = 10):
        super().__init__(params, dict(lr=lr))
        self.seen = []

    def step(self, closure=None):
        self.seen = [p.grad.requires_grad for g in self.param_groups for p in g["params"]]


def setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    return model, x, y, torch.nn.functional.cross_entropy


def test_needs_closure_lets_the_optimizer_evaluate_and_reports_the_first_loss():
    model, x, y, loss_fn = setup()
    row = plugin_row(spec(TwoLookSGD, capabilities={"needs_closure": True}))
    adapter = row(model, row.schema(lr=0.1), None)
    expected = loss_fn(model(x), y).detach()
    out = adapter.train_step(model, x, y, loss_fn)
    assert adapter.optimizer.calls == 2  # the suite evaluated nothing itself: two closure calls, no third pass
    torch.testing.assert_close(out.loss, expected)


def test_needs_closure_with_a_step_that_never_calls_it_is_a_bug_report():
    model, x, y, loss_fn = setup()
    row = plugin_row(spec(Lazy, capabilities={"needs_closure": True}))
    with pytest.raises(RuntimeError, match="never called the closure"):
        row(model, row.schema(), None).train_step(model, x, y, loss_fn)


def test_second_order_backward_keeps_the_graph_for_the_step_then_drops_it():
    model, x, y, loss_fn = setup()
    row = plugin_row(spec(SeesGraph, capabilities={"second_order_backward": True, "statistics_period": "interval"}))
    assert row.capabilities.needs_create_graph and not row.capabilities.supports_compile
    assert row.capabilities.period_option == "interval"
    adapter = row(model, row.schema(), None)
    adapter.train_step(model, x, y, loss_fn)
    assert adapter.optimizer.seen == [True, True]
    assert all(p.grad is None for p in model.parameters())  # the graph-carrying grads are gone after the step


def test_options_the_class_would_not_see_are_refused():
    model, *_ = setup()
    row = plugin_row(spec(Lazy))  # Lazy takes no weight_decay
    row(model, row.schema(weight_decay=0.0), None)
    with pytest.raises(UserError, match="takes no weight_decay"):
        row(model, row.schema(weight_decay=0.1), None)
    with pytest.raises(UserError, match="statistics_period names"):
        plugin_row(spec(Lazy, capabilities={"statistics_period": "lr"}, name="t_period"))

"""Optimizers: the ones this project studies (AdaFisher family, FAdam, bias-corrected SGD) and every baseline.

`OPTIMIZERS` maps a config name to an `OptimizerRow` (class, options schema, adapter, parameter-group policy,
capabilities); `build_optimizer(options, model, ctx)` returns the `OptimizerAdapter` the trainer uses.
Importing this package registers every row (they live in the `*_entries.py` modules, one per source).
"""
from fisherbench.optim import (
    asdl_entries,  # noqa: F401  (registers kfac, shampoo)
    fisherbench_entries,  # noqa: F401  (registers fadam, sgd_biascorrected, adafisher, adafisherw)
    pytorch_optimizer_entries,  # noqa: F401  (registers adahessian, sophia, soap, muon, schedulefree_adamw)
    torch_entries,  # noqa: F401  (registers adam, adamw, sgd)
)
from fisherbench.optim.adafisher import AdaFisher, AdaFisherW  # noqa: F401
from fisherbench.optim.fadam import FAdam  # noqa: F401
from fisherbench.optim.registry import (  # noqa: F401
    OPTIMIZERS,
    BuildContext,
    Capabilities,
    OptimizerAdapter,
    OptimizerOptions,
    OptimizerRow,
    StepOutput,
    build_optimizer,
    param_groups,
    plugin_row,
    register,
    row,
)
from fisherbench.optim.sgd_biascorrected import SGDBiasCorrected  # noqa: F401

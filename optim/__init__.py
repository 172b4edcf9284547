"""Optimizers: the ones this project studies (AdaFisher family, FAdam, bias-corrected SGD) and every baseline.

`OPTIMIZERS` maps a config name to an `OptimizerRow` (class, options schema, adapter, parameter-group policy,
capabilities); `build_optimizer(options, model, ctx)` returns the `OptimizerAdapter` the trainer uses.
Importing this package registers every row (they live in the `*_entries.py` modules, one per source).
"""
from optim.registry import (  # noqa: F401
    OPTIMIZERS,
    BuildContext,
    Capabilities,
    OptimizerAdapter,
    OptimizerOptions,
    OptimizerRow,
    StepOutput,
    build_optimizer,
    param_groups,
    row,
)
from optim.adafisher import AdaFisher, AdaFisherW  # noqa: F401
from optim.fadam import FAdam  # noqa: F401
from optim.sgd_biascorrected import SGDBiasCorrected  # noqa: F401
from optim import torch_entries  # noqa: F401  (registers adam, adamw, sgd)
from optim import fisherbench_entries  # noqa: F401  (registers fadam, sgd_biascorrected, adafisher, adafisherw)
from optim import asdl_entries  # noqa: F401  (registers kfac, shampoo)
from optim import pytorch_optimizer_entries  # noqa: F401  (registers adahessian, sophia, soap, muon, schedulefree_adamw)

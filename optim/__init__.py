"""Optimizers: the ones this project studies (AdaFisher family, FAdam) and adapters for every baseline.

`OPTIMIZERS` maps a config name to a builder with capabilities; `build_optimizer(options, model, ctx)`
returns the `OptimizerAdapter` the trainer uses. Importing this package registers every entry.
"""
from optim.registry import (  # noqa: F401
    OPTIMIZERS,
    BuildContext,
    Capabilities,
    OptimizerAdapter,
    OptimizerOptions,
    StepOutput,
    build_optimizer,
    param_groups,
)
from optim import torch_baselines  # noqa: F401  (registers adam, adamw, sgd)
from optim.fadam import FAdam  # noqa: F401  (registers fadam)
from optim import asdl_entries  # noqa: F401  (registers kfac, shampoo)
from optim import pytorch_optimizer_entries  # noqa: F401  (registers adahessian, sophia, soap, muon, schedulefree_adamw)
from optim.adafisher import AdaFisher, AdaFisherW  # noqa: F401
from optim import adafisher_entries  # noqa: F401  (registers adafisher, adafisherw)

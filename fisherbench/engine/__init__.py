"""The run layer: compose a config, build its objects, train it under its budget, record it in the store.

    compose.py    Hydra composition from Python (the same config `train.py` composes)
    identity.py   the run id: a hash of the fields that change what a run computes
    build.py      data, model and optimizer adapter from a composed config (user errors -> UserError)
    lifecycle.py  `run(cfg)`: lock, skip/resume/start, train, record the outcome (failures are results)
    summary.py    summary.json and the one line `train.py` prints
    trainer.py    the training loop and its budget clock
    calibrate.py  reference-equivalent budgets (interleaved step timing)
    loggers.py    W&B mirror of the store

It imports the components (`optim`, `models`, `data`) and the core (`fisherbench`); nothing below it
imports it.
"""
from fisherbench.engine.compose import compose_config  # noqa: F401
from fisherbench.engine.identity import run_id_of  # noqa: F401
from fisherbench.engine.lifecycle import RunResult, run  # noqa: F401
from fisherbench.engine.summary import summary_line  # noqa: F401

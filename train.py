"""fisherbench: train one configuration under a budget and record it in the results store.

    python train.py                                     # offline default: small CNN on MNIST-5k
    python train.py model=resnet18_cifar data=cifar10 optimizer=adafisher budget=epochs budget.epochs=200
    python train.py -m optimizer=adam,adafisher seed=0,1,2   # Hydra multirun
    python train.py optimizer=sgd budget=reference budget.reference_optimizer=adamw budget.reference_epochs=2

Exit codes: 0 completed / skipped, 1 failed or out of memory, 2 configuration error, 3 diverged,
4 preempted (checkpointed; re-launch to resume).
"""
from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fisherbench.config import register_configs
from fisherbench.distributed import shutdown as shutdown_distributed
from fisherbench.errors import explain_compose_error, is_compose_error
from fisherbench.runner import EXIT_CODES, ConfigError, attach_choices, run, summary_line


@hydra.main(version_base=None, config_path="configs", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    cfg = attach_choices(cfg, dict(hc.runtime.choices))
    try:
        result = run(cfg)
    except ConfigError as exc:
        print(f"[fisherbench] configuration error: {exc}", file=sys.stderr)
        if multirun:
            return  # the other jobs of the sweep still run
        sys.exit(2)
    finally:
        shutdown_distributed()
    print(summary_line(result), flush=True)
    if not multirun:
        code = EXIT_CODES.get("skipped" if result.skipped else result.status, 1)
        if code:
            sys.exit(code)


def main() -> None:
    register_configs()
    user_wants_trace = bool(os.environ.get("HYDRA_FULL_ERROR"))
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let composition errors reach us, to explain them
    try:
        _hydra_main()
    except Exception as exc:  # noqa: BLE001
        if user_wants_trace or not is_compose_error(exc):
            raise
        print(f"[fisherbench] configuration error: {explain_compose_error(exc)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""Experiment loggers that mirror the results store: none, or Weights & Biases (online/offline).

The store is the source of truth; a logger failure is reported once and never stops a run.

A W&B run's id is the store's run id (a resumed run continues the same W&B run); its display name is
readable, `model/optimizer/seed` (the config options chosen, e.g. `resnet18_cifar/adafisher_paper/3`), and its
group is `logger.group`: a sweep sets it to the sweep's name (an Optuna search to its study), and a Hydra
multirun (`train.py -m`) without one gets `multirun/<its sweep directory>`, so one multirun is one group.
"""
from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path
from typing import Any, Optional, cast

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from fisherbench.core.store import ensure_dir


class NullLogger:
    name = "none"
    run_url: Optional[str] = None

    def start(self, run_id: str, config: dict[str, Any], run_dir: Path, resume: bool) -> None:
        pass

    def log(self, row: dict[str, Any], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if wandb_has_credentials() else "offline"


def run_name(config: dict[str, Any]) -> str:
    """`model/optimizer/seed` from a resolved config (with `_choices`): the options the user chose by name,
    plus the AdaFisher variant when the option's name does not already say it."""
    choices = config.get("_choices") or {}
    model = choices.get("model") or (config.get("model") or {}).get("name", "?")
    optimizer = choices.get("optimizer") or (config.get("optimizer") or {}).get("name", "?")
    variant = (config.get("optimizer") or {}).get("variant")
    if isinstance(variant, str) and variant not in ("default", "") and variant not in optimizer:
        optimizer = f"{optimizer}-{variant}"
    return f"{model}/{optimizer}/{config.get('seed', '?')}"


def multirun_group() -> Optional[str]:
    """`multirun/<sweep dir name>` inside a Hydra multirun job (`train.py -m`), else None."""
    try:
        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        return f"multirun/{Path(str(hc.sweep.dir)).name}"
    except Exception:  # noqa: BLE001 - a name for a W&B group is never worth failing a run
        return None


class WandbLogger:
    """W&B run whose id is the fisherbench run id, so a resumed run continues the same W&B run."""

    name = "wandb"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.mode = resolve_wandb_mode(cfg.mode)
        self.run: Any = None
        self.run_url: Optional[str] = None

    def _warn(self, what: str, exc: BaseException) -> None:
        print(f"[fisherbench] W&B {what} failed ({type(exc).__name__}: {exc}); the results store is unaffected",
              file=sys.stderr)

    def start(self, run_id: str, config: dict[str, Any], run_dir: Path, resume: bool) -> None:
        if self.mode == "disabled":
            return
        try:
            import wandb  # lazy: optional (logger=none needs no W&B), ~0.5 s to import

            # W&B writes <run dir>/wandb/ and follows links: a link planted there is refused (StoreLinkError,
            # reported as a warning below) and the run goes on without W&B
            ensure_dir(Path(run_dir) / "wandb", below=Path(run_dir).parent)
            self.run = wandb.init(
                project=self.cfg.project,
                entity=self.cfg.entity,
                group=self.cfg.group or multirun_group(),
                tags=list(self.cfg.tags) or None,
                id=run_id,
                name=run_name(config),
                resume="allow",
                dir=str(run_dir),
                config=config,
                mode=cast(Any, self.mode),  # offline|online, checked when the logger is built
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            )
            self.run_url = getattr(self.run, "url", None) if self.mode == "online" else None
        except Exception as exc:  # noqa: BLE001 - logging must never stop a run
            self._warn("init", exc)
            self.run = None

    def log(self, row: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
        except Exception as exc:  # noqa: BLE001
            self._warn("log", exc)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            for k, v in values.items():
                self.run.summary[k] = v
        except Exception as exc:  # noqa: BLE001
            self._warn("summary", exc)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as exc:  # noqa: BLE001
            self._warn("finish", exc)
        self.run = None


LOGGERS = {"none": NullLogger, "wandb": WandbLogger}


def make_logger(cfg: Any) -> NullLogger | WandbLogger:
    if cfg.name == "none":
        return NullLogger()
    logger: NullLogger | WandbLogger = LOGGERS[cfg.name](cfg)
    return logger

"""Compose configs from Python exactly as `train.py` does, with every schema registered with Hydra."""
from __future__ import annotations

from typing import Any, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from fisherbench import data, models, optim
from fisherbench.core.config import CONFIG_DIR, TrainConfig

_registered = False


def register_configs() -> None:
    """Register the top-level schema and every registry entry's schema with Hydra's ConfigStore (once).

    Each group option is then typed by the schema of the registry entry it names (`/schema/<group>/<entry>`),
    so a typo or a wrong type fails when Hydra composes the config, before anything runs.
    """
    global _registered
    if _registered:
        return
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for registry in (models.MODELS, data.DATASETS, optim.OPTIMIZERS):
        for entry in registry.entries():
            cs.store(group=f"schema/{registry.config_group}", name=entry.name, node=entry.schema)
    _registered = True


def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose `configs/<config_name>.yaml` with Hydra overrides, outside of `@hydra.main`.

    The config choices (e.g. `optimizer: adafisher_paper`) are kept under the key `_choices`.
    """
    register_configs()
    if GlobalHydra.instance().is_initialized():
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    else:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    return attach_choices(cfg, dict(cfg.hydra.runtime.choices))


def attach_choices(cfg: DictConfig, choices: dict[str, Any]) -> DictConfig:
    """Drop the `hydra` node and remember which option of each group was chosen."""
    plain = {k: v for k, v in choices.items() if not k.startswith("hydra/") and not k.startswith("schema/")}
    cfg = cfg.copy()
    with unlocked(cfg):
        cfg.pop("hydra", None)
        cfg["_choices"] = plain
    return cfg


class unlocked:
    """Temporarily lift struct mode (to add/remove our bookkeeping keys)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def __enter__(self) -> DictConfig:
        self.flag = OmegaConf.is_struct(self.cfg)
        OmegaConf.set_struct(self.cfg, False)
        return self.cfg

    def __exit__(self, *exc: Any) -> None:
        OmegaConf.set_struct(self.cfg, self.flag)


TRAIN_GROUPS = ("model", "data", "optimizer", "budget", "logger", "experiment")


def group_options(group: str) -> list[str]:
    """The options of a config group that `train.py` accepts (`_`-prefixed shared bases are not options)."""
    folder = CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


def load_group_option(group: str, option: str) -> dict[str, Any]:
    """The resolved node of one option of a config group (e.g. the reference optimizer's config)."""
    cfg = compose_config([f"{group}={option}"])
    return OmegaConf.to_container(cfg[group], resolve=True)  # type: ignore[return-value]

"""Compose configs from Python exactly as `train.py` does, with every schema registered with Hydra."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from fisherbench import data, models, optim
from fisherbench.core import plugins
from fisherbench.core.config import CONFIG_DIR, TrainConfig, plain_dict
from fisherbench.core.errors import UserError
from fisherbench.core.registry import Registry
from fisherbench.data import plugins as data_plugins

_registered = False

# config group -> (its registry, the function that turns a PluginSpec into a row of it)
PLUGIN_TARGETS: dict[str, tuple[Registry[Any], Callable[[plugins.PluginSpec], None]]] = {
    "optimizer": (optim.OPTIMIZERS, lambda spec: optim.register(optim.plugin_row(spec))),
    "model": (models.MODELS, models.register_plugin),
    "data": (data.DATASETS, data_plugins.register_plugin),
}
# (group, option) -> the user config file of every plain option read from a user config folder
USER_OPTIONS: dict[tuple[str, str], Path] = {}
_scanned: set[Path] = set()
_entry_points_loaded = False


def register_configs() -> None:
    """Register the top-level schema and every registry entry's schema with Hydra's ConfigStore (once), then
    the plug-ins and config options of the user config folders and installed packages (`load_plugins`).

    Each group option is then typed by the schema of the registry entry it names (`/schema/<group>/<entry>`),
    so a typo or a wrong type fails when Hydra composes the config, before anything runs.
    """
    global _registered
    if not _registered:
        cs = ConfigStore.instance()
        cs.store(name="train_schema", node=TrainConfig)
        for registry in (models.MODELS, data.DATASETS, optim.OPTIMIZERS):
            for entry in registry.entries():
                cs.store(group=f"schema/{registry.config_group}", name=entry.name, node=entry.schema)
        _registered = True
    load_plugins()


def load_plugins() -> None:
    """Register what the user config folders (`$FISHERBENCH_CONFIG_PATH`) and the `fisherbench.*` entry points
    of installed packages add; each folder is read once per process (later calls only read new folders).

    A plug-in becomes a registry row and two ConfigStore nodes: its schema (`schema/<group>/<name>`) and the
    group option itself (`<group>/<name>`, the schema with the YAML's values as defaults), so `optimizer=<name>`
    composes a typed node exactly as a built-in does. The user's YAML is never put on Hydra's search path: read
    as a plain file it would be untyped (Hydra finds files before ConfigStore nodes).
    """
    global _entry_points_loaded
    specs: list[plugins.PluginSpec] = []
    if not _entry_points_loaded:
        _entry_points_loaded = True
        specs += plugins.entry_point_plugins()
    dirs = [d for d in plugins.config_dirs() if d not in _scanned]
    found = plugins.scan_config_dirs(dirs)
    _scanned.update(dirs)
    cs = ConfigStore.instance()
    for spec in [*specs, *found.plugins]:
        registry, register = PLUGIN_TARGETS[spec.group]
        known = plugins.provenance(spec.group, spec.name)
        if known is not None:
            raise UserError(f"{spec.group} '{spec.name}' is defined twice: by {known.origin} and by {spec.where}; "
                            "rename one of them")
        if spec.name in registry or (CONFIG_DIR / spec.group / f"{spec.name}.yaml").exists():
            raise UserError(f"{spec.where}: '{spec.name}' is the name of a built-in {spec.group}; give the plug-in "
                            f"another name (the file name is the config name)")
        register(spec)
        plugins.LOADED[(spec.group, spec.name)] = spec.provenance
        schema = registry.get(spec.name).schema
        cs.store(group=f"schema/{spec.group}", name=spec.name, node=schema)
        cs.store(group=spec.group, name=spec.name, node=schema)
    for group, name, node, path, package in found.options:
        if (CONFIG_DIR / group / f"{name}.yaml").exists():
            raise UserError(f"{path}: '{name}' is the name of a built-in {group} config, which would hide yours; "
                            "rename the file")
        cs.store(group=group, name=name, node=node, package=package)
        USER_OPTIONS[(group, name)] = path


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
    """The options of a config group that `train.py` accepts (`_`-prefixed shared bases are not options):
    the suite's, the plug-ins' and those of the user config folders."""
    register_configs()
    folder = CONFIG_DIR / group
    own = [p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_")]
    added = [n for (g, n) in [*plugins.LOADED, *USER_OPTIONS] if g == group]
    return sorted({*own, *added})


def plugin_lines() -> list[str]:
    """One line per plug-in and user config option: group, name, what it is and where it came from."""
    register_configs()
    lines = []
    for (group, name), prov in sorted(plugins.LOADED.items()):
        lines.append(f"{group:<10} {name:<16} {prov.target}  (from {prov.origin})")
    for (group, name), path in sorted(USER_OPTIONS.items()):
        lines.append(f"{group:<10} {name:<16} config  (from {path})")
    return lines


def load_group_option(group: str, option: str) -> dict[str, Any]:
    """The resolved node of one option of a config group (e.g. the reference optimizer's config)."""
    cfg = compose_config([f"{group}={option}"])
    return plain_dict(cfg[group])

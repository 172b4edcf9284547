"""Plug-ins: optimizers, models and datasets from the user's own code, without editing the suite.

Two routes lead to the same result, a registry row plus a typed config schema exactly like a built-in's:

* a YAML file in a user config folder: `<dir>/<group>/<name>.yaml` (group `optimizer`, `model` or `data`)
  naming the class or factory with `_target_: package.module.Name`, its options with their defaults, and
  optionally `_capabilities_:` and `_summary_:`. The folders are listed in `$FISHERBENCH_CONFIG_PATH`
  (`os.pathsep`-separated; `--config-dir DIR` on the command lines adds to it, so the processes a sweep
  starts inherit it). Any other YAML in such a folder (an experiment preset, a variant of a built-in
  optimizer, a sweep spec under `sweep/`) is a config option like the suite's own.
* an entry point of an installed package, in the groups `fisherbench.optimizers`, `fisherbench.models`
  and `fisherbench.datasets`: the entry point's name is the config name, its object is the target (its
  options come from its signature, its capabilities from an attribute `fisherbench_capabilities`), or a
  mapping with the same keys as the YAML.

This module only reads, imports and describes plug-ins (`PluginSpec`) and builds their option schemas;
each component package turns a spec into its own kind of row (`optim.registry.plugin_row`, ...), and
`engine.compose` registers both with Hydra. The run identity includes each plug-in's import path and the
SHA-256 of the source file that defines it (`Provenance.identity`), so editing the code makes a new run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import os
import re
import typing
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import yaml

from fisherbench.core.errors import UserError

CONFIG_PATH_ENV = "FISHERBENCH_CONFIG_PATH"
# config group -> entry-point group
ENTRY_POINT_GROUPS = {"optimizer": "fisherbench.optimizers", "model": "fisherbench.models",
                      "data": "fisherbench.datasets"}
RESERVED_KEYS = ("_target_", "_capabilities_", "_summary_")
# config folders of a user config dir that hold config options (sweep specs are read by the sweep itself)
OPTION_GROUPS = ("model", "data", "optimizer", "budget", "logger", "experiment")


# ---------------------------------------------------------------------------------------- config path
def config_dirs() -> list[Path]:
    """The user config folders named by `$FISHERBENCH_CONFIG_PATH`, in order; each must exist."""
    raw = os.environ.get(CONFIG_PATH_ENV, "")
    out: list[Path] = []
    for part in raw.split(os.pathsep):
        if not part.strip():
            continue
        path = Path(part.strip()).expanduser().resolve()
        if not path.is_dir():
            raise UserError(f"{CONFIG_PATH_ENV} names {part!r}, which is not a folder; give the folder that "
                            f"holds your optimizer/, model/, data/ or sweep/ configs")
        if path not in out:
            out.append(path)
    return out


def add_config_dirs(dirs: Iterable[str | Path]) -> None:
    """Put folders in front of `$FISHERBENCH_CONFIG_PATH` (the environment: a sweep's runs inherit it)."""
    new = [str(Path(d).expanduser().resolve()) for d in dirs]
    for d in new:
        if not Path(d).is_dir():
            raise UserError(f"--config-dir {d}: no such folder")
    old = [p for p in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if p.strip()]
    os.environ[CONFIG_PATH_ENV] = os.pathsep.join(dict.fromkeys([*new, *old]))


def split_config_dir_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(`--config-dir` folders, the other arguments). Accepts `--config-dir DIR`, `--config-dir=DIR`,
    `-cd DIR` (Hydra's spelling) and `hydra.searchpath=[file://DIR,...]`: all become one config path, so
    that a plug-in's YAML is read by the plug-in loader (typed) and never by Hydra as an untyped file."""
    dirs: list[str] = []
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("--config-dir", "-cd"):
            value = next(it, None)
            if value is None:
                raise UserError(f"{arg} needs a folder")
            dirs.append(value)
        elif arg.startswith("--config-dir="):
            dirs.append(arg.split("=", 1)[1])
        elif arg.startswith("hydra.searchpath="):
            for item in re.split(r"\s*,\s*", arg.split("=", 1)[1].strip().strip("[]")):
                item = item.strip().strip("'\"")
                if not item:
                    continue
                if not item.startswith("file://"):
                    raise UserError(f"hydra.searchpath: only file:// folders are supported here, got {item!r} "
                                    "(use --config-dir DIR)")
                dirs.append(item[len("file://"):])
        else:
            rest.append(arg)
    return dirs, rest


# ------------------------------------------------------------------------------------------ provenance
@dataclass(frozen=True)
class Provenance:
    """Where a plug-in comes from. `identity()` goes into the run identity (what can change the result)."""

    target: str  # import path of the class or factory, e.g. "signsgd.SignSGD"
    source_file: Optional[str]
    source_sha256: Optional[str]
    origin: str  # the YAML file, or "entry point <name> of <dist> <version>"

    def identity(self) -> dict[str, Any]:
        return {"target": self.target, "source_sha256": self.source_sha256}


def source_of(obj: Any) -> tuple[Optional[str], Optional[str]]:
    """(file, SHA-256 of its bytes) of the source file that defines `obj`; (None, None) when it has none."""
    try:
        path = inspect.getsourcefile(obj)
    except TypeError:  # a builtin or C extension: no source file
        path = None
    if not path or not Path(path).is_file():
        return None, None
    return str(Path(path).resolve()), hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class PluginSpec:
    """One plug-in as read from a YAML file or an entry point, before its component package builds the row."""

    group: str  # optimizer | model | data
    name: str
    target: Any  # the imported class or factory
    values: dict[str, Any]  # option values given (YAML), without the reserved keys
    capabilities: dict[str, Any]
    summary: str
    provenance: Provenance

    @property
    def where(self) -> str:
        return self.provenance.origin


def import_target(path: Any, where: str) -> Any:
    """Import `package.module.Name` (or `package.module:Name`); UserError saying how to fix it otherwise."""
    if not isinstance(path, str) or not path.strip():
        raise UserError(f"{where}: `_target_` must be an import path such as mypkg.SignSGD, got {path!r}")
    path = path.strip()
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise UserError(f"{where}: `_target_: {path}` is not an import path; write module.Name (e.g. "
                        f"signsgd.SignSGD for class SignSGD in signsgd.py)")
    hint = (f"Make `{module_name}` importable: put the folder that holds it on PYTHONPATH (e.g. "
            f"`export PYTHONPATH=/path/to/folder`) or install its package, and check the spelling.")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UserError(f"{where}: `_target_: {path}` does not import: {exc}. {hint}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing: say so, briefly
        raise UserError(f"{where}: `_target_: {path}`: importing {module_name} raised "
                        f"{type(exc).__name__}: {exc}. Fix the module (run `python -c 'import {module_name}'` "
                        f"to see the traceback).") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        names = [n for n in dir(module) if not n.startswith("_")]
        raise UserError(f"{where}: `_target_: {path}`: module {module_name} has no `{attr}` (it has: "
                        f"{', '.join(names[:20])}). {hint}") from None


_PACKAGE = re.compile(r"^#\s*@package\s+(\S+)\s*$")


def package_header(path: Path) -> Optional[str]:
    """The `# @package <pkg>` directive of a config file's leading comments (Hydra reads it from files only;
    the loader hands it on when it stores the option, e.g. `_global_` for an experiment preset)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if not line.lstrip().startswith("#"):
            return None
        match = _PACKAGE.match(line.strip())
        if match:
            return match.group(1)
    return None


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping of keys to values")
    return raw


def spec_from_mapping(group: str, name: str, raw: dict[str, Any], origin: str,
                      target: Any = None) -> PluginSpec:
    """A `PluginSpec` from a YAML mapping (or an entry point's mapping / object)."""
    if "defaults" in raw:
        raise UserError(f"{origin}: a plug-in config (with `_target_`) takes no `defaults` list; its schema is "
                        "built from the class. Remove `defaults`.")
    values = {k: v for k, v in raw.items() if k not in RESERVED_KEYS}
    if "name" in values and values.pop("name") != name:
        raise UserError(f"{origin}: `name: {raw['name']}` differs from the config name '{name}' (the file name); "
                        f"drop `name` or make them equal")
    for key in values:
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_"):
            raise UserError(f"{origin}: option {key!r} is not a valid option name (a Python identifier not "
                            "starting with `_`; reserved: " + ", ".join(RESERVED_KEYS) + ")")
    caps = raw.get("_capabilities_") or {}
    if not isinstance(caps, dict):
        raise UserError(f"{origin}: `_capabilities_` must be a mapping, e.g. {{needs_closure: false}}")
    if target is None:
        target = import_target(raw.get("_target_"), origin)
    file, sha = source_of(target)
    qual = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', getattr(target, '__name__', '?'))}"
    summary = str(raw.get("_summary_") or (inspect.getdoc(target) or "").split("\n")[0] or qual)
    return PluginSpec(group, name, target, values, dict(caps), summary, Provenance(qual, file, sha, origin))


@dataclass
class UserConfigs:
    """What the user config folders hold: plug-ins (YAML with `_target_`) and plain config options."""

    plugins: list[PluginSpec] = field(default_factory=list)
    # group, name, node, file, package (`# @package` header)
    options: list[tuple[str, str, dict[str, Any], Path, Optional[str]]] = field(default_factory=list)


def scan_config_dirs(dirs: Iterable[Path]) -> UserConfigs:
    """Read every `<dir>/<group>/<name>.yaml` of the user config folders (names starting with `_` are parts
    for `defaults` lists, not options). The first folder that defines a name wins, as on a search path."""
    found = UserConfigs()
    seen: dict[tuple[str, str], Path] = {}
    for d in dirs:
        for group in OPTION_GROUPS:
            for path in sorted((d / group).glob("*.yaml")):
                if path.stem.startswith("_") or (group, path.stem) in seen:
                    continue
                seen[(group, path.stem)] = path
                raw = read_yaml(path)
                if "_target_" in raw:
                    if group not in ENTRY_POINT_GROUPS:
                        raise UserError(f"{path}: `_target_` plug-ins live in optimizer/, model/ or data/, "
                                        f"not in {group}/")
                    found.plugins.append(spec_from_mapping(group, path.stem, raw, str(path)))
                else:
                    found.options.append((group, path.stem, raw, path, package_header(path)))
    return found


def entry_point_plugins() -> list[PluginSpec]:
    """Plug-ins that installed packages declare in the `fisherbench.*` entry-point groups."""
    out = []
    for group, ep_group in ENTRY_POINT_GROUPS.items():
        for ep in metadata.entry_points(group=ep_group):
            dist = getattr(ep, "dist", None)
            origin = (f"entry point '{ep.name}' ({ep_group}) of package "
                      f"{getattr(dist, 'name', '?')} {getattr(dist, 'version', '')}".rstrip())
            try:
                obj = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken installed package: name it, do not crash deep
                raise UserError(f"{origin}: `{ep.value}` does not import ({type(exc).__name__}: {exc}). "
                                f"Reinstall or fix the package, or uninstall it.") from None
            if isinstance(obj, dict):
                out.append(spec_from_mapping(group, ep.name, obj, origin))
            else:
                raw = {"_capabilities_": dict(getattr(obj, "fisherbench_capabilities", None) or {})}
                out.append(spec_from_mapping(group, ep.name, raw, origin, target=obj))
    return out


# -------------------------------------------------------------------------------------- option schemas
_SCALARS = (bool, int, float, str)


def _value_type(value: Any) -> Any:
    """The config type of a value, or None when a config cannot hold it (a callable, a tensor, ...)."""
    if isinstance(value, _SCALARS):
        return type(value)
    if isinstance(value, (list, tuple)):
        kinds = {_value_type(v) for v in value}
        if kinds <= {int, float} and float in kinds:
            return list[float]
        if len(kinds) == 1 and next(iter(kinds)) in _SCALARS:
            return list.__class_getitem__(next(iter(kinds)))  # list[<that scalar type>]
        return list[Any] if None not in kinds else None
    if isinstance(value, dict):
        return dict[str, Any]
    return None


def _annotation_type(annotation: Any) -> Any:
    """A plain scalar type a signature annotates (`float`, `Optional[int]`, "float"); None otherwise."""
    if isinstance(annotation, str):
        annotation = {"float": float, "int": int, "bool": bool, "str": str}.get(annotation.strip())
    if annotation in _SCALARS:
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1 and args[0] in _SCALARS:
        return args[0]
    return None


def option_type(value: Any, default: Any, annotation: Any) -> Any:
    """The type of one option: from the given value, the signature's default and its annotation.

    Integers widen to float where any source says float (`momentum: 0` in a YAML for a float default); an
    option whose values are all None takes the annotation's type, else Any; None is allowed where a value
    or the default is None. Returns None when no config type can hold it.
    """
    if value is None and default is not None and _value_type(default) is None:
        return None  # e.g. a callable default: the factory keeps it
    kinds = [t for t in (_value_type(value), _value_type(default), _annotation_type(annotation)) if t is not None]
    nullable = value is None or default is None
    if not kinds:
        return Optional[Any] if nullable else None
    if set(kinds) <= {int, float}:
        t: Any = float if float in kinds else int
    elif len(set(kinds)) == 1:
        t = kinds[0]
    elif value is not None and _value_type(value) is not None:
        t = _value_type(value)  # the YAML's value says what the user means
    else:
        return Optional[Any] if nullable else None
    return Optional[t] if nullable else t


def signature_options(factory: Callable[..., Any], skip: Iterable[str] = ()) -> tuple[
        dict[str, inspect.Parameter], bool]:
    """(keyword parameters of `factory` by name, whether it takes **kwargs), without `skip`."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}, True
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {n: p for n, p in params.items() if p.kind in kinds and n not in set(skip) and n != "self"}
    return named, any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def options_schema(spec: PluginSpec, base: type, factory: Callable[..., Any], *, skip: Iterable[str] = (),
                   held_back: Iterable[str] = ()) -> type:
    """The options dataclass of a plug-in: `base`'s fields, the factory's keyword parameters that have a
    default a config can hold, and the YAML's values (defaults). Hydra types the config group by it, so an
    unknown key or a wrong type fails at compose time.

    A YAML key that is neither a field of `base` nor a parameter of the factory is refused (UserError naming
    the file), unless the factory takes **kwargs; so is a parameter without a default that the YAML does not
    set. `held_back` names base fields the suite reads itself (never passed to the factory).
    """
    params, var_kw = signature_options(factory, skip)
    base_fields = {f.name: f for f in dataclasses.fields(base)}
    what = describe_target(spec.target)
    unknown = [k for k in spec.values if k not in params and k not in base_fields and not var_kw]
    if unknown:
        raise UserError(
            f"{spec.where}: option(s) {unknown} are not parameters of {what} (it takes: "
            f"{', '.join(params) or 'no keyword parameters'}). Remove them from the YAML, or add them to "
            f"{what}'s signature.")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in spec.values
               and n not in base_fields]
    if missing:
        raise UserError(f"{spec.where}: {what} needs a value for {missing} (no default in its signature); add "
                        f"e.g. `{missing[0]}: <value>` to the YAML")
    fields: list[tuple[str, Any, Any]] = []
    for name in dict.fromkeys([*params, *spec.values]):
        if name in base_fields and name not in spec.values and name not in params:
            continue
        p = params.get(name)
        default = None if p is None or p.default is inspect.Parameter.empty else p.default
        value = spec.values.get(name, default)
        if name in base_fields:
            t = base_fields[name].type
            t = typing.get_type_hints(base).get(name, t)
        else:
            t = option_type(value, default, None if p is None else p.annotation)
        if t is None:
            if name in spec.values:
                raise UserError(f"{spec.where}: option {name!r} = {value!r} is not a value a config can hold")
            continue  # e.g. a callable default: not an option, the factory keeps its default
        if name in held_back:
            continue
        value = float(value) if t in (float, Optional[float]) and isinstance(value, int) and not isinstance(
            value, bool) else value
        if isinstance(value, (list, tuple, dict)):
            frozen: list[Any] | dict[Any, Any] = list(value) if isinstance(value, (list, tuple)) else dict(value)
            fields.append((name, t, field(default_factory=frozen.copy)))
        else:
            fields.append((name, t, field(default=value)))
    fields.append(("name", str, field(default=spec.name)))
    class_name = "".join(p.capitalize() for p in re.split(r"[^0-9A-Za-z]+", spec.name) if p) + "Options"
    return dataclasses.make_dataclass(class_name, fields, bases=(base,))


def describe_target(target: Any) -> str:
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"


def check_capabilities(spec: PluginSpec, known: dict[str, type]) -> dict[str, Any]:
    """The plug-in's `_capabilities_`, each key known and of its type (UserError naming the file)."""
    unknown = sorted(set(spec.capabilities) - set(known))
    if unknown:
        raise UserError(f"{spec.where}: unknown capabilities {unknown}; known: {', '.join(known)}")
    for key, value in spec.capabilities.items():
        want = known[key]
        if value is not None and not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
            raise UserError(f"{spec.where}: capability {key} must be {want.__name__}, got {value!r}")
    return dict(spec.capabilities)


# ---------------------------------------------------------------------------------- loaded plug-ins
# (group, name) -> Provenance of every plug-in registered in this process (the run identity reads it)
LOADED: dict[tuple[str, str], Provenance] = {}


def provenance(group: str, name: str) -> Optional[Provenance]:
    return LOADED.get((group, name))

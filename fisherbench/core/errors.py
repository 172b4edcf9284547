"""Errors a user can cause, and composition errors turned into messages that list the valid keys.

The rule the whole suite follows: anything a user can fix (a bad value, an unknown name, a missing dataset
file, an unwritable results directory) raises `UserError` with a message that says what to do, and the
command exits with code 2 before anything is trained. Every other exception is a bug: a run records it as
`failed` with the traceback in `error.txt`, and it is never presented as a configuration error.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from hydra.errors import HydraException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError


class UserError(ValueError):
    """Something the user can fix; the message says what to do (exit code 2).

    A ValueError, as invalid arguments are in Python; but a plain ValueError is not a UserError: only what a
    component raises as UserError is presented to the user as their mistake.
    """


class CorruptRunDirectoryError(UserError):
    """The run directory of the requested run does not validate; nothing was changed in it (exit code 2). The
    user inspects it, then deletes it or passes overwrite=true. Launchers report the run as `corrupt`."""


def is_compose_error(exc: BaseException) -> bool:
    return isinstance(exc, (HydraException, OmegaConfBaseException))


def _omegaconf_cause(exc: BaseException) -> Any:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def explain_compose_error(exc: BaseException) -> str:
    """The Hydra message, plus the valid keys of the node when a key was unknown or mistyped."""
    message = str(exc).strip()
    cause = _omegaconf_cause(exc)
    if cause is not None and cause is not exc:
        message = f"{message}\n{str(cause).strip()}"
    if cause is None:
        return message
    obj_type = getattr(cause, "object_type", None)
    full_key = getattr(cause, "full_key", None) or ""
    if dataclasses.is_dataclass(obj_type):
        fields = {f.name: f.type for f in dataclasses.fields(obj_type)}
        where = full_key.rsplit(".", 1)[0] if "." in full_key else "the top level"
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            message += f"\nValid keys in {where}: {', '.join(fields)}"
        elif isinstance(cause, ValidationError):
            key = full_key.rsplit(".", 1)[-1]
            if key in fields:
                message += f"\n'{full_key}' must be of type {_type_name(fields[key])}"
    message += "\n(Run `python train.py --cfg job` to print the composed config, or `--help` for the groups.)"
    return message


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")

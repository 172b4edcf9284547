"""Override strings the sweep builds, written so that Hydra parses back exactly the value meant.

A value taken from outside the spec (a results directory, an Optuna choice, a trial's tags) can hold spaces,
parentheses, quotes, `$`, commas or `=`, all of which mean something in Hydra's override grammar; unquoted,
`results_dir=/tmp/my runs (v2)` does not even parse. Strings are therefore written as Hydra quoted strings
(Hydra's own `QuotedString.with_quotes` escapes quotes and the backslashes before them), and `${` is escaped
as `\\${` so that OmegaConf keeps it literally instead of reading an interpolation. Command lines printed for
a shell are quoted with `shlex`.
"""
from __future__ import annotations

import math
import re
import shlex
from typing import Any, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Quote, QuotedString
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fisherbench.core.errors import UserError

# a string Hydra reads back unchanged without quotes (and not as a number, bool or null): paths and names
_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./+-]*")
_NOT_STRINGS = {"true", "false", "null", "nan", "inf", "none"}


def hydra_value(value: Any) -> str:
    """`value` in Hydra's override grammar (None, bool, int, float, str, and lists of those)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and value.lower() not in _NOT_STRINGS:
            return value
        # double quotes unless the value has some: the line stays readable inside a shell's single quotes
        quote = Quote.single if '"' in value else Quote.double
        return QuotedString(text=value.replace("${", "\\${"), quote=quote).with_quotes()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    raise TypeError(f"no Hydra override form for {type(value).__name__} {value!r}")


def override(key: str, value: Any) -> str:
    """`key=<value>` with the value quoted/escaped as Hydra needs it."""
    return f"{key}={hydra_value(value)}"


def parse_override_value(text: str) -> Any:
    """The value one `key=value` override gives its key in the composed config: as Hydra parses it (quotes
    removed, escapes undone), then as OmegaConf resolves it (`\\${` a literal `${`, `${oc.env:X}` resolved).

    Raises UserError for an override that does not parse or resolve on its own, with the reason.
    """
    try:
        parsed = OverridesParser.create().parse_override(text)
    except HydraException as exc:  # OverrideParseException and the grammar's token errors
        raise UserError(f"cannot parse the override {text!r}: {str(exc).splitlines()[0]}. Quote values with "
                        "spaces or special characters, e.g. results_dir='/data/my runs'") from None
    try:
        return OmegaConf.to_container(OmegaConf.create({"value": parsed.value()}), resolve=True)["value"]
    except OmegaConfBaseException as exc:
        raise UserError(f"the override {text!r} does not resolve on its own ({exc}); write the value itself "
                        "(a literal `${` is written `\\${`)") from None


def shell_line(args: Sequence[str]) -> str:
    """A command line a shell runs as given (every argument quoted where it needs it)."""
    return shlex.join(str(a) for a in args)

"""A small name -> builder registry whose entries carry a config schema and capabilities.

Each component package (`models`, `data`, `optim`) owns one `Registry`. An entry says how to build the
thing (`builder`), which options it accepts (`schema`, a dataclass that Hydra uses to type-check the config
group at compose time) and what it can do (`capabilities`, a frozen dataclass the trainer reads instead of
branching on names).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from fisherbench.core.errors import UserError

B = TypeVar("B", bound=Callable[..., Any])


class UnknownNameError(UserError, KeyError):
    """Raised for a name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    name: str
    builder: Callable[..., Any]
    schema: type
    capabilities: Any = None
    summary: str = ""
    source: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


class Registry(Generic[B]):
    """Name -> `Entry`. `kind` is used in messages ("unknown optimizer 'adamm'; did you mean 'adam'?")."""

    def __init__(self, kind: str, config_group: str | None = None) -> None:
        self.kind = kind
        self.config_group = config_group or kind
        self._entries: dict[str, Entry] = {}

    def register(
        self,
        name: str,
        *,
        schema: type,
        capabilities: Any = None,
        summary: str = "",
        source: str = "",
        tags: tuple[str, ...] = (),
    ) -> Callable[[B], B]:
        """Decorator: `@REGISTRY.register("resnet18_cifar", schema=ResNetOptions, capabilities=...)`."""
        if not dataclasses.is_dataclass(schema):
            raise TypeError(f"{self.kind} '{name}': schema must be a dataclass, got {schema!r}")
        if "name" not in {f.name for f in dataclasses.fields(schema)}:
            raise TypeError(f"{self.kind} '{name}': schema {schema.__name__} needs a `name: str` field")

        def decorator(builder: B) -> B:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = Entry(name, builder, schema, capabilities, summary, source, tuple(tags))
            return builder

        return decorator

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._entries, n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return (
            f"unknown {self.kind} '{name}'.{hint} Valid choices: {', '.join(sorted(self._entries))}. "
            f"(Hydra: `{self.config_group}=<choice>`.)"
        )

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def options_from(schema: type, values: Any) -> Any:
    """Build a schema dataclass instance from a mapping/DictConfig, rejecting unknown keys with the valid list."""
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        return values
    valid = {f.name for f in dataclasses.fields(schema)}
    data = dict(values)
    unknown = sorted(set(data) - valid)
    if unknown:
        raise UserError(f"{schema.__name__}: unknown option(s) {unknown}; valid options: {sorted(valid)}")
    return schema(**data)

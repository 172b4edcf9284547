"""Render the optimizer tables of docs/optimizers.md from the registry and fisherbench/configs/optimizer/*.yaml.

Two tables, between markers: what each registered optimizer is (class, source, capabilities, configs) and its
schema defaults. They hold only what the registry and the YAML files say (no installed versions), so
`--check` gives the same answer on every machine.

    python scripts/capability_table.py           # rewrite the tables between the markers
    python scripts/capability_table.py --check   # exit 1 if docs/optimizers.md is stale
    python scripts/capability_table.py --print   # print the tables only
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from fisherbench import optim
from fisherbench.optim.registry import describe

ROOT = Path(__file__).resolve().parent.parent

DOC = ROOT / "docs" / "optimizers.md"
CONFIG_DIR = ROOT / "fisherbench" / "configs" / "optimizer"
START, END = "<!-- capabilities:start -->", "<!-- capabilities:end -->"

COLUMNS = (
    "name", "class", "adapter", "source", "family", "takes the model", "create_graph", "owns fwd/bwd", "DDP", "AMP",
    "eval weights", "curvature period", "configs", "summary",
)
# options every schema has; the defaults table shows them only where an optimizer changes them
COMMON_DEFAULTS = {"no_decay_bias_norm": False, "grad_clip": None}


def _flag(value: bool) -> str:
    return "yes" if value else "-"


def _value(v: object) -> str:
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-2:  # 0.0005 -> 5e-4, as the YAML files write it
            mantissa, exponent = f"{v:.6e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def configs_by_entry() -> dict[str, list[str]]:
    """Registry name -> the config files (fisherbench/configs/optimizer/<file>.yaml) that select it."""
    out: dict[str, list[str]] = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        name = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("name")
        out.setdefault(str(name), []).append(path.stem)
    return out


def defaults_of(schema: type) -> dict[str, object]:
    """Schema default of every option but `name`."""
    instance = schema()
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(schema) if f.name != "name"}


def render() -> str:
    """The Markdown tables for every registered optimizer, sorted by name."""
    configs = configs_by_entry()
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name in optim.OPTIMIZERS.names():
        r = optim.row(name)
        caps = r.capabilities
        target = r.optimizer if isinstance(r.optimizer, str) else describe(r.optimizer)
        cells = [
            f"`{name}`", f"`{target.replace(':', '.')}`", f"`{r.adapter.__name__}`", r.source, r.family,
            _flag(r.takes_model),
            _flag(caps.needs_create_graph), _flag(r.overrides("forward_backward")), _flag(caps.supports_ddp),
            _flag(caps.supports_amp), _flag(r.overrides("eval_weights")),
            f"`{caps.period_option}`" if caps.period_option else "-",
            ", ".join(f"`{c}`" for c in configs.get(name, [])) or "-", r.summary.replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| name | schema defaults (= its plain config; `fisherbench/configs/optimizer/<name>.yaml`) |", "|---|---|"]
    for name in optim.OPTIMIZERS.names():
        defaults = defaults_of(optim.row(name).schema)
        shown = [f"{k} {_value(v)}" for k, v in defaults.items()
                 if not (k in COMMON_DEFAULTS and v == COMMON_DEFAULTS[k])]
        lines.append(f"| `{name}` | {', '.join(shown)} |")
    return "\n".join(lines)


def splice(text: str, table: str) -> str:
    """`text` with the block between the capability markers replaced by `table`."""
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ValueError(f"the document needs the markers {START} ... {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if docs/optimizers.md is stale")
    mode.add_argument("--print", action="store_true", help="print the tables and exit")
    args = parser.parse_args(argv)
    table = render()
    if args.print:
        print(table)
        return 0
    current = DOC.read_text(encoding="utf-8")
    updated = splice(current, table)
    if args.check:
        if updated != current:
            print("docs/optimizers.md tables are stale: run `python scripts/capability_table.py`", file=sys.stderr)
            return 1
        return 0
    if updated != current:
        DOC.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Render the optimizer capability table from the registry into README.md.

The table holds only what the registry says (no installed versions), so `--check` gives the same answer on
every machine.

    python scripts/capability_table.py           # rewrite the table between the README markers
    python scripts/capability_table.py --check   # exit 1 if the README table is stale
    python scripts/capability_table.py --print   # print the table only
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

README = ROOT / "README.md"
START, END = "<!-- capabilities:start -->", "<!-- capabilities:end -->"

COLUMNS = (
    "name", "source", "family", "needs model (hooks)", "create_graph", "owns fwd/bwd", "DDP", "AMP",
    "eval weights", "curvature period", "summary",
)


def _flag(value: bool) -> str:
    return "yes" if value else "-"


def render() -> str:
    """The Markdown table for every registered optimizer, sorted by name."""
    import optim
    from optim.registry import Capabilities

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for entry in optim.OPTIMIZERS.entries():
        caps: Capabilities = entry.capabilities or Capabilities()
        cells = [
            f"`{entry.name}`", entry.source, caps.family, _flag(caps.needs_model),
            _flag(caps.needs_create_graph), _flag(caps.owns_forward_backward), _flag(caps.supports_ddp),
            _flag(caps.supports_amp), _flag(caps.eval_weights),
            f"`{caps.period_option}`" if caps.period_option else "-", entry.summary.replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def splice(readme: str, table: str) -> str:
    """README text with the block between the capability markers replaced by `table`."""
    if START not in readme or END not in readme or readme.index(START) > readme.index(END):
        raise ValueError(f"README.md needs the markers {START} ... {END}")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    mode.add_argument("--print", action="store_true", help="print the table and exit")
    args = parser.parse_args(argv)
    table = render()
    if args.print:
        print(table)
        return 0
    current = README.read_text(encoding="utf-8")
    updated = splice(current, table)
    if args.check:
        if updated != current:
            print("README.md capability table is stale: run `python scripts/capability_table.py`", file=sys.stderr)
            return 1
        return 0
    if updated != current:
        README.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

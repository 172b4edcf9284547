"""`python -m fisherbench <verb> [args]` (also the `fisherbench` console script): one entry point per verb.

    python -m fisherbench train [overrides]          # one run (= python train.py in a checkout)
    python -m fisherbench sweep <spec> [options]     # a sweep spec's runs
    python -m fisherbench report <spec> [options]    # tables and figures from the store
    python -m fisherbench results ls|show|best|...   # browse a results store
    python -m fisherbench prepare-data [targets]     # download and verify datasets
"""
from __future__ import annotations

import importlib
import os
import sys

from fisherbench import use_files_only_backend

# verb -> module whose `main()` runs it; imported only when chosen, so `--help` costs no torch import
VERBS = {
    "train": "fisherbench.train",
    "sweep": "fisherbench.sweep.cli",
    "report": "fisherbench.report",
    "results": "fisherbench.results.browse",
    "prepare-data": "fisherbench.prepare_data",
}


def _usage() -> str:
    return __doc__.split("\n\n")[1] if __doc__ else ""


def main(argv: list[str] | None = None) -> int:
    use_files_only_backend()
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: fisherbench <verb> [args]  (verbs: " + ", ".join(VERBS) + ")\n\n" + _usage())
        return 0
    if args[0] in ("-V", "--version"):
        from fisherbench import __version__
        print(f"fisherbench {__version__}")
        return 0
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        print(f"fisherbench: unknown verb {verb!r}; choose one of {', '.join(VERBS)} (`fisherbench --help`)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb])
    sys.argv = [f"fisherbench {verb}", *rest]  # the verb's own parser (argparse or Hydra) reads sys.argv
    try:
        code = module.main()
    except BrokenPipeError:  # `fisherbench sweep --list | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())

"""fisherbench: reproduce, sweep and compare second-order and Fisher-based optimizers under honest budgets.

One import name for the whole suite. Layers run one way (``lint-imports`` checks it):
``fisherbench.core`` → ``fisherbench.optim | .models | .data`` → ``fisherbench.engine`` →
``fisherbench.analysis`` → ``fisherbench.sweep`` → ``fisherbench.results``. The command-line entry points
(``fisherbench.train``, ``fisherbench.report``, ``fisherbench.prepare_data`` and ``python -m fisherbench``) sit
above every layer. Configs ship inside the package (``fisherbench/configs``).
"""

__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it from here)


def use_files_only_backend() -> None:
    """The command-line entry points draw into files only: matplotlib's Agg backend unless the user chose one
    (`MPLBACKEND`). Library modules never choose a backend (a notebook keeps its own); an entry point calls this
    first thing in its `main()`, before anything imports matplotlib."""
    import os

    os.environ.setdefault("MPLBACKEND", "Agg")

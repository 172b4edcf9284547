"""Reports from the results store: paper tables, ad-hoc comparisons, time to target, searches, figures, and
the store browser (`python -m fisherbench results ls|show|best|trials|wandb`).

- `runs`: the store as reports see it (validated reading, corrupt runs listed, config-key filters);
- `report`: tables from plain input (`ReportSpec`: composed cells, seeds, metrics, the paper's values),
  honest verdicts; `adhoc`: tables from a store without a spec; `tables`: Markdown/CSV/LaTeX;
- `profiles`: time to target and performance profiles; `trials`: Optuna studies; `figures`: the figures;
- `browse`: the command line; `wandb_offline`: reading offline W&B run files.

This package never imports the sweep or the run layer (an import-linter contract): entry points such as
`fisherbench/report.py` compose a sweep spec's cells and pass them in. The store itself (reading and writing run
directories) is `fisherbench.core.store`. Generated tables and figures go under `--out` (default `reports/` in the
working directory: `reports/tables/` and `reports/figures/`, outside any package).
"""

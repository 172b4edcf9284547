"""Reports from the results store: paper tables, ad-hoc comparisons, figures, and the store browser.

The store itself (reading and writing run directories) is `fisherbench.store`; generated tables and
figures are written under `results/tables/` and `results/figures/` (gitignored).
"""

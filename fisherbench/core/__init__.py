"""The core types every layer shares: registry base, config schemas, Status, UserError, the results store,
checkpoints, the time ledger, budgets, schedules, tasks and scores.

The component packages (`fisherbench.optim`, `.models`, `.data`) and the layers above them each own one job;
this package holds only what they need in common, so that no fact lives in two places.
"""

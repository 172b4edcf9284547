"""fisherbench core: the pieces every run shares (registry base, config schemas, budget clock, trainer).

The component packages (`optim`, `models`, `data`, `results`, `sweep`) each own one job; this package holds
only what they need in common, so that no fact lives in two places.
"""

__version__ = "0.1.0"

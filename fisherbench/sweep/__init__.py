"""Sweeps: expand a paper table's spec (`fisherbench/configs/sweep/`) into runs and run them locally (CPU, one GPU, a GPU
queue, torchrun), on SLURM through Hydra's submitit launcher, or as a resumable Optuna search.

    python -m fisherbench sweep <spec> [overrides] [--dry-run] [--gpus 0,1] [--arms main,fixed] ...
"""
from fisherbench.sweep.expand import PlannedRun, expand  # noqa: F401
from fisherbench.sweep.spec import SweepSpec, load_spec  # noqa: F401

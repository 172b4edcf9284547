"""Hydra configs shipped with the package: `train.yaml` and the config groups (loaded as `pkg://fisherbench.configs`)."""

"""Tasks: the loss the optimizer minimises and the metrics a run reports, per kind of dataset.

Metrics are accumulated as on-device sums (no host sync per batch) and turned into numbers once per
evaluation. Each task names the metric that selects the "best" evaluation, as the paper does: the max over
evaluations of test top-1 for classification; test perplexity at the best validation perplexity for
language modelling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fisherbench.core.scores import selection_direction

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Task:
    name: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batch_sums: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
    finalize: Callable[[dict[str, float]], dict[str, float]]
    select_split: str  # split whose metric selects the best evaluation
    select_metric: str
    higher_is_better: bool


def _classification_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs.float(), targets)


def _classification_sums(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs = outputs.float()
    k = min(5, outputs.shape[1])
    topk = outputs.topk(k, dim=1).indices
    hits = topk.eq(targets.unsqueeze(1))
    return {
        "loss_sum": F.cross_entropy(outputs, targets, reduction="sum"),
        "count": torch.tensor(targets.numel(), device=outputs.device, dtype=torch.float64),
        "correct1": hits[:, :1].sum(),
        "correct5": hits.sum(),
    }


def _classification_finalize(s: dict[str, float]) -> dict[str, float]:
    n = max(s["count"], 1.0)
    return {"loss": s["loss_sum"] / n, "acc1": s["correct1"] / n, "acc5": s["correct5"] / n}


def _lm_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def _lm_sums(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    flat_t = targets.flatten()
    return {
        "loss_sum": F.cross_entropy(
            outputs.flatten(0, -2).float(), flat_t, ignore_index=IGNORE_INDEX, reduction="sum"
        ),
        "count": (flat_t != IGNORE_INDEX).sum().to(torch.float64),
    }


def _lm_finalize(s: dict[str, float]) -> dict[str, float]:
    nll = s["loss_sum"] / max(s["count"], 1.0)  # per-token NLL
    return {"loss": nll, "ppl": math.exp(min(nll, 700.0))}


TASKS: dict[str, Task] = {
    "classification": Task(
        "classification", _classification_loss, _classification_sums, _classification_finalize,
        select_split="test", select_metric="acc1", higher_is_better=True,
    ),
    "language_model": Task(
        "language_model", _lm_loss, _lm_sums, _lm_finalize,
        select_split="val", select_metric="ppl", higher_is_better=False,
    ),
}


def selection_of(task: Task, metric: Optional[str] = None, mode: Optional[str] = None) -> tuple[str, bool]:
    """(row key, higher is better) of the metric that selects a run's best evaluation.

    `metric=None` is the task's own (the paper's protocol); otherwise "<split>/<metric>", in the direction
    `mode` says ("max" or "min") or, without one, the direction `scores.higher_is_better` reads from the key
    (the one rule for it: accuracies up; losses, perplexities and errors down; anything else must be told).
    """
    if metric is None:
        return f"{task.select_split}/{task.select_metric}", task.higher_is_better
    return metric, selection_direction(metric, mode)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}") from None


class MetricSums:
    """Running on-device sums of a task's batch statistics."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        with torch.no_grad():
            for k, v in self.task.batch_sums(outputs, targets).items():
                v = v.detach().to(torch.float64)
                self.sums[k] = self.sums[k] + v if k in self.sums else v

    def compute(self) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).cpu().tolist()  # one host sync
        return self.task.finalize(dict(zip(keys, values)))

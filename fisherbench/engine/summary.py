"""What a finished run records (`summary.json`) and the one line `train.py` prints about it."""
from __future__ import annotations

import datetime as _dt
from typing import Any, Optional

from fisherbench.core.budget import DerivedBudget
from fisherbench.core.distributed import all_gather_object
from fisherbench.core.env import load_average, peak_memory_bytes
from fisherbench.core.modules import params_sha256
from fisherbench.core.status import SUCCESS, Status
from fisherbench.core.summary import RunSummary
from fisherbench.engine.labels import line_tag


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def make_summary(cfg: Any, trainer: Any, status: Status, rid: str, param_count: int, error: Optional[str],
                 device: Any, derived: Optional[DerivedBudget], load_avg_start: Optional[float] = None,
                 ) -> dict[str, Any]:
    """The content of `summary.json` for a run that stopped with `status` (`trainer` is an engine Trainer)."""
    st, task = trainer.state, trainer.task
    select, higher_is_better = trainer.selection
    distributed = trainer.dist.enabled
    final_sha = params_sha256(trainer.model)
    record = RunSummary(
        run_id=rid,
        status=str(status),
        stop_reason=st.stop_reason,
        choices=dict(cfg.get("_choices", {}) or {}),
        experiment=cfg.experiment,
        model=cfg.model.name,
        data=cfg.data.name,
        optimizer=cfg.optimizer.name,
        seed=int(cfg.seed),
        task=task.name,
        select_metric=select,
        higher_is_better=higher_is_better,
        best=st.best,
        final=st.last_eval,
        epochs_done=st.epoch + st.batch / max(1, trainer.steps_per_epoch),
        steps=st.step,
        steps_per_epoch=trainer.steps_per_epoch,
        ledger=trainer.ledger.as_dict(),
        # what a matched pair compares (docs/wall-clock.md): time per step on the budget clock, and the machine's
        # 1-minute load average when training started and ended
        step_s=trainer.ledger.train_s / st.step if st.step else None,
        load_avg=[load_avg_start, load_average()],
        budget=trainer.plan.as_dict(),
        peak_memory_bytes=peak_memory_bytes(device),
        optimizer_state_bytes=trainer.adapter.state_bytes(),
        param_count=param_count,
        final_params_sha256=final_sha,
        diverged=st.diverged,
        error=error.strip().splitlines()[-1] if error else None,
        finished_at=utc_now(),
        # the typed record (docs/wall-clock.md lists its fields); raw blocks: calibration.json
        reference_budget=derived.as_dict() if derived is not None else None,
        # replicas must agree; record every rank's parameter hash to prove it
        world_size=trainer.dist.world_size if distributed else None,
        rank_params_sha256=all_gather_object(final_sha, trainer.dist) if distributed else None,
    )
    return record.as_dict()


def summary_line(result: Any) -> str:
    """The one line `train.py` prints at the end of a run (`result` is an engine RunResult)."""
    s = result.summary
    if result.skipped:
        return f"{line_tag()} skipped (already {s.get('status')}) · {result.run_dir}"
    metric = s.get("select_metric", "")
    best = (s.get("best") or {}).get(metric)
    final = (s.get("final") or {}).get(metric)
    led = s.get("ledger", {})

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, (int, float)) else "n/a"

    parts = [
        f"{line_tag()} {s.get('status')}",
        f"best {metric} {fmt(best)}",
        f"final {fmt(final)}",
        f"epochs {s.get('epochs_done', 0):.2f} ({s.get('steps')} steps)",
        "time " + " ".join(f"{k[:-2]} {led.get(k, 0):.1f}s" for k in
                           ("train_s", "eval_s", "log_s", "ckpt_s", "warmup_s", "wall_s")),
        str(result.run_dir),
    ]
    if s.get("stop_reason") and s.get("status") not in SUCCESS:
        parts.insert(1, f"({s['stop_reason']})")
    return " · ".join(parts)

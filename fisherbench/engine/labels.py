"""The tag that starts every line a run prints: `[fisherbench]`, or, inside a multirun, the run's label
(`[adafisher_paper s1 3/12]`: what varies across the multirun, the seed, the job's place), so that the lines
of many runs in one terminal or log can be told apart without matching them through `jobs.jsonl`."""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator

_label: ContextVar[str] = ContextVar("fisherbench_run_label", default="")


def line_tag() -> str:
    """`[fisherbench]`, or `[<label>]` while `run_label(label)` is active."""
    label = _label.get()
    return f"[{label}]" if label else "[fisherbench]"


def current_label() -> str:
    return _label.get()


@contextlib.contextmanager
def run_label(label: str) -> Iterator[None]:
    """Lines printed inside this block name the run `label` (empty: the plain `[fisherbench]` tag)."""
    token = _label.set(label)
    try:
        yield
    finally:
        _label.reset(token)

"""Cancellation at a chosen moment, to prove a brain loses nothing wherever it is cut.

A test cannot aim a cancel at "mid-commit" or "between the store commit and
the buffer delete" by hand; counting task steps can. Hypothesis picks a
step, `CancelAtStep` cancels the scope there, and a second brain on the same
data must find every acknowledged record (property_tests/test_cancel_safety.py,
property_tests/test_crash_mixed_workload.py).
"""

from __future__ import annotations

import trio

__all__ = ["CancelAtStep"]


class CancelAtStep(trio.abc.Instrument):
    """Cancels ``scope`` just before the ``step``-th task step of the run."""

    def __init__(self, step: int, scope: trio.CancelScope) -> None:
        self.step = step
        self.scope = scope
        self.count = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.count += 1
        if self.count == self.step:
            self.scope.cancel()

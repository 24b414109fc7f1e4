"""Staged OpAMP rollouts, decided sans-IO: selectors, stages, and the next step.

A rollout gives one configuration to the agents of a project that a
**selector** matches: ``{attribute: value}``, each key compared by exact
string equality with the agent's identifying or non-identifying attribute
of that name (identifying first), all of them must match; an empty
selector matches every agent. Its targets are fixed when it starts
(store/opamp_rollouts.py records them): agents that appear later do not
join it, so its stages, counts and threshold keep meaning what they meant
when an operator read them. Only agents that accept remote configuration
are targets (the others would never be offered it, so never settle).

**Stages.** Targets are ordered by SHA-256 of (rollout id, instance uid),
so every replica computes the same order and so the canary of one rollout
is not always the same agents. The first stage (the canary) is
``ceil(targets * canary_percent / 100)`` of them (at least one when the
share is above 0; none when it is 0), then batches of ``batch_size`` until
all are assigned. `stage_ends` gives each stage's end in that order.

**The next step** (`decide`), for a running rollout, from the statuses of
the agents assigned so far:

- **halt** when the failures past those accepted on a resume exceed the
  threshold share of the assigned agents: ``(failed - accepted) * 100 >
  failure_threshold_percent * assigned``; checked before anything else,
  so a stage stops as soon as enough of it fails, not when it settles;
- **wait** while an assigned agent is pending or applying;
- **assign** the next stage once every assigned agent has settled
  (applied, failed, or superseded: its configuration replaced by another
  push or deleted);
- **complete** when there is no next stage.

An agent that never reports (offline, or stuck) keeps its stage waiting:
halt or cancel the rollout, or delete that agent's configuration (it then
counts as superseded).
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

__all__ = [
    "ROLLOUT_STATES",
    "TARGET_STATUSES",
    "Assign",
    "Complete",
    "Halt",
    "Progress",
    "Step",
    "Wait",
    "decide",
    "matches",
    "order_targets",
    "stage_ends",
]

ROLLOUT_STATES: Final = ("running", "halted", "completed", "cancelled")
# What an assigned target's configuration shows; superseded: no longer this rollout's.
TARGET_STATUSES: Final = ("pending", "applying", "applied", "failed", "superseded")


def matches(
    selector: Mapping[str, str], identifying: Mapping[str, Any], non_identifying: Mapping[str, Any]
) -> bool:
    """Whether an agent with these attributes is selected: every key equal, as text."""
    for key, want in selector.items():
        have = identifying.get(key, non_identifying.get(key))
        if not isinstance(have, str) or have != want:
            return False
    return True


def order_targets(rollout_id: uuid.UUID, instance_uids: Iterable[bytes]) -> list[bytes]:
    """The targets in stage order: by SHA-256 of the rollout id and the uid."""
    return sorted(
        set(instance_uids), key=lambda uid: hashlib.sha256(rollout_id.bytes + uid).digest()
    )


def stage_ends(targets: int, canary_percent: int, batch_size: int) -> list[int]:
    """The end (exclusive, in stage order) of each stage: the canary, then batches."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if not 0 <= canary_percent <= 100:
        raise ValueError("canary_percent must be 0 to 100")
    ends: list[int] = []
    canary = min(targets, math.ceil(targets * canary_percent / 100))
    if canary:
        ends.append(canary)
    end = canary
    while end < targets:
        end = min(targets, end + batch_size)
        ends.append(end)
    return ends


@attrs.frozen(kw_only=True)
class Progress:
    """The statuses of the targets assigned so far."""

    pending: int = 0
    applying: int = 0
    applied: int = 0
    failed: int = 0
    superseded: int = 0

    @property
    def assigned(self) -> int:
        return self.pending + self.applying + self.applied + self.failed + self.superseded

    @property
    def settled(self) -> bool:
        return self.pending == 0 and self.applying == 0

    @classmethod
    def of(cls, counts: Mapping[str, int]) -> Progress:
        return cls(**{s: int(counts.get(s, 0)) for s in TARGET_STATUSES})

    def as_dict(self) -> dict[str, int]:
        return {s: int(getattr(self, s)) for s in TARGET_STATUSES}


@attrs.frozen
class Assign:
    """Assign stage ``stage`` (1-based): the targets from ``start`` to ``end``."""

    stage: int
    start: int
    end: int


@attrs.frozen
class Wait:
    """Nothing to do until more agents report."""


@attrs.frozen
class Complete:
    """Every stage assigned and settled under the threshold."""


@attrs.frozen
class Halt:
    reason: str


Step = Assign | Wait | Complete | Halt


def decide(
    *,
    stage: int,
    ends: list[int],
    progress: Progress,
    failure_threshold_percent: int,
    accepted_failures: int = 0,
) -> Step:
    """The next step of a running rollout that has assigned ``stage`` stages
    (see the module docstring)."""
    failed = progress.failed - accepted_failures
    if failed * 100 > failure_threshold_percent * progress.assigned:
        return Halt(
            f"{progress.failed} of {progress.assigned} assigned agents failed"
            + (f" ({accepted_failures} accepted on resume)" if accepted_failures else "")
            + f": over the {failure_threshold_percent}% threshold"
        )
    if not progress.settled:
        return Wait()
    if stage >= len(ends):
        return Complete()
    return Assign(stage=stage + 1, start=ends[stage - 1] if stage else 0, end=ends[stage])

"""Properties of the rollout plan (z4j/opamp_rollouts.py) over random fleets.

- stages cover every target once, in order: a canary share, then batches
  of at most ``batch_size``;
- the stage order is a permutation that does not depend on the input's;
- driving `decide` with agents that each apply or fail, reporting one at a
  time in any order: no stage is assigned while an earlier agent has not
  settled, it halts exactly when failures first pass the threshold share
  of the assigned agents, and otherwise completes with every target
  assigned.
"""

from __future__ import annotations

import math
import uuid

from hypothesis import given
from hypothesis import strategies as st

from z4j.opamp_rollouts import (
    Assign,
    Complete,
    Halt,
    Progress,
    Wait,
    decide,
    order_targets,
    stage_ends,
)


@given(st.integers(0, 3000), st.integers(0, 100), st.integers(1, 500))
def test_stages_cover_every_target_once_canary_first(targets: int, canary: int, batch: int) -> None:
    ends = stage_ends(targets, canary, batch)
    assert ends == sorted(set(ends))
    assert (ends[-1] if ends else 0) == targets
    starts = [0, *ends][: len(ends)]
    sizes = [end - start for start, end in zip(starts, ends, strict=True)]
    assert all(size > 0 for size in sizes)
    if targets and canary:
        assert sizes[0] == min(targets, math.ceil(targets * canary / 100))
        assert all(size <= batch for size in sizes[1:])
    else:
        assert all(size <= batch for size in sizes)


@given(st.sets(st.binary(min_size=16, max_size=16), max_size=60), st.randoms())
def test_the_order_is_a_permutation_whatever_the_input_order(uids: set[bytes], rnd: object) -> None:
    listed = sorted(uids)
    shuffled = list(listed)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    rollout = uuid.UUID(int=42)
    assert order_targets(rollout, listed) == order_targets(rollout, shuffled)
    assert sorted(order_targets(rollout, listed)) == listed


@given(
    outcomes=st.lists(st.booleans(), max_size=80),  # True: the agent fails
    canary=st.integers(0, 100),
    batch=st.integers(1, 30),
    threshold=st.integers(0, 100),
    rnd=st.randoms(),
)
def test_driving_decide_halts_exactly_past_the_threshold_or_completes(
    outcomes: list[bool], canary: int, batch: int, threshold: int, rnd: object
) -> None:
    ends = stage_ends(len(outcomes), canary, batch)
    stage, status = 0, {}  # agent index -> "pending" | "applied" | "failed"
    for _ in range(10 * len(outcomes) + 10):
        counts = {s: list(status.values()).count(s) for s in ("pending", "applied", "failed")}
        progress = Progress.of(counts)
        step = decide(
            stage=stage, ends=ends, progress=progress, failure_threshold_percent=threshold
        )
        over = counts["failed"] * 100 > threshold * progress.assigned
        if isinstance(step, Halt):
            assert over
            return
        assert not over
        if isinstance(step, Complete):
            assert stage == len(ends) and len(status) == len(outcomes)
            assert progress.settled
            return
        if isinstance(step, Assign):
            assert progress.settled and step.stage == stage + 1
            assert step.start == len(status) and step.end == ends[stage]
            stage = step.stage
            status.update({n: "pending" for n in range(step.start, step.end)})
            continue
        assert isinstance(step, Wait) and not progress.settled
        pending = [n for n, s in status.items() if s == "pending"]
        n = rnd.choice(pending)  # type: ignore[attr-defined]
        status[n] = "failed" if outcomes[n] else "applied"
    raise AssertionError("neither halted nor completed")

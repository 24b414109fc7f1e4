"""The rollout plan (z4j/opamp_rollouts.py), sans-IO: selectors, stages, and each step.

Properties over random fleets are in property_tests/test_opamp_rollout_properties.py.
"""

from __future__ import annotations

import uuid

import pytest

from z4j.opamp_rollouts import (
    Assign,
    Complete,
    Halt,
    Progress,
    Wait,
    decide,
    matches,
    order_targets,
    stage_ends,
)

ID = uuid.UUID(int=7)


def test_a_selector_needs_every_key_equal_as_text_in_either_attribute_set() -> None:
    identifying = {"service.name": "checkout", "service.instance.id": "a1"}
    non_identifying = {"deployment.environment": "prod", "host.name": "h1", "cores": 4}
    assert matches({}, identifying, non_identifying)
    assert matches({"service.name": "checkout"}, identifying, non_identifying)
    assert matches(
        {"service.name": "checkout", "deployment.environment": "prod"},
        identifying,
        non_identifying,
    )
    assert not matches(
        {"service.name": "checkout", "deployment.environment": "dev"},
        identifying,
        non_identifying,
    )
    assert not matches({"service.name": "Checkout"}, identifying, non_identifying)
    assert not matches({"missing": ""}, identifying, non_identifying)
    assert not matches({"cores": "4"}, identifying, non_identifying)  # not text: no match
    # An identifying attribute wins over a non-identifying one of the same name.
    assert not matches({"service.name": "x"}, identifying, {"service.name": "x"})


def test_stage_order_is_by_hash_not_by_input_and_differs_per_rollout() -> None:
    uids = [bytes([n]) * 16 for n in range(50)]
    ordered = order_targets(ID, uids)
    assert sorted(ordered) == sorted(uids)
    assert order_targets(ID, reversed(uids)) == ordered
    assert ordered != uids
    assert order_targets(uuid.UUID(int=8), uids) != ordered
    assert order_targets(ID, uids + uids[:3]) == ordered  # duplicates once


@pytest.mark.parametrize(
    ("targets", "canary", "batch", "ends"),
    [
        (0, 10, 100, []),
        (1, 10, 100, [1]),
        (10, 10, 3, [1, 4, 7, 10]),
        (100, 10, 100, [10, 100]),
        (101, 10, 50, [11, 61, 101]),
        (5, 0, 2, [2, 4, 5]),  # no canary: batches from the start
        (5, 100, 2, [5]),  # all at once
        (1000, 1, 500, [10, 510, 1000]),
    ],
)
def test_stages_are_a_canary_share_then_batches(
    targets: int, canary: int, batch: int, ends: list[int]
) -> None:
    assert stage_ends(targets, canary, batch) == ends


def test_stage_parameters_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError):
        stage_ends(10, 10, 0)
    with pytest.raises(ValueError):
        stage_ends(10, 101, 1)


ENDS = [2, 12, 20]


def step(stage: int, threshold: int = 10, accepted: int = 0, **counts: int) -> object:
    return decide(
        stage=stage,
        ends=ENDS,
        progress=Progress(**counts),
        failure_threshold_percent=threshold,
        accepted_failures=accepted,
    )


def test_the_first_stage_is_assigned_then_each_once_the_one_before_settled() -> None:
    assert step(0) == Assign(stage=1, start=0, end=2)
    assert step(1, pending=1, applied=1) == Wait()
    assert step(1, applying=1, applied=1) == Wait()
    assert step(1, applied=2) == Assign(stage=2, start=2, end=12)
    assert step(2, applied=11, pending=1) == Wait()
    # A failure under the threshold settles its agent; so does a superseded one.
    assert step(2, applied=10, failed=1, superseded=1) == Assign(stage=3, start=12, end=20)
    assert step(3, applied=20) == Complete()
    assert step(3, applied=18, failed=2) == Complete()  # 2 of 20 = 10%: not over
    assert decide(stage=0, ends=[], progress=Progress(), failure_threshold_percent=10) == (
        Complete()
    )


def test_it_halts_as_soon_as_failures_pass_the_threshold_even_mid_stage() -> None:
    assert isinstance(step(1, failed=1, pending=1), Halt)  # 50% of the canary
    assert step(2, applied=9, failed=1, pending=2) == Wait()  # 1 of 12: under 10%
    halted = step(2, applied=8, failed=2, pending=2)  # 2 of 12: over 10%
    assert isinstance(halted, Halt)
    assert halted.reason == "2 of 12 assigned agents failed: over the 10% threshold"
    assert isinstance(step(3, applied=17, failed=3), Halt)  # 3 of 20 = 15%
    # Threshold 0: any failure halts; 100: none does.
    assert isinstance(step(2, threshold=0, applied=11, failed=1), Halt)
    assert step(1, threshold=100, failed=2) == Assign(stage=2, start=2, end=12)


def test_failures_accepted_on_resume_count_no_more() -> None:
    assert isinstance(step(1, failed=2), Halt)
    assert step(1, accepted=2, failed=2) == Assign(stage=2, start=2, end=12)
    assert step(2, accepted=2, failed=3, applied=9) == Assign(stage=3, start=12, end=20)
    halted = step(2, accepted=2, failed=4, applied=8)  # 2 new of 12: over 10%
    assert isinstance(halted, Halt) and "(2 accepted on resume)" in halted.reason


def test_progress_reads_counts_by_status() -> None:
    progress = Progress.of({"pending": 1, "failed": 2, "other": 9})
    assert progress.assigned == 3 and not progress.settled
    assert progress.as_dict() == {
        "pending": 1,
        "applying": 0,
        "applied": 0,
        "failed": 2,
        "superseded": 0,
    }

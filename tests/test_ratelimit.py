"""FailureThrottle: the one mechanism behind the ingest token and sign-in throttles."""

from __future__ import annotations

from z4j.brain.ratelimit import FailureThrottle


def test_a_block_runs_from_the_failure_that_fills_the_window_or_to_the_windows_end() -> None:
    fixed = FailureThrottle(max_failures=3, window=60, block=60)
    to_window_end = FailureThrottle(max_failures=3, window=60)
    for throttle in (fixed, to_window_end):
        for t in (0.0, 10.0):
            assert throttle.failed("a", t) in (1, 2)
            assert throttle.refused_for("a", t) == 0
        assert throttle.failed("a", 40.0) == 3
    assert fixed.refused_for("a", 40.0) == 60  # 60 s from the third failure
    assert to_window_end.refused_for("a", 40.0) == 20  # the rest of the window from 0
    assert fixed.refused_for("a", 100.0) == 0 and to_window_end.refused_for("a", 60.0) == 0


def test_after_a_block_the_next_failure_opens_a_full_window_of_its_own() -> None:
    throttle = FailureThrottle(max_failures=3, window=60, block=10)
    for t in (0.0, 1.0, 2.0):
        throttle.failed("a", t)
    assert throttle.refused_for("a", 11.0) == 1
    # Past the block: three more failures within 60 s of the first of them block again,
    # however late in the old window they come.
    for t in (13.0, 60.0, 72.0):
        throttle.failed("a", t)
    assert throttle.refused_for("a", 72.0) == 10


def test_the_table_forgets_the_least_recently_failed_first() -> None:
    throttle = FailureThrottle(max_failures=2, window=60, max_sources=3)
    for source in ("a", "b", "c"):
        throttle.failed(source, 0.0)
    throttle.failed("a", 1.0)  # blocks a, and makes it the most recent
    throttle.failed("d", 2.0)
    assert len(throttle) == 3
    assert throttle.refused_for("a", 2.0) > 0  # b went, not a
    throttle.forgive("a")
    assert throttle.refused_for("a", 2.0) == 0

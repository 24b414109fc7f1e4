"""The read replica: a Postgres hot standby that API reads may go to.

Past a few thousand agents the dashboard's lists and searches compete with
the drains for the primary. With ``Z4J_DATABASE_READ_URL`` set, the store
sends *some* reads to a streaming standby instead. Which, is decided by
two things, both needed:

- **the store method** says it may be served stale: it calls
  ``PostgresStore._read`` instead of ``_run``. These are the lists, searches,
  histories and statistics the API serves. Single-row lookups a caller
  uses right after writing (a command by id, an agent or project by
  reference), credentials and accounts, and everything the drains, the
  registry, leases and ownership touch stay ``_run``: always the primary.
- **the caller** allows it: `replica_reads` marks the current task's
  context. The API sets it for GET and HEAD requests only, so a write
  request reads the primary throughout, even through a list method, and so
  do the brain's own services and the CLI, which never set it.

A context variable and not a second store object because the API's route
classes serve reads and writes from one store handle each; a per-request
mark needs no change to them, and a task spawned by a request (an export's
read-ahead) inherits it, as Trio copies the context into new tasks.

Whether the replica may serve *now* is this module's `judge`, a pure rule
over the last probe: the standby is reachable, still in recovery (a
promoted one has left the primary's timeline), and its lag plus the age
of the measure is within ``Z4J_READ_MAX_LAG_MS``. The lag is measured on
the standby itself, ``now() - pg_last_xact_replay_timestamp()``, except
that a standby streaming from the primary with nothing received left to
replay has lag 0: without that rule an idle primary (no commit to replay)
shows a false lag that grows for ever. Otherwise every read the standby
cannot serve goes to the primary and is counted by reason; a read that fails
on the standby is re-run on the primary, so users never see its errors.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, TypeVar

import attrs
import psycopg
import trio

from ..stats import ThrottledLog
from .pg import PgPool

__all__ = [
    "FALLBACK_REASONS",
    "PROBE_TIMEOUT_SECONDS",
    "ReadReplica",
    "ReplicaStatistics",
    "Sample",
    "Standing",
    "judge",
    "lag_of",
    "probe_url",
    "replica_reads",
    "replica_reads_allowed",
]

log = logging.getLogger("z4j.store.replica")

T = TypeVar("T")

# The probe's deadline, connecting included: an unreachable or silent
# standby is judged so within this, and reads stop waiting on it.
PROBE_TIMEOUT_SECONDS = 2.0
CONNECT_TIMEOUT_SECONDS = 2.0
# Why a read that could have gone to the replica went to the primary (the
# `reason` label of z4j_read_replica_fallbacks_total): a bounded set.
FALLBACK_REASONS = ("unchecked", "unreachable", "promoted", "lag", "error")

_replica_reads: ContextVar[bool] = ContextVar("z4j_replica_reads", default=False)


@contextlib.contextmanager
def replica_reads(allowed: bool = True) -> Iterator[None]:
    """Within this block (this task and those it starts), reads the store
    marks as such may be served by the read replica."""
    token = _replica_reads.set(allowed)
    try:
        yield
    finally:
        _replica_reads.reset(token)


def replica_reads_allowed() -> bool:
    return _replica_reads.get()


@attrs.frozen(kw_only=True)
class Sample:
    """What one probe read on the standby."""

    in_recovery: bool  # pg_is_in_recovery(): False once promoted
    receiving: bool  # a WAL receiver runs (streaming from the primary)
    caught_up: bool  # it has replayed all the WAL it received
    since_replay: float | None  # now() - pg_last_xact_replay_timestamp(), seconds


def lag_of(sample: Sample) -> float | None:
    """The standby's lag in seconds; None when it cannot be told.

    Streaming with nothing left to replay is 0 whatever the last replayed
    commit's age: the primary has simply written nothing since. Without a
    WAL receiver the standby cannot know what it misses, so the age of its
    last replayed commit is all there is (and grows while the primary is
    quiet: reads then go to the primary, which is the safe side).
    """
    if sample.receiving and sample.caught_up:
        return 0.0
    if sample.since_replay is None:
        return None
    return max(0.0, sample.since_replay)


@attrs.frozen
class Standing:
    """Whether reads may go to the replica: ``fallback`` is None if so, else
    the reason label; ``note`` says why for /health/ready."""

    fallback: str | None
    note: str | None = None


SERVING = Standing(None)


def judge(
    problem: str | None, sample: Sample | None, *, age: float, max_lag_seconds: float
) -> Standing:
    """The rule. ``problem``: ``"unchecked"`` (no probe answered yet) or
    ``"unreachable"``, else None with the last ``sample``, taken ``age``
    seconds ago. The lag may have grown by that age since it was measured
    (a write right after the probe), so that is the bound held against the limit.
    """
    primary = "reads go to the primary"
    if problem == "unchecked" or (problem is None and sample is None):
        return Standing("unchecked", f"{primary} until the read replica answers a first check")
    if problem is not None or sample is None:
        return Standing("unreachable", f"{primary}: the read replica is unreachable")
    if not sample.in_recovery:
        return Standing("promoted", f"{primary}: the read replica is not a standby (promoted?)")
    lag = lag_of(sample)
    if lag is None:
        return Standing(
            "lag",
            f"{primary}: the read replica's lag is unknown (no WAL receiver, nothing replayed)",
        )
    bound = lag + max(0.0, age)
    if bound > max_lag_seconds:
        return Standing(
            "lag",
            f"{primary}: the read replica may be {bound:.1f} s behind, over "
            f"Z4J_READ_MAX_LAG_MS ({max_lag_seconds * 1000:.0f} ms)",
        )
    return SERVING


@attrs.frozen(kw_only=True)
class ReplicaStatistics:
    serving: bool
    lag_seconds: float | None  # as last measured; None when unknown
    reads: int  # served by the replica
    fallbacks: Mapping[str, int]  # reads sent to the primary, by reason


_PROBE_SQL = """
SELECT pg_is_in_recovery(),
       EXISTS (SELECT 1 FROM pg_stat_wal_receiver
               WHERE coalesce(status, 'streaming') = 'streaming'),
       coalesce(pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn(), false),
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8
"""


def _probe(conn: psycopg.Connection[Any]) -> Sample:
    # pg_stat_wal_receiver shows its row's pid to anyone, its status only to
    # pg_read_all_stats: an unknown status is taken for streaming.
    row = conn.execute(_PROBE_SQL).fetchone()
    assert row is not None
    in_recovery, receiving, caught_up, since = row
    return Sample(
        in_recovery=bool(in_recovery),
        receiving=bool(receiving),
        caught_up=bool(caught_up),
        since_replay=None if since is None else float(since),
    )


def probe_url(url: str, *, timeout: float = PROBE_TIMEOUT_SECONDS) -> Sample:
    """One probe of the standby at ``url`` on a connection of its own (blocking:
    for `z4j doctor`); raises psycopg.Error when it does not answer."""
    with psycopg.connect(
        url, connect_timeout=max(1, round(timeout)), application_name="z4j-doctor"
    ) as conn:
        return _probe(conn)


def _unreachable(exc: psycopg.Error) -> bool:
    """A failure of the connection, not of the statement: the standby is
    gone until a probe says otherwise (libpq errors carry no SQLSTATE;
    class 08 is a connection exception, 57P an operator's shutdown)."""
    state = exc.sqlstate
    return state is None or state.startswith(("08", "57P"))


class ReadReplica:
    """The read pool on the standby, its last probe, and the counts of
    reads it served or passed to the primary.

    The probe has a pool of its own (one connection) so that a read pool
    busy with long searches never delays it into a false "unreachable".
    """

    def __init__(
        self,
        url: str,
        *,
        max_lag_seconds: float,
        pool_size: int,
        statement_timeout_ms: int,
        application_name: str = "z4j",
        configure: Callable[[psycopg.Connection[Any]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_lag_seconds = max_lag_seconds
        self.pool = PgPool(
            url,
            size=pool_size,
            statement_timeout_ms=statement_timeout_ms,
            application_name=f"{application_name}-read",
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            configure=configure,
        )
        self._probe_pool = PgPool(
            url,
            size=1,
            statement_timeout_ms=int(PROBE_TIMEOUT_SECONDS * 1000),
            application_name=f"{application_name}-probe",
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
        )
        self._clock = clock
        self._problem: str | None = "unchecked"
        self._sample: Sample | None = None
        self._sampled_at = 0.0
        self._reads = 0
        self._fallbacks: Counter[str] = Counter()
        self._in_flight: set[trio.CancelScope] = set()  # reads waiting on the replica
        self._log = ThrottledLog(log)

    def standing(self) -> Standing:
        return judge(
            self._problem,
            self._sample,
            age=self._clock() - self._sampled_at,
            max_lag_seconds=self.max_lag_seconds,
        )

    def note(self) -> str | None:
        """For /health/ready: why reads go to the primary now, if they do."""
        return self.standing().note

    def statistics(self) -> ReplicaStatistics:
        sample = self._sample if self._problem is None else None
        return ReplicaStatistics(
            serving=self.standing().fallback is None,
            lag_seconds=None if sample is None else lag_of(sample),
            reads=self._reads,
            fallbacks={reason: self._fallbacks[reason] for reason in FALLBACK_REASONS},
        )

    # -- the store's side ----------------------------------------------------------

    def pool_for_read(self) -> PgPool | None:
        """The read pool if the replica may serve a read now; else None,
        and the read (about to go to the primary) is counted by reason."""
        fallback = self.standing().fallback
        if fallback is not None:
            self._fallbacks[fallback] += 1
            return None
        return self.pool

    async def run(self, fn: Callable[..., T], *args: Any) -> tuple[bool, T | None]:
        """``(True, fn(conn, *args))`` run on the replica, or ``(False, None)``:
        the read goes to the primary (counted by reason).

        It goes there, too, when it fails on the replica (users never see
        the standby's errors), except for a statement timeout, which would
        only wait as long again there; and when the replica is judged
        unreachable while the read waits on it (a standby that went silent
        mid-query), so a read waits on a dead standby no longer than a probe.
        """
        pool = self.pool_for_read()
        if pool is None:
            return False, None
        scope = trio.CancelScope()
        self._in_flight.add(scope)
        try:
            with scope:
                result = await pool.run(fn, *args)
                self._reads += 1
                return True, result
        except psycopg.errors.QueryCanceled:
            raise
        except psycopg.Error as exc:
            self._read_failed(exc)
            return False, None
        finally:
            self._in_flight.discard(scope)
        # Cancelled by `_unreachable_now`, not by our caller (that propagates).
        self._fallbacks["unreachable"] += 1
        return False, None

    def _read_failed(self, exc: psycopg.Error) -> None:
        if _unreachable(exc):
            self._fallbacks["unreachable"] += 1
            self._unreachable_now()
        else:
            self._fallbacks["error"] += 1
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        self._log.warning(
            "read", "a read failed on the read replica, served by the primary: %s", first_line
        )

    # -- the probe -----------------------------------------------------------------

    async def probe(self) -> Standing:
        """Measure the standby now (within PROBE_TIMEOUT_SECONDS) and judge."""
        sample: Sample | None = None
        with trio.move_on_after(PROBE_TIMEOUT_SECONDS) as deadline:
            try:
                sample = await self._probe_pool.run(_probe, autocommit=True)
            except psycopg.Error as exc:
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                self._log.warning("probe", "the read replica did not answer: %s", first_line)
        if deadline.cancelled_caught:
            self._log.warning(
                "probe", "the read replica did not answer within %g s", PROBE_TIMEOUT_SECONDS
            )
        if sample is None:
            self._unreachable_now()
        else:
            self._problem, self._sample, self._sampled_at = None, sample, self._clock()
        return self.standing()

    def _unreachable_now(self) -> None:
        """Reads stop going to the replica until a probe answers, and those
        waiting on it now go to the primary."""
        self._problem, self._sample = "unreachable", None
        for scope in self._in_flight:
            scope.cancel()

    async def aclose(self) -> None:
        await self.pool.aclose()
        await self._probe_pool.aclose()

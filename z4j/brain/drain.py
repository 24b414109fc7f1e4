"""Drain tasks: move buffered payloads into the store.

Each drain loops: claim a batch (lease), write it to the store (idempotent),
delete it from the buffer. Whatever goes wrong between claim and delete, the
rows stay in the buffer and are written again later, and the store's
idempotency keys make the second write a no-op. That is the whole
exactly-once argument: at-least-once delivery plus idempotent writes.

While the store is down, drains back off (capped exponential, full jitter)
and the buffer absorbs ingest until its cap. A row the store refuses as data
(not as an outage) would block the drain forever; it is found by bisecting
the batch and set aside in the buffer's dead-letter table instead.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence

import attrs
import trio

from ..buffer import Buffer, Claim, ClaimedRow
from ..stats import BrainStats, ThrottledLog
from ..store.base import Store, UnstorableRows

__all__ = ["Drainer"]

log = logging.getLogger("z4j.drain")

IDLE_POLL_SECONDS = 1.0
RETRY_FIRST_SECONDS = 0.2
RETRY_MAX_SECONDS = 10.0
RELEASE_TIMEOUT_SECONDS = 5.0


@attrs.frozen
class _Stored:
    """A batch the store has, not yet deleted from the buffer."""

    claim: Claim
    records: int
    seconds: float


class Drainer:
    """The drain tasks of one brain; `run` is started once per worker."""

    def __init__(
        self,
        buffer: Buffer,
        store: Store,
        stats: BrainStats,
        *,
        batch_rows: int,
        lease_seconds: float,
        store_ready: trio.Event,
        batch_bytes: int | None = None,
        linger_seconds: float = 0.0,
        on_stored: Callable[[Sequence[ClaimedRow], int], None] | None = None,
    ) -> None:
        """``on_stored``: called with each batch's rows once stored (the dashboard's feed)."""
        self._buffer = buffer
        self._store = store
        self._stats = stats
        self._batch_rows = batch_rows
        self._batch_bytes = batch_bytes  # Z4J_DRAIN_BATCH_BYTES (Buffer.claim)
        self._lease = lease_seconds
        # After a batch smaller than a full one, wait this long before the
        # next claim (Z4J_DRAIN_LINGER_MS): under a steady stream of small
        # ingest commits, a few large store transactions a second instead of
        # one small one per commit, each competing with ingest for the disk
        # and the GIL. Full batches go straight on.
        self._linger = linger_seconds
        self._store_ready = store_ready
        self._on_stored = on_stored
        self._stopping = False
        self._idle_scopes: set[trio.CancelScope] = set()
        self._log = ThrottledLog(log)

    def stop(self) -> None:
        """Finish the batch in hand, then return; idle drains return now."""
        self._stopping = True
        for scope in self._idle_scopes:
            scope.cancel()

    async def _idle(self, seconds: float) -> None:
        with trio.CancelScope() as scope:
            self._idle_scopes.add(scope)
            try:
                if not self._stopping:
                    await self._buffer.wait_for_rows(seconds)
            finally:
                self._idle_scopes.discard(scope)

    async def _sleep(self, seconds: float) -> None:
        with trio.CancelScope() as scope:
            self._idle_scopes.add(scope)
            try:
                if not self._stopping:
                    await trio.sleep(seconds)
            finally:
                self._idle_scopes.discard(scope)

    async def serve(
        self,
        workers: int,
        *,
        shutdown: trio.Event,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """``workers`` drains; once ``shutdown`` is set each finishes the batch
        in hand (rows not drained stay in the buffer for the next start) and
        this returns when all have."""
        async with trio.open_nursery() as nursery:
            for worker in range(workers):
                await nursery.start(self.run, worker)
            task_status.started()
            await shutdown.wait()
            self.stop()

    async def run(
        self, worker: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        # While a batch is written to the store, the buffer side of the
        # neighbouring batches runs too: the next claim (`ahead`) and the
        # delete of the batch stored before (`stored`). See `_pipelined`.
        ahead: list[Claim] = []
        stored: list[_Stored] = []
        try:
            while not self._store_ready.is_set() and not self._stopping:
                with trio.move_on_after(IDLE_POLL_SECONDS):
                    await self._store_ready.wait()
            failures = 0
            while not self._stopping:
                claim = (
                    ahead.pop()
                    if ahead
                    else await self._buffer.claim(self._batch_rows, self._lease, self._batch_bytes)
                )
                if claim is None:
                    await self._idle(IDLE_POLL_SECONDS)
                    continue
                if await self._pipelined(worker, claim, ahead, stored):
                    failures = 0
                    if self._linger and not claim.full and not ahead:
                        await self._sleep(self._linger)
                else:
                    failures += 1
                    while ahead:  # give it back for the backoff's duration
                        await self._release(ahead.pop())
                    delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (failures - 1))
                    await self._sleep(random.uniform(0, delay))
        finally:
            with trio.CancelScope(shield=True):
                while stored:  # the store has it: let the buffer go of it now
                    done = stored.pop()
                    with trio.move_on_after(RELEASE_TIMEOUT_SECONDS):
                        try:
                            await self._complete(done)
                        except Exception as exc:  # it stays, and is re-drained (a no-op)
                            log.warning("drain %d: buffer delete failed: %s", worker, exc)
                while ahead:
                    await self._release(ahead.pop())

    async def _pipelined(
        self, worker: int, claim: Claim, ahead: list[Claim], stored: list[_Stored]
    ) -> bool:
        """Write ``claim`` to the store; meanwhile do the buffer's side of its neighbours.

        While this batch goes to the store (Postgres, on a pool thread), the
        buffer (SQLite, on its own thread) deletes the batch stored before
        (``stored``) and, after a full batch (stopped at its row or byte
        limit), when more rows are likely waiting, claims the next one into
        ``ahead``. Both sides stay busy instead of taking turns. Nothing
        changes in what is guaranteed: a batch leaves the buffer only after
        the store has it, and the claim ahead is leased like any other
        (released by whoever gives up on it).

        True when the store has ``claim``; it then waits in ``stored`` for
        its delete if a next batch is already claimed, else it is deleted now.
        """
        failed: list[Exception] = []
        previous = stored.pop() if stored else None

        async def claim_ahead() -> None:
            try:
                next_claim = await self._buffer.claim(
                    self._batch_rows, self._lease, self._batch_bytes
                )
            except Exception as exc:  # raised below, as the loop's own claim would
                failed.append(exc)
                return
            if next_claim is not None:
                ahead.append(next_claim)

        async def complete_previous() -> None:
            assert previous is not None
            try:
                await self._complete(previous)
            except Exception as exc:
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            keeper = trio.CancelScope()
            nursery.start_soon(self._keep_leased, keeper, claim, ahead)
            if previous is not None:
                nursery.start_soon(complete_previous)
            if claim.full and not self._stopping:
                nursery.start_soon(claim_ahead)
            done = await self._write_batch(worker, claim)
            keeper.cancel()
        if failed:
            if done is not None:
                stored.append(done)  # completed on the way out
            raise failed[0]
        if done is None:
            return False
        if ahead and not self._stopping:
            stored.append(done)
        else:
            await self._complete(done)
        return True

    async def _keep_leased(self, scope: trio.CancelScope, claim: Claim, ahead: list[Claim]) -> None:
        """Extend the batch being written, and the claim ahead, every third of
        the lease until ``scope`` is cancelled (the write ended).

        A batch can take longer to store than its lease: an agent's rows hold
        up to 100 events each, and the task projection folds them in the same
        transaction. A lapsed lease lets another drain claim the same rows and
        queue behind this one's row locks until a statement timeout."""
        with scope:
            while True:
                await trio.sleep(self._lease / 3)
                for held in [claim, *ahead]:
                    await self._buffer.extend(held, self._lease)

    async def _store_batch(self, worker: int, claim: Claim) -> bool:
        """Write one claim; True when the store has it and the buffer let go of it."""
        done = await self._write_batch(worker, claim)
        if done is None:
            return False
        await self._complete(done)
        return True

    async def _write_batch(self, worker: int, claim: Claim) -> _Stored | None:
        """Write one claim to the store; None (claim released) if that failed."""
        started = time.monotonic()
        try:
            records = await self._write_or_isolate(worker, claim, claim.rows)
        except Exception as exc:
            self._stats.drain_failures += 1
            self._log.warning(
                "store", "drain %d: store write failed, will retry: %s", worker, _one_line(exc)
            )
            await self._release(claim)
            return None
        except BaseException:
            # Cancelled mid-write: the store may or may not have the batch;
            # either way the rows go back, and a re-write is a no-op.
            await self._release(claim)
            raise
        return _Stored(claim, records, time.monotonic() - started)

    async def _complete(self, done: _Stored) -> None:
        """The store has the batch: delete it from the buffer, count it."""
        started = time.monotonic()
        await self._buffer.complete(done.claim)
        stats = self._stats
        stats.drain_batches += 1
        stats.drain_rows += len(done.claim.rows)
        stats.drain_records_stored += done.records
        seconds = done.seconds + time.monotonic() - started
        stats.drain_seconds_total += seconds
        stats.drain_batch_seconds.observe(seconds)
        log.debug(
            "stored a batch: %d payloads, %d records in %.1f ms",
            len(done.claim.rows),
            done.records,
            seconds * 1000,
        )
        if self._on_stored is not None:
            try:
                self._on_stored(done.claim.rows, done.records)
            except Exception:  # the dashboard's feed must never stop a drain
                log.exception("the stored-batch hook failed")

    async def _write_or_isolate(self, worker: int, claim: Claim, rows: Sequence[ClaimedRow]) -> int:
        """Write ``rows``; if the store rejects their data, bisect to the culprits.

        Rows the store refuses one by one go to the buffer's dead-letter
        table; the rest are written. Outages (`StoreUnavailable`) and other
        errors propagate: the caller releases the claim and retries later.
        """
        try:
            return await self._store.write_events(self._buffer.buffer_id, rows)
        except UnstorableRows as exc:
            if len(rows) > 1:
                half = len(rows) // 2
                return await self._write_or_isolate(
                    worker, claim, rows[:half]
                ) + await self._write_or_isolate(worker, claim, rows[half:])
            await self._buffer.quarantine(claim, rows[0].id, str(exc))
            self._stats.drain_quarantined += 1
            log.error(
                "drain %d: the store refuses buffer row %d (%s); moved it to the "
                "buffer's dead_letter table",
                worker,
                rows[0].id,
                _one_line(exc),
            )
            return 0

    async def _release(self, claim: Claim) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT_SECONDS):
            await self._buffer.release(claim)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"

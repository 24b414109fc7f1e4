"""Drain behaviour that needs no network: leases, re-claims, poison rows."""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
import trio.testing

from z4j.buffer import Buffer, BufferFile, BufferInUse, NewRow
from z4j.config import Config
from z4j.testing.brain import buffer_rows, read_events, running_brain, wait_until
from z4j.testing.drain import draining


def _row(n: int, body: bytes | None = None) -> NewRow:
    return NewRow(
        received_at=time.time(),
        source="tcp",
        body=body if body is not None else orjson.dumps([{"t": "log", "n": n}]),
    )


def test_claims_are_leased_and_expire(tmp_path: Path) -> None:
    buf = BufferFile(tmp_path / "b.sqlite3")
    try:
        buf.append([_row(n) for n in range(10)])
        first = buf.claim(4, lease_seconds=60)
        assert first is not None and [r.id for r in first.rows] == [1, 2, 3, 4]
        second = buf.claim(100, lease_seconds=0.01)
        assert second is not None and [r.id for r in second.rows] == list(range(5, 11))
        assert buf.claim(100, lease_seconds=60) is None  # everything is held
        time.sleep(0.02)
        # The short lease expired: its rows are claimable again, the long one's not.
        again = buf.claim(100, lease_seconds=60)
        assert again is not None and [r.id for r in again.rows] == list(range(5, 11))
        # The first holder of an expired claim may not delete what moved on.
        assert buf.complete(second) == 0
        assert buf.complete(again) == 6
        assert buf.complete(first) == 4
        assert buf.depth == 0 == buf.count()
    finally:
        buf.close()


def test_a_claim_stops_at_its_byte_limit(tmp_path: Path) -> None:
    """Z4J_DRAIN_BATCH_BYTES: rows up to the limit, at least one; ``full`` when a
    limit stopped it, so that the drain goes straight on."""
    buf = BufferFile(tmp_path / "b.sqlite3")
    try:
        buf.append([_row(n, b"x" * 1000) for n in range(5)] + [_row(9, b"y" * 5000)])
        first = buf.claim(100, lease_seconds=60, max_bytes=2500)
        assert first is not None and [r.id for r in first.rows] == [1, 2] and first.full
        second = buf.claim(100, lease_seconds=60, max_bytes=3000)
        assert second is not None and [r.id for r in second.rows] == [3, 4, 5] and second.full
        alone = buf.claim(100, lease_seconds=60, max_bytes=3000)  # larger than the limit
        assert alone is not None and [r.id for r in alone.rows] == [6] and not alone.full
        buf.append([_row(n) for n in range(3)])
        by_rows = buf.claim(2, lease_seconds=60, max_bytes=10**6)
        assert by_rows is not None and len(by_rows.rows) == 2 and by_rows.full
        rest = buf.claim(2, lease_seconds=60)
        assert rest is not None and len(rest.rows) == 1 and not rest.full
    finally:
        buf.close()


def test_row_ids_are_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    buf = BufferFile(path)
    buf.append([_row(1), _row(2)])
    claim = buf.claim(10, 60)
    assert claim is not None
    buf.complete(claim)
    buf.close()
    buf = BufferFile(path)  # reopened empty: ids still go up
    try:
        buf.append([_row(3)])
        claim = buf.claim(10, 60)
        assert claim is not None and [r.id for r in claim.rows] == [3]
    finally:
        buf.close()


def test_open_releases_stale_claims_and_locks_the_file(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    buf = BufferFile(path)
    buf.append([_row(1)])
    assert buf.claim(10, 3600) is not None
    try:
        BufferFile(path)
        raise AssertionError("a second opener must be refused")
    except BufferInUse as exc:
        assert "Z4J_BUFFER_PATH" in str(exc)
    buf.close()  # as if the process died holding the claim
    buf = BufferFile(path)
    try:
        claim = buf.claim(10, 60)
        assert claim is not None and len(claim.rows) == 1
    finally:
        buf.close()


def test_new_files_get_big_pages_and_old_files_keep_theirs(tmp_path: Path) -> None:
    # A file from before the page size changed: 4 KiB pages, rows in it.
    old = tmp_path / "old.sqlite3"
    db = sqlite3.connect(old)
    db.execute("PRAGMA page_size=4096")
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    buf = BufferFile(old)
    buf.append([_row(1)])
    buf.close()

    for path, page_size in ((tmp_path / "new.sqlite3", 16384), (old, 4096)):
        buf = BufferFile(path)
        try:
            buf.append([_row(n) for n in range(100)])
            db = buf._db
            assert db.execute("PRAGMA page_size").fetchone()[0] == page_size
            # The WAL is checkpointed at 4 MiB whatever the page size.
            pages = db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
            assert pages * page_size == 4 * 1024 * 1024
            assert buf.count() == buf.depth == (101 if path == old else 100)
        finally:
            buf.close()


async def test_unstorable_rows_go_to_dead_letter_and_the_rest_lands(config: Config) -> None:
    # Rows that passed ingest once but cannot be stored (here: not JSON),
    # planted straight into the buffer among good ones.
    buffer = await Buffer.open(config.resolved_buffer_path, max_rows=1000)
    good = [_row(n) for n in range(20)]
    bad = [_row(100, b"not json"), _row(101, b'[{"no kind": 1}]')]
    rows = [*good[:7], bad[0], *good[7:15], bad[1], *good[15:]]
    await trio.to_thread.run_sync(buffer.file.append, rows)
    await buffer.aclose()

    with trio.fail_after(60):
        async with running_brain(config) as brain:
            await wait_until(lambda: buffer_rows(config) == 0)
            assert brain.stats.drain_quarantined == 2
    assert sorted(e["body"]["n"] for e in read_events(config)) == list(range(20))  # type: ignore[index]
    db = sqlite3.connect(config.resolved_buffer_path)
    try:
        dead = db.execute("SELECT id, body, error FROM dead_letter ORDER BY id").fetchall()
    finally:
        db.close()
    assert [(row_id, body) for row_id, body, _ in dead] == [
        (8, b"not json"),
        (17, b'[{"no kind": 1}]'),
    ]
    assert all(error for _, _, error in dead)


@pytest.mark.parametrize("occurred", ["recent", "absent", "years ago"])
async def test_agent_batches_sent_twice_land_once(config: Config, occurred: str) -> None:
    """A re-sent agent batch is a new buffer row with the same events: one copy lands.

    Whatever the event's own timestamp: without a sane one, each copy is
    filed at its own receipt time, and still only one lands.
    """
    project, agent = uuid.uuid4(), uuid.uuid4()
    origin = orjson.dumps({"project_id": str(project), "agent_id": str(agent), "worker_id": "w-1"})
    stamp = {
        "recent": {"occurred_at": datetime.now(UTC).isoformat()},
        "absent": {},
        "years ago": {"occurred_at": "2001-01-01T00:00:00+00:00"},
    }[occurred]
    events = [
        {"id": f"e-{n}", "kind": "task.succeeded", **stamp, "data": {"n": n}} for n in range(3)
    ]
    batch = NewRow(
        received_at=time.time(), source="agent", body=orjson.dumps(events), origin=origin
    )
    resent = attrs.evolve(batch, received_at=time.time() + 5)
    buffer = await Buffer.open(config.resolved_buffer_path, max_rows=1000)
    await trio.to_thread.run_sync(buffer.file.append, [batch, resent])
    await buffer.aclose()
    with trio.fail_after(60):
        async with running_brain(config):
            await wait_until(lambda: buffer_rows(config) == 0)
    # Once more in a later drain, received a day later (another partition).
    buffer = await Buffer.open(config.resolved_buffer_path, max_rows=1000)
    later = attrs.evolve(batch, received_at=batch.received_at + 86400)
    await trio.to_thread.run_sync(buffer.file.append, [later])
    await buffer.aclose()
    with trio.fail_after(60):
        async with running_brain(config):
            await wait_until(lambda: buffer_rows(config) == 0)
    stored = read_events(config)
    assert sorted(e["body"]["data"]["n"] for e in stored) == [0, 1, 2]  # type: ignore[index]
    assert {e["source"] for e in stored} == {"agent"}
    assert {e["kind"] for e in stored} == {"task.succeeded"}
    assert stored[0]["body"]["id"].startswith("e-")  # type: ignore[index]


class _CountingStore:
    """A store that keeps what it is given and when (the drain's only view of a store)."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, int]] = []

    async def write_events(self, buffer_id: uuid.UUID, rows: Any) -> int:
        self.writes.append((trio.current_time(), len(rows)))
        await trio.lowlevel.checkpoint()
        return len(rows)


@asynccontextmanager
async def _counted_drain(
    tmp_path: Path, **settings: Any
) -> AsyncIterator[tuple[Buffer, _CountingStore]]:
    """A buffer with its writer and one drain (``settings`` for `draining`) into a
    `_CountingStore`; the drain is stopped and the buffer closed at the end."""
    buffer = await Buffer.open(tmp_path / "b.sqlite3", max_rows=10_000)
    store = _CountingStore()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(buffer.run_writer)
            async with draining(buffer, store, **settings) as drainer:  # type: ignore[arg-type]
                yield buffer, store
                drainer.stop()
            buffer.close_writer()
    finally:
        await buffer.aclose()


async def test_a_drain_lingers_after_a_partial_batch_not_after_a_full_one(tmp_path: Path) -> None:
    """Z4J_DRAIN_LINGER_MS: a batch short of full makes the drain wait before its next
    claim (the store lags by up to that much); full batches go straight on."""
    with trio.fail_after(20):
        async with _counted_drain(
            tmp_path, batch_rows=10, lease_seconds=60, linger_seconds=0.5
        ) as (buffer, store):
            assert buffer.admit(25)
            await buffer.append([_row(n) for n in range(25)])  # two full batches and 5
            await wait_until(lambda: sum(n for _, n in store.writes) == 25)
            assert [n for _, n in store.writes] == [10, 10, 5]
            started = store.writes[-1][0]
            assert buffer.admit(1)
            await buffer.append([_row(99)])  # arrives during the linger
            await wait_until(lambda: len(store.writes) == 4)
            assert store.writes[-1][0] - started >= 0.45


async def test_byte_bounded_batches_are_full_and_not_lingered_after(tmp_path: Path) -> None:
    """Large payloads: each batch holds what fits Z4J_DRAIN_BATCH_BYTES, however
    many rows Z4J_DRAIN_BATCH_ROWS allows, and counts as full (no linger: with
    a 60 s linger the drain would not finish within the deadline)."""
    with trio.fail_after(20):
        async with _counted_drain(
            tmp_path, batch_rows=1000, batch_bytes=3 * 1100, lease_seconds=60, linger_seconds=60
        ) as (buffer, store):
            assert buffer.admit(10)
            await buffer.append([_row(n, b"[" + b" " * 1000 + b"]") for n in range(10)])
            await wait_until(lambda: sum(n for _, n in store.writes) == 10)
            assert [n for _, n in store.writes] == [3, 3, 3, 1]


async def test_the_writer_groups_appends_finishes_the_queue_on_close_then_refuses(
    tmp_path: Path,
) -> None:
    buffer = await Buffer.open(tmp_path / "b.sqlite3", max_rows=10_000)

    async def one(n: int) -> None:
        assert buffer.admit(1)
        await buffer.append([_row(n)])

    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(buffer.run_writer)
                # 50 appends made at once: all durable when they return, in
                # fewer commits than appends (the thread takes what waits).
                async with trio.open_nursery() as appenders:
                    for n in range(50):
                        appenders.start_soon(one, n)
                stats = buffer.statistics()
                assert stats.appended_total == 50 == buffer.file.count()
                assert stats.commits_total < 50
                nursery.cancel_scope.cancel()  # the writer stops between turns

            # Appends waiting when the writer is closed are committed, not
            # dropped: queue three with no writer running, close, run it.
            async with trio.open_nursery() as nursery:
                for n in range(100, 103):
                    nursery.start_soon(one, n)
                await trio.testing.wait_all_tasks_blocked()
                assert buffer.file.count() == 50
                buffer.close_writer()
                await buffer.run_writer()  # returns once the queue is empty
            assert buffer.file.count() == 53
        with pytest.raises(trio.ClosedResourceError):  # later appends: refused at once
            await buffer.append([_row(200)])
        assert buffer.file.count() == 53
    finally:
        await buffer.aclose()


class _SlowStore:
    """A store whose writes outlast the drain's lease, and that counts every row it is given."""

    def __init__(self, write_seconds: float) -> None:
        self.write_seconds = write_seconds
        self.rows: list[int] = []

    async def write_events(self, buffer_id: uuid.UUID, rows: Any) -> int:
        await trio.sleep(self.write_seconds)
        self.rows += [row.id for row in rows]
        return len(rows)


async def test_a_batch_that_outlasts_its_lease_is_not_claimed_twice(tmp_path: Path) -> None:
    """Two drains, one batch, a lease of 0.3 s and a store that takes 2.5 s to
    write it: the idle drain looks again every second, but the drain writing
    keeps its claim leased, so the other never takes the same rows (it would
    write them twice and, on Postgres, wait on their locks)."""
    buffer = await Buffer.open(tmp_path / "b.sqlite3", max_rows=10_000)
    store = _SlowStore(write_seconds=2.5)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(buffer.run_writer)
                assert buffer.admit(10)
                await buffer.append([_row(n) for n in range(10)])
                async with draining(
                    buffer,
                    store,  # type: ignore[arg-type]
                    batch_rows=10,
                    lease_seconds=0.3,
                    workers=2,
                ):
                    await wait_until(lambda: len(store.rows) >= 10, timeout=20)
                    await trio.sleep(2.0)  # a re-claimed batch would land by now
                buffer.close_writer()
        assert sorted(store.rows) == sorted(set(store.rows)) and len(store.rows) == 10
    finally:
        await buffer.aclose()

"""Retention: events older than Z4J_EVENT_RETENTION_DAYS go, newer ones stay.

Time is controlled: rows are written with chosen `received_at` values and
the maintenance run is given its own clock.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import psycopg
import trio

from z4j.brain.maintenance import Maintenance
from z4j.buffer import ClaimedRow
from z4j.config import Config
from z4j.store import store_for
from z4j.testing.brain import read_events

DAY = 86400.0


def _rows(now: float, ages_in_days: list[float]) -> list[ClaimedRow]:
    return [
        ClaimedRow(
            id=n + 1,
            received_at=now - age * DAY,
            source="tcp",
            body=orjson.dumps([{"t": "log", "age": age}]),
            origin=None,
        )
        for n, age in enumerate(ages_in_days)
    ]


async def test_retention_keeps_exactly_the_recent_events(config: Config) -> None:
    # Noon, so that "N days ago" never straddles midnight ambiguously.
    now = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0).timestamp()
    store = store_for(config)
    ready = trio.Event()
    ready.set()
    with trio.fail_after(30):
        try:
            await store.migrate()
            await store.write_events(uuid.uuid4(), _rows(now, [0, 1, 6.9, 7.6, 9, 40]))
            if config.database_url:
                # Agent event keys go with the partitions they were filed in.
                with psycopg.connect(config.database_url) as conn:
                    for age in (1, 9):
                        conn.execute(
                            "INSERT INTO agent_event_keys VALUES (%s, %s)",
                            (uuid.uuid4(), datetime.fromtimestamp(now - age * 86400, UTC)),
                        )
            maintenance = Maintenance(store, retention_days=7, store_ready=ready, clock=lambda: now)
            removed = await maintenance.run_once()
            again = await maintenance.run_once()
        finally:
            await store.aclose()
    kept = sorted(e["body"]["age"] for e in read_events(config))  # type: ignore[index]
    if config.database_url:
        # Whole days go: the partition of 7.6 days ago ends 7.1 days ago.
        assert kept == [0, 1, 6.9]
        assert removed == 3 and again == 0
        with psycopg.connect(config.database_url) as conn:
            names = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables")}
        today = datetime.fromtimestamp(now, UTC).date()
        ahead = {f"events_p{today + timedelta(days=n):%Y%m%d}" for n in range(3)}
        assert ahead <= names, "partitions for today and the next two days exist"
        gone = f"events_p{today - timedelta(days=9):%Y%m%d}"
        assert gone not in names
        with psycopg.connect(config.database_url) as conn:
            (keys_left,) = conn.execute("SELECT count(*) FROM agent_event_keys").fetchone() or (0,)
        assert keys_left == 1, "the key filed 9 days ago went, the one of yesterday stayed"
    else:
        assert kept == [0, 1, 6.9]
        assert removed == 3 and again == 0


async def test_brain_runs_maintenance_at_start(config: Config) -> None:
    """The brain itself applies retention once the store is ready."""
    from z4j.testing.brain import running_brain, wait_until

    store = store_for(config)
    try:
        await store.migrate()
        await store.write_events(uuid.uuid4(), _rows(time.time(), [0, 400]))
    finally:
        await store.aclose()
    assert len(read_events(config)) == 2
    with trio.fail_after(30):
        async with running_brain(config):
            await wait_until(lambda: len(read_events(config)) == 1)
    assert [e["body"]["age"] for e in read_events(config)] == [0]  # type: ignore[index]

"""The schedules table, kept by the drain on both stores from the agents' snapshots.

Frames are built as z4j-bare 1.13 builds them (z4j.testing.schedules, checked
against z4j_core itself below) and written through `Store.write_events`, as
a drain does; what the store kept is read back both through the store and
with plain SQL (`query`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio

from z4j.brain.maintenance import Maintenance
from z4j.buffer import ClaimedRow
from z4j.config import Config
from z4j.schedules import activation
from z4j.store import store_for
from z4j.store.base import ScheduleFilter, ScheduleStream, Store
from z4j.store.schedule_frames import (
    FRAME_MAX_AGE_SECONDS,
    MAX_STAGED_FRAMES,
    MAX_STAGED_SNAPSHOTS,
)
from z4j.testing.schedules import control_event, schedule_row, snapshot_events
from z4j.testing.store import open_store, query

T0 = 1_800_000_000.0
OWNER = "huey-periodic"


class Ids:
    project = uuid.UUID(int=0)
    agent = uuid.UUID(int=0)


_row_ids = iter(range(1, 1_000_000))


def _batch(events: list[dict[str, Any]]) -> list[ClaimedRow]:
    """One buffer row (an agent's event batch) holding ``events``."""
    origin = {"project_id": str(Ids.project), "agent_id": str(Ids.agent), "worker_id": "w-1"}
    return [
        ClaimedRow(
            id=next(_row_ids),
            received_at=T0,
            source="agent",
            body=orjson.dumps(events),
            origin=orjson.dumps(origin),
        )
    ]


async def _write(store: Store, *events: dict[str, Any]) -> int:
    return await store.write_events(uuid.uuid4(), _batch(list(events)))


async def _seed(store: Store) -> ScheduleStream:
    """A project, an agent, and the brain's grant of the huey-periodic stream to it."""
    project = await store.create_project("sched")
    agent = await store.create_agent(project.id, "a", b"h" * 32)
    Ids.project, Ids.agent = project.id, agent.id
    grant = await _grant(store, expected=0)
    assert grant.epoch_number == 1
    return grant


async def _grant(store: Store, *, expected: int) -> ScheduleStream:
    grant = await store.grant_schedule_stream(
        Ids.project,
        OWNER,
        agent_id=Ids.agent,
        worker_id="w-1",
        worker_connected_at=T0,
        expected_epoch=expected,
        at=T0,
    )
    assert grant is not None
    return grant


def _rows(*keys: str, **fields: Any) -> list[dict[str, Any]]:
    return [schedule_row(OWNER, f"app.{k}", **fields) for k in keys]


async def _listed(store: Store) -> dict[str, Any]:
    return {s.source_key: s for s in await store.list_schedules(ScheduleFilter(limit=500))}


def _staged(config: Config) -> int:
    ((count,),) = query(config, "SELECT count(*) FROM schedule_frames")
    return int(count)


def _staged_sequences(config: Config) -> list[int]:
    return [int(n) for (n,) in query(config, "SELECT DISTINCT sequence FROM schedule_frames")]


def _reframed(event: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """``event`` with its frame's ``fields`` changed and its frame digest made to fit."""
    body = event["data"]["external_snapshot_frame"]
    body.update(fields)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    event["data"]["frame_digest"] = hashlib.sha256(canonical.encode()).hexdigest()
    return event


@asynccontextmanager
async def _counting(config: Config) -> AsyncIterator[tuple[Store, Counter[str]]]:
    """The store, with the staged frames it drops counted by reason (as /metrics does)."""
    dropped: Counter[str] = Counter()
    store = store_for(config, on_frames_dropped=dropped.update)
    with trio.fail_after(60):
        try:
            await store.migrate()
            yield store, dropped
        finally:
            await store.aclose()


async def test_frames_in_any_order_and_repeated_assemble_once(config: Config) -> None:
    async with open_store(config) as store:
        grant = await _seed(store)
        frames = snapshot_events(activation(grant), 1, _rows("a", "b", "c"))
        assert [f["data"]["external_snapshot_frame"]["frame_kind"] for f in frames] == [
            "rows",
            "rows",
            "rows",
            "terminal",
        ]
        rows0, rows1, rows2, terminal = frames
        # Several batches, out of order, with repeats: nothing until all are in.
        await _write(store, terminal, rows1)
        await _write(store, rows1)
        await _write(store, rows2, terminal)
        assert await _listed(store) == {}
        assert _staged(config) == 3
        await _write(store, rows0)
        listed = await _listed(store)
        assert sorted(listed) == ["app.a", "app.b", "app.c"]
        a = listed["app.a"]
        assert (a.scheduler, a.engine, a.name, a.expression, a.is_enabled) == (
            OWNER,
            "huey",
            "a",
            "*/5 * * * *",
            True,
        )
        assert (a.agent_id, a.worker_id, a.stream_id) == (Ids.agent, "w-1", grant.stream_id)
        assert (a.epoch_number, a.sequence) == (1, 1)
        assert a.snapshot_id == terminal["data"]["external_snapshot_frame"]["snapshot_id"]
        assert _staged(config) == 0  # the frames went with it
        rows = query(config, "SELECT source_key, updated_at FROM schedules ORDER BY source_key")
        # The whole snapshot again, and its frames one by one: nothing changes.
        await _write(store, *frames)
        for frame in frames:
            await _write(store, frame)
        assert query(
            config, "SELECT source_key, updated_at FROM schedules ORDER BY source_key"
        ) == (rows)
        assert _staged(config) == 0
        [stream] = await store.schedule_streams()
        assert (stream.applied_epoch, stream.applied_sequence) == (1, 1)


async def test_an_older_sequence_never_overwrites_a_newer_one(config: Config) -> None:
    async with open_store(config) as store:
        grant = await _seed(store)
        older = snapshot_events(activation(grant), 1, _rows("a", "b"))
        newer = snapshot_events(activation(grant), 2, _rows("a", is_enabled=False, total_runs=4))
        await _write(store, *newer)
        await _write(store, *older)  # late, and complete
        await _write(store, control_event(activation(grant), 2, _rows("a", name="renamed")))
        listed = await _listed(store)
        assert list(listed) == ["app.a"]
        assert (listed["app.a"].is_enabled, listed["app.a"].total_runs) == (False, 4)
        assert listed["app.a"].name == "a" and listed["app.a"].sequence == 2
        assert _staged(config) == 0  # the late frames are not kept either
        # A snapshot left incomplete by a newer one is dropped when that lands.
        await _write(store, *snapshot_events(activation(grant), 4, _rows("a"))[:1])
        assert _staged(config) == 1
        await _write(store, *snapshot_events(activation(grant), 5, _rows("a", "z")))
        assert sorted(await _listed(store)) == ["app.a", "app.z"] and _staged(config) == 0


async def test_a_deleted_schedule_disappears(config: Config) -> None:
    async with open_store(config) as store:
        grant = await _seed(store)
        await _write(store, *snapshot_events(activation(grant), 1, _rows("a", "b", "c")))
        await _write(store, *snapshot_events(activation(grant), 2, _rows("a", "c")))
        assert sorted(await _listed(store)) == ["app.a", "app.c"]
        # A control projection updates the rows it carries and deletes the keys it names.
        changed = _rows("a", is_enabled=False, source=f"{OWNER}:override")
        await _write(store, control_event(activation(grant), 3, changed, deleted=["app.c"]))
        listed = await _listed(store)
        assert list(listed) == ["app.a"]
        assert (listed["app.a"].is_enabled, listed["app.a"].source) == (False, f"{OWNER}:override")
        assert (listed["app.a"].sequence, listed["app.a"].snapshot_id) == (3, None)
        # An empty snapshot: the scheduler has no schedules any more.
        await _write(store, *snapshot_events(activation(grant), 4, []))
        assert await _listed(store) == {}


async def test_only_the_granted_stream_and_epoch_are_applied(config: Config) -> None:
    async with open_store(config) as store:
        first = await _seed(store)
        await _write(store, *snapshot_events(activation(first), 1, _rows("a")))
        second = await _grant(store, expected=1)
        assert (second.epoch_number, second.stream_id) == (2, first.stream_id)
        assert second.epoch_uuid != first.epoch_uuid
        assert await _grant_or_none(store, expected=1) is None  # compare-and-set
        # The old epoch's later snapshot is fenced; the new epoch starts over at 1.
        await _write(store, *snapshot_events(activation(first), 7, _rows("old")))
        assert sorted(await _listed(store)) == ["app.a"]
        await _write(store, *snapshot_events(activation(second), 1, _rows("new")))
        assert sorted(await _listed(store)) == ["app.new"]
        # Not the grant's epoch uuid, stream or owner: not applied.
        forged = {**activation(second), "epoch_uuid": str(uuid.uuid4())}
        await _write(store, *snapshot_events(forged, 9, _rows("forged")))
        other = {**activation(second), "stream_id": str(uuid.uuid4())}
        await _write(store, *snapshot_events(other, 9, _rows("forged")))
        stranger = {**activation(second), "owner": "celery-beat"}
        await _write(store, *snapshot_events(stranger, 9, [schedule_row("celery-beat", "x")]))
        assert sorted(await _listed(store)) == ["app.new"]
        assert _staged(config) == 0


async def _grant_or_none(store: Store, *, expected: int) -> ScheduleStream | None:
    return await store.grant_schedule_stream(
        Ids.project,
        OWNER,
        agent_id=Ids.agent,
        worker_id="w-2",
        worker_connected_at=T0,
        expected_epoch=expected,
        at=T0,
    )


async def test_a_snapshot_that_does_not_match_its_digest_is_not_applied(config: Config) -> None:
    async with open_store(config) as store:
        grant = await _seed(store)
        frames = snapshot_events(activation(grant), 1, _rows("a", "b"))
        # One row changed in transit, its frame digest made to fit: the
        # snapshot's digest still tells.
        body = frames[0]["data"]["external_snapshot_frame"]
        body["schedules"][0]["expression"] = "* * * * *"
        _reframed(frames[0])
        assert await _write(store, *frames) == 3  # the events are stored all the same
        assert await _listed(store) == {}
        assert _staged(config) == 0  # and the snapshot is dropped, not kept waiting
        # A frame whose own digest does not match is not even staged: its
        # snapshot waits for it (until a newer one lands).
        frames = snapshot_events(activation(grant), 2, _rows("a"))
        frames[0]["data"]["frame_digest"] = "0" * 64
        await _write(store, *frames)
        assert await _listed(store) == {} and _staged(config) == 1
        # Malformed events are stored as events, and change no schedule.
        junk = [
            {"id": "j1", "kind": "schedule.snapshot", "engine": OWNER, "data": {"x": 1}},
            {"id": "j2", "kind": "schedule.updated", "engine": OWNER, "data": None},
        ]
        assert await _write(store, *junk) == 2
        await _write(store, *snapshot_events(activation(grant), 3, _rows("ok")))
        assert sorted(await _listed(store)) == ["app.ok"] and _staged(config) == 0


async def test_snapshots_never_completed_stage_a_bounded_number_of_frames(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent sending ever-newer snapshots without their terminal frames:
    the stream keeps the newest few, the rest go (counted, logged once)."""
    async with _counting(config) as (store, dropped):
        grant = await _seed(store)
        # Single-frame snapshots: the snapshot bound.
        sequences = range(1, 4 * MAX_STAGED_SNAPSHOTS + 1)
        for sequence in sequences:
            rows0, _terminal = snapshot_events(activation(grant), sequence, _rows("a"))
            await _write(store, rows0)
            assert len(_staged_sequences(config)) <= MAX_STAGED_SNAPSHOTS
        assert len(sequences) > MAX_STAGED_SNAPSHOTS  # unbounded, all would stay
        assert sorted(_staged_sequences(config)) == list(sequences[-MAX_STAGED_SNAPSHOTS:])
        assert dropped == {"over_bound": len(sequences) - MAX_STAGED_SNAPSHOTS}
        # Snapshots of many frames: the frame bound, the oldest snapshot first.
        per_snapshot = MAX_STAGED_FRAMES // 2 - 10
        sent = 0
        for sequence in range(100, 105):
            keys = [f"k{n}" for n in range(per_snapshot)]
            frames = snapshot_events(activation(grant), sequence, _rows(*keys))[:-1]
            await _write(store, *frames)
            sent += len(frames)
            assert _staged(config) <= MAX_STAGED_FRAMES
        assert sent > MAX_STAGED_FRAMES
        assert sorted(_staged_sequences(config)) == [103, 104]
        # A whole snapshot still assembles, and the incomplete ones go with it.
        await _write(store, *snapshot_events(activation(grant), 105, _rows("x", "y", "z")))
        assert sorted(await _listed(store)) == ["app.x", "app.y", "app.z"]
        assert _staged(config) == 0
    warnings = [
        r
        for r in caplog.records
        if r.name == "z4j.store.schedules" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1 and grant.stream_id in warnings[0].getMessage()


async def test_a_snapshot_of_more_frames_than_a_stream_stages_is_refused(config: Config) -> None:
    async with _counting(config) as (store, dropped):
        grant = await _seed(store)
        # It could never be assembled: none of its frames is kept.
        huge = snapshot_events(activation(grant), 1, _rows("a", "b"))
        forged = [_reframed(f, frame_count=10**9) for f in huge[:2]]
        await _write(store, *forged)
        keys = [f"k{n}" for n in range(MAX_STAGED_FRAMES)]  # one frame too many
        over = snapshot_events(activation(grant), 2, _rows(*keys))
        await _write(store, *over)
        assert _staged(config) == 0 and await _listed(store) == {}
        assert dropped == {"oversize": len(forged) + len(over)}
        # The largest that fits, in two batches, is applied.
        keys = keys[:-1]
        largest = snapshot_events(activation(grant), 3, _rows(*keys))
        assert len(largest) == MAX_STAGED_FRAMES
        await _write(store, *largest[:100])
        await _write(store, *largest[100:])
        assert len(await store.list_schedules(ScheduleFilter(limit=1000))) == len(keys)
        assert _staged(config) == 0 and dropped == {"oversize": len(forged) + len(over)}


async def test_maintenance_deletes_frames_staged_over_an_hour_ago(config: Config) -> None:
    async with _counting(config) as (store, dropped):
        grant = await _seed(store)
        await _write(store, *snapshot_events(activation(grant), 1, _rows("a", "b"))[:-1])
        await _write(store, *snapshot_events(activation(grant), 2, _rows("a"))[:1])
        staged_at = time.time()
        assert await store.expire_schedule_frames(now=staged_at + FRAME_MAX_AGE_SECONDS - 60) == 0
        assert _staged(config) == 3
        ready = trio.Event()
        ready.set()
        later = staged_at + FRAME_MAX_AGE_SECONDS + 60
        maintenance = Maintenance(
            store, retention_days=3650, store_ready=ready, clock=lambda: later
        )
        await maintenance.run_once()
        assert _staged(config) == 0 and dropped == {"expired": 3}
        # The stream goes on: a later snapshot is applied as ever.
        await _write(store, *snapshot_events(activation(grant), 3, _rows("c", "d")))
        assert sorted(await _listed(store)) == ["app.c", "app.d"]


async def test_filters_and_pages(config: Config) -> None:
    async with open_store(config) as store:
        grant = await _seed(store)
        rows = _rows("a", "b", "c", "d", "e") + _rows("x", "y", is_enabled=False)
        await _write(store, *snapshot_events(activation(grant), 1, rows, rows_per_frame=3))
        assert len(await _listed(store)) == 7
        off = await store.list_schedules(ScheduleFilter(enabled=False))
        assert [s.source_key for s in off] == ["app.x", "app.y"]
        assert len(await store.list_schedules(ScheduleFilter(engine="huey"))) == 7
        assert await store.list_schedules(ScheduleFilter(engine="celery")) == []
        assert await store.list_schedules(ScheduleFilter(project_id=uuid.uuid4())) == []
        assert len(await store.list_schedules(ScheduleFilter(scheduler=OWNER))) == 7
        seen: list[str] = []
        after = None
        while True:
            page = await store.list_schedules(ScheduleFilter(limit=3, after=after))
            seen += [s.source_key for s in page]
            if len(page) < 3:
                break
            after = (page[-1].scheduler, page[-1].source_key, page[-1].project_id)
        assert seen == sorted(seen) and len(set(seen)) == 7
        [one] = await store.get_schedules(OWNER, "app.c")
        assert one.source_key == "app.c" and one.project_id == Ids.project
        assert await store.get_schedules(OWNER, "app.c", uuid.uuid4()) == []


@pytest.mark.postgres
async def test_concurrent_drains_of_one_snapshot_assemble_it(config: Config) -> None:
    """Each drain holds some frames of one snapshot: the stream's lock makes
    them take turns, so the last sees the others' frames and applies it."""
    if config.database_url is None:
        pytest.skip("one writer at a time on SQLite")
    async with open_store(config) as store:
        grant = await _seed(store)
        for sequence in range(1, 6):
            keys = [f"k{sequence}-{n}" for n in range(4)]
            frames = snapshot_events(activation(grant), sequence, _rows(*keys))
            async with trio.open_nursery() as nursery:
                for frame in frames:
                    nursery.start_soon(_write, store, frame)
            assert sorted(await _listed(store)) == [f"app.{k}" for k in keys], sequence
        assert _staged(config) == 0


def test_the_helper_builds_what_z4j_core_builds() -> None:
    """z4j.testing.schedules against the adapters' own library (Apache-2.0)."""
    external = pytest.importorskip("z4j_core.schedule_external")
    grant = {
        "owner": OWNER,
        "source_scope": external.external_schedule_source_scope(OWNER),
        "stream_id": str(uuid.uuid4()),
        "epoch_uuid": str(uuid.uuid4()),
        "epoch_number": 3,
        "adapter_instance_id": "agent/w-1",
    }
    rows = _rows("b", "a", last_run_at="2027-01-15T08:00:00.000000+00:00")
    frames = snapshot_events(grant, 5, rows, rows_per_frame=1)
    body = external.external_projection_body(
        stream_id=grant["stream_id"],
        epoch_uuid=grant["epoch_uuid"],
        epoch_number=3,
        sequence=5,
        kind="snapshot",
        owner=OWNER,
        source_scope=grant["source_scope"],
        adapter_instance_id="agent/w-1",
        schedules=rows,
        complete=True,
        stable_source=True,
    )
    checksum = external.external_projection_digest(body)
    for index, event in enumerate(frames):
        frame = event["data"]["external_snapshot_frame"]
        expected = external.external_snapshot_frame_body(
            stream_id=grant["stream_id"],
            epoch_uuid=grant["epoch_uuid"],
            epoch_number=3,
            sequence=5,
            owner=OWNER,
            source_scope=grant["source_scope"],
            adapter_instance_id="agent/w-1",
            snapshot_id=frame["snapshot_id"],
            frame_kind="rows" if index < 2 else "terminal",
            frame_index=index,
            frame_count=2,
            row_count=2,
            snapshot_digest=checksum,
            stable_source=True,
            schedules=frame["schedules"],
        )
        assert frame == expected
        assert event["data"]["frame_digest"] == external.external_snapshot_frame_digest(expected)
    assert grant["source_scope"] == activation(_Grant())["source_scope"]


class _Grant:
    scheduler = OWNER
    stream_id = "s"
    epoch_uuid = "e"
    epoch_number = 1
    adapter_instance_id = "a"

"""The tasks table, kept by the drain on both stores, and read back by the API's queries.

The projection's rules are tested without a store (tests/test_task_projection.py,
property_tests/test_task_projection.py); here: that the drain writes it in
the events' transaction, that a batch drained twice changes nothing, that
concurrent drains of one task lose nothing (Postgres), and the filters,
counts, pages and command links the API serves.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
import trio

from z4j.buffer import ClaimedRow
from z4j.config import Config
from z4j.store import task_writes
from z4j.store import tasks as task_sql
from z4j.store.base import CommandRecord, Store, TaskCounts, TaskFilter
from z4j.testing.brain import wait_until
from z4j.testing.store import open_store, query

T0 = 1_800_000_000.0


def _event(
    kind: str, task_id: str, n: int, *, engine: str = "celery", **data: Any
) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{engine}/{task_id}/{kind}/{n}")),
        "kind": kind,
        "engine": engine,
        "task_id": task_id,
        "occurred_at": f"2027-01-15T08:00:{n:02d}+00:00",
        "data": {"task_name": "app.add", "queue": "celery", **data},
    }


class Ids:
    """The project and agent the rows come from (made by `_seed`)."""

    project = uuid.UUID(int=0)
    agent = uuid.UUID(int=0)


def _row(row_id: int, events: list[dict[str, Any]], received_at: float = T0) -> ClaimedRow:
    origin = {"project_id": str(Ids.project), "agent_id": str(Ids.agent), "worker_id": "w-1"}
    return ClaimedRow(
        id=row_id,
        received_at=received_at,
        source="agent",
        body=orjson.dumps(events),
        origin=orjson.dumps(origin),
    )


def _lifecycle(task_id: str, *, fail: bool = False) -> list[dict[str, Any]]:
    end = (
        _event("task.failed", task_id, 3, exception="ValueError", exception_message="boom")
        if fail
        else _event("task.succeeded", task_id, 3, result=42)
    )
    return [
        _event("task.received", task_id, 1, args=[1, 2], kwargs={}),
        _event("task.started", task_id, 2),
        end,
    ]


def _assert_counts_agree(config: Config) -> None:
    """task_counts, summed over its shards, is what counting the tasks gives."""
    kept = query(
        config,
        "SELECT project_id, engine, queue, state, sum(n) FROM task_counts"
        " GROUP BY project_id, engine, queue, state HAVING sum(n) <> 0",
    )
    counted = query(
        config,
        "SELECT project_id, engine, coalesce(queue, ''), state, count(*) FROM tasks"
        " GROUP BY project_id, engine, coalesce(queue, ''), state",
    )
    assert sorted((*map(str, k[:4]), int(k[4])) for k in kept) == sorted(
        (*map(str, k[:4]), int(k[4])) for k in counted
    )


async def _seed(store: Store) -> None:
    await store.migrate()
    project = await store.create_project("tasks")
    agent = await store.create_agent(project.id, "a", b"h" * 32)
    Ids.project, Ids.agent = project.id, agent.id


async def test_the_drain_keeps_one_task_row_per_task(config: Config) -> None:
    buffer_id = uuid.uuid4()
    async with open_store(config) as store:
        await _seed(store)
        events = _lifecycle("t-ok") + _lifecycle("t-bad", fail=True)
        await store.write_events(buffer_id, [_row(1, events)])
        tasks = {t.task_id: t for t in await store.list_tasks(TaskFilter())}
        assert set(tasks) == {"t-ok", "t-bad"}
        assert (tasks["t-ok"].state, tasks["t-ok"].name, tasks["t-ok"].queue) == (
            "succeeded",
            "app.add",
            "celery",
        )
        assert (tasks["t-bad"].state, tasks["t-bad"].exception, tasks["t-bad"].message) == (
            "failed",
            "ValueError",
            "boom",
        )
        assert tasks["t-ok"].agent_id == Ids.agent and tasks["t-ok"].project_id == Ids.project
        [detail] = await store.get_tasks("celery", "t-ok")
        assert (detail.args, detail.kwargs, detail.result) == ([1, 2], {}, 42)
        assert detail.timeline is not None and len(detail.timeline) == 1


async def test_draining_a_batch_twice_changes_nothing(config: Config) -> None:
    buffer_id = uuid.uuid4()
    async with open_store(config) as store:
        await _seed(store)
        batch = [_row(1, _lifecycle("t-1"))]
        await store.write_events(buffer_id, batch)
        first = await store.get_tasks("celery", "t-1")
        await store.write_events(buffer_id, batch)  # a crash between commit and delete
        await store.write_events(uuid.uuid4(), [_row(9, _lifecycle("t-1"))])  # an agent's resend
        assert await store.get_tasks("celery", "t-1") == first


async def test_events_in_any_order_across_batches_give_one_answer(config: Config) -> None:
    async with open_store(config) as store:
        await _seed(store)
        received, started, succeeded = _lifecycle("t-late")
        # The end first, the start last: a late `received` moves nothing back.
        await store.write_events(uuid.uuid4(), [_row(1, [succeeded])])
        await store.write_events(uuid.uuid4(), [_row(2, [started])])
        await store.write_events(uuid.uuid4(), [_row(3, [received])])
        [late] = await store.get_tasks("celery", "t-late")
        await store.write_events(uuid.uuid4(), [_row(4, _lifecycle("t-ordered"))])
        [ordered] = await store.get_tasks("celery", "t-ordered")
        assert late.state == ordered.state == "succeeded"
        assert (late.args, late.result, late.attempts) == (ordered.args, ordered.result, 1)


async def test_filters_counts_and_pages(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    async with open_store(config) as store:
        await _seed(store)
        events = []
        for n in range(7):
            events += _lifecycle(f"ok-{n}")
        for n in range(3):
            events += _lifecycle(f"bad-{n}", fail=True)
        events.append(_event("task.received", "other-1", 1, engine="huey"))
        await store.write_events(uuid.uuid4(), [_row(1, events)])

        counts = await store.count_tasks(TaskFilter())
        assert counts == TaskCounts({"succeeded": 7, "failed": 3, "received": 1}, exact=True)
        assert await store.count_tasks(TaskFilter(engine="celery", state="failed")) == TaskCounts(
            {"succeeded": 7, "failed": 3}, exact=True
        )
        assert await store.count_tasks(TaskFilter(name="app.none")) == TaskCounts({}, exact=True)
        # A text match is counted over the newest COUNT_WINDOW matches: a lower bound once full.
        assert await store.count_tasks(TaskFilter(text="boom")) == TaskCounts(
            {"failed": 3}, exact=True
        )
        monkeypatch.setattr(task_sql, "COUNT_WINDOW", 2)
        assert await store.count_tasks(TaskFilter(text="boom")) == TaskCounts(
            {"failed": 2}, exact=False
        )
        monkeypatch.undo()
        _assert_counts_agree(config)
        failed = await store.list_tasks(TaskFilter(state="failed"))
        assert sorted(t.task_id for t in failed) == ["bad-0", "bad-1", "bad-2"]
        assert [t.task_id for t in await store.list_tasks(TaskFilter(engine="huey"))] == ["other-1"]
        assert {t.task_id for t in await store.list_tasks(TaskFilter(text="BOOM"))} == {
            "bad-0",
            "bad-1",
            "bad-2",
        }
        assert [t.task_id for t in await store.list_tasks(TaskFilter(text="ok-3"))] == ["ok-3"]
        assert await store.list_tasks(TaskFilter(text="%")) == []  # a wildcard is a character

        seen: list[str] = []
        before = None
        while True:
            page = await store.list_tasks(TaskFilter(limit=4, before=before))
            seen += [t.task_id for t in page]
            if len(page) < 4:
                break
            last = page[-1]
            before = (last.last_event_at, last.engine, last.task_id)
        assert len(seen) == len(set(seen)) == 11
        stamps = [
            (t.last_event_at, t.engine, t.task_id)
            for t in await store.list_tasks(TaskFilter(limit=50))
        ]
        assert stamps == sorted(stamps, reverse=True)


async def test_commands_that_name_a_task_link_old_and_new(config: Config) -> None:
    async with open_store(config) as store:
        await _seed(store)
        command = CommandRecord(
            id=uuid.uuid4(),
            project_id=Ids.project,
            agent_id=Ids.agent,
            action="retry_task",
            target={"engine": "celery", "task_id": "t-old"},
            parameters={"task_id": "t-old", "task_name": "app.add"},
            timeout_seconds=60,
            issued_by="api",
            state="pending",
            worker_id=None,
            delivery_claim_token=None,
            created_at=T0,
            dispatched_at=None,
            finished_at=None,
            result=None,
            error=None,
        )
        await store.create_command(command)
        await store.transition_command(
            command.id,
            from_states=("pending",),
            to_state="completed",
            at=T0 + 1,
            result={"new_task_id": "t-new", "task_name": "app.add"},
        )
        links = store.commands_for_task
        assert [c.id for c in await links(Ids.project, "celery", "t-old")] == [command.id]
        assert [c.id for c in await links(Ids.project, "celery", "t-new")] == [command.id]
        assert await links(Ids.project, "celery", "t-unrelated") == []
        # The same id under another engine, or in another project, is another task.
        assert await links(Ids.project, "huey", "t-old") == []
        assert await links(uuid.uuid4(), "celery", "t-old") == []


async def test_without_the_projection_no_task_is_kept(config: Config) -> None:
    import attrs

    async with open_store(attrs.evolve(config, task_projection=False)) as store:
        await _seed(store)
        assert await store.write_events(uuid.uuid4(), [_row(1, _lifecycle("t-1"))]) == 3
        assert await store.list_tasks(TaskFilter()) == []


@pytest.mark.postgres
async def test_concurrent_drains_of_one_task_lose_nothing(config: Config) -> None:
    """Two drains folding events of the same new task at once: the second
    waits for the first's row, and the row holds both drains' events."""
    if config.database_url is None:
        pytest.skip("one writer at a time on SQLite")
    async with open_store(config) as store:
        await _seed(store)
        for round_ in range(5):
            task_id = f"t-race-{round_}"
            parts = [
                [_event("task.received", task_id, 1, args=[round_], kwargs={})],
                [_event("task.started", task_id, 2)],
                [_event("task.succeeded", task_id, 3, result=round_)],
            ]
            async with trio.open_nursery() as nursery:
                for n, part in enumerate(parts):
                    nursery.start_soon(store.write_events, uuid.uuid4(), [_row(n + 1, part)])
            [task] = await store.get_tasks("celery", task_id)
            assert (task.state, task.args, task.result) == ("succeeded", [round_], round_)
        _assert_counts_agree(config)


@pytest.mark.postgres
async def test_concurrent_drains_of_many_tasks_lose_nothing(config: Config) -> None:
    """Drains whose batches share many tasks, new and known, in different
    orders: none waits for ever (keys are taken in one order), each task
    holds every event once, and the counts follow."""
    if config.database_url is None:
        pytest.skip("one writer at a time on SQLite")
    async with open_store(config) as store:
        await _seed(store)
        ids = [f"t-many-{n:03d}" for n in range(60)]
        known = ids[::2]  # half the tasks exist before the race
        await store.write_events(
            uuid.uuid4(), [_row(1, [_event("task.received", t, 1, args=[t]) for t in known])]
        )
        batches = [
            [_event("task.started", t, 2) for t in ids],
            [_event("task.succeeded", t, 3, result=t) for t in reversed(ids)],
            [_event("task.received", t, 1, args=[t]) for t in ids[1::2]],
            [_event("task.started", t, 2) for t in ids[::3]],  # a resend, in part
        ]
        async with trio.open_nursery() as nursery:
            for n, batch in enumerate(batches):
                nursery.start_soon(store.write_events, uuid.uuid4(), [_row(n + 2, batch)])
        tasks = {t.task_id: t for t in await store.list_tasks(TaskFilter(limit=100))}
        assert set(tasks) == set(ids)
        assert {t.state for t in tasks.values()} == {"succeeded"}
        for task_id in ids[:7]:
            [task] = await store.get_tasks("celery", task_id)
            assert (task.args, task.result, task.attempts) == ([task_id], task_id, 1)
            assert [a["state"] for a in task.timeline or []] == ["succeeded"]
        assert await store.count_tasks(TaskFilter()) == TaskCounts(
            {"succeeded": len(ids)}, exact=True
        )
        _assert_counts_agree(config)


async def test_retention_forgets_old_tasks_and_their_counts(config: Config) -> None:
    async with open_store(config) as store:
        await _seed(store)
        await store.write_events(
            uuid.uuid4(), [_row(1, _lifecycle("t-old") + _lifecycle("t-older", fail=True))]
        )
        late = [dict(e, occurred_at="2027-01-16T08:00:00+00:00") for e in _lifecycle("t-new")]
        await store.write_events(uuid.uuid4(), [_row(2, late, received_at=T0 + 86400)])
        # T0 is 2027-01-15T08:00:00Z: the old tasks' events are within its minute.
        assert await store.forget_tasks(before=T0 + 60) == 2
        assert [t.task_id for t in await store.list_tasks(TaskFilter())] == ["t-new"]
        assert await store.count_tasks(TaskFilter()) == TaskCounts({"succeeded": 1}, exact=True)
        assert await store.forget_tasks(before=T0 + 60) == 0
        _assert_counts_agree(config)


@pytest.mark.postgres
async def test_a_task_inserted_by_another_drain_meanwhile_is_folded_into(config: Config) -> None:
    """The race the insert step settles: drain B looks the task up before drain
    A commits it, so B's insert conflicts; B then locks A's row and folds into
    it, and the counts move once."""
    if config.database_url is None:
        pytest.skip("one writer at a time on SQLite")
    from z4j.tasks import task_event

    async with open_store(config) as store:
        await _seed(store)
    url = config.database_url
    received, started, succeeded = (
        task_event(Ids.project.bytes, Ids.agent.bytes, "w-1", e, T0) for e in _lifecycle("t-raced")
    )
    assert received and started and succeeded
    await _race(url, [received, started], [succeeded])  # A inserts; B's insert waits on it
    async with open_store(config) as store:
        [task] = await store.get_tasks("celery", "t-raced")
        assert (task.state, task.args, task.result) == ("succeeded", [1, 2], 42)
        assert len(task.timeline or []) == 1
        assert await store.count_tasks(TaskFilter()) == TaskCounts({"succeeded": 1}, exact=True)
    _assert_counts_agree(config)


@pytest.mark.postgres
async def test_a_task_changed_by_another_drain_meanwhile_is_folded_again(
    config: Config,
) -> None:
    """Drain B folds a known task from the row it read without a lock; drain A
    changes that row before B locks it. B sees the row's version moved, and
    folds again from A's row: nothing A wrote is lost."""
    if config.database_url is None:
        pytest.skip("one writer at a time on SQLite")
    from z4j.tasks import task_event

    async with open_store(config) as store:
        await _seed(store)
        received, started, succeeded = _lifecycle("t-changed")
        await store.write_events(uuid.uuid4(), [_row(1, [received])])
    url = config.database_url
    started_event, succeeded_event = (
        task_event(Ids.project.bytes, Ids.agent.bytes, "w-1", e, T0) for e in (started, succeeded)
    )
    assert started_event and succeeded_event
    await _race(url, [started_event], [succeeded_event])  # A updates; B's lock waits on it
    async with open_store(config) as store:
        [task] = await store.get_tasks("celery", "t-changed")
        assert task.state == "succeeded"
        assert task.started_at is not None  # A's event, which B's first fold lacked
        assert await store.count_tasks(TaskFilter()) == TaskCounts({"succeeded": 1}, exact=True)
    _assert_counts_agree(config)


async def _race(
    url: str,
    first: list[Any],
    then: list[Any],
    *,
    cache: task_writes.TaskCache | None = None,
    a_commits: bool = True,
) -> None:
    """Drain A writes ``first`` and holds its transaction open; drain B writes
    ``then`` on a thread until Postgres shows it waiting on A; A commits (or
    rolls back), then B. Both must succeed. ``cache``: the drains' shared one
    (two workers of one store)."""
    import psycopg

    from z4j.store.postgres import PG, _configure  # the store's own connection setup

    with psycopg.connect(url) as a, psycopg.connect(url) as b, psycopg.connect(url) as watch:
        watch.autocommit = True
        _configure(a)
        _configure(b)
        task_writes.write_tasks(PG, a, first, cache)  # not committed
        b_pid = b.info.backend_pid
        done: list[BaseException | None] = []

        def drain_b() -> None:
            try:
                task_writes.write_tasks(PG, b, then, cache)
                b.commit()
                done.append(None)
            except BaseException as exc:
                done.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, drain_b)
            await wait_until(
                lambda: watch.execute(
                    "SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted", (b_pid,)
                ).fetchall(),
                timeout=30,
            )
            if a_commits:
                a.commit()
            else:
                a.rollback()
        assert done == [None]


@pytest.mark.postgres
async def test_a_fold_of_a_drain_that_rolls_back_is_not_kept(config: Config) -> None:
    """Two drains of one store share its cache: drain B folds the task from
    what drain A folded and has not committed, and waits for A's row. A rolls
    back: the row B expected is not there, so B folds again from nothing, and
    keeps none of A's events (they will be drained again)."""
    if config.database_url is None:
        pytest.skip("one writer at a time on SQLite")
    from z4j.tasks import task_event

    async with open_store(config) as store:
        await _seed(store)
    received, started, succeeded = (
        task_event(Ids.project.bytes, Ids.agent.bytes, "w-1", e, T0) for e in _lifecycle("t-undone")
    )
    assert received and started and succeeded
    cache = task_writes.TaskCache()
    await _race(config.database_url, [received, started], [succeeded], cache=cache, a_commits=False)
    async with open_store(config) as store:
        [task] = await store.get_tasks("celery", "t-undone")
        assert (task.state, task.result) == ("succeeded", 42)
        assert (task.args, task.started_at, task.received_at) == (None, None, None)
        assert await store.count_tasks(TaskFilter()) == TaskCounts({"succeeded": 1}, exact=True)
    _assert_counts_agree(config)


async def test_a_task_forgotten_meanwhile_comes_back_with_its_new_events_only(
    config: Config,
) -> None:
    """The store's drains still hold the task they wrote (Postgres: in their
    cache) when retention deletes it; a later event makes a new task of it,
    not the old one again."""
    async with open_store(config) as store:
        await _seed(store)
        await store.write_events(uuid.uuid4(), [_row(1, _lifecycle("t-gone"))])
        assert await store.forget_tasks(before=T0 + 60) == 1
        late = _event("task.revoked", "t-gone", 9)
        await store.write_events(uuid.uuid4(), [_row(2, [late], received_at=T0 + 120)])
        [task] = await store.get_tasks("celery", "t-gone")
        assert (task.state, task.args, task.result, task.started_at) == (
            "revoked",
            None,
            None,
            None,
        )
        assert await store.count_tasks(TaskFilter()) == TaskCounts({"revoked": 1}, exact=True)
    _assert_counts_agree(config)


def test_the_task_cache_keeps_to_its_budget() -> None:
    """The drains' cache holds at most its budget of stored doc, the least
    recently written going first; a doc past a 64th of it is not kept."""
    cache = task_writes.TaskCache(max_bytes=64_000)
    before = task_writes._Before(1, None, None)
    cache.put(((f"t-{n}", "celery", b"p"), before, 900) for n in range(1000))
    assert cache.size <= 64_000 and len(cache) == 64_000 // 900
    assert cache.get(("t-999", "celery", b"p")) is before
    assert cache.get(("t-0", "celery", b"p")) is None
    cache.put([(("t-999", "celery", b"p"), before, 100)])  # written again, smaller
    assert cache.size == (64_000 // 900 - 1) * 900 + 100
    cache.put([(("big", "celery", b"p"), before, 1001)])  # past 64,000 / 64
    assert cache.get(("big", "celery", b"p")) is None
    cache.put([(("t-999", "celery", b"p"), before, 1001)])  # grew past it: dropped
    assert cache.get(("t-999", "celery", b"p")) is None
    assert cache.size == sum(size for _, size in cache._entries.values())

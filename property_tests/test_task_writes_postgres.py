"""The task projection as Postgres drains write it (`z4j.store.task_writes`).

Drains fold from their own cache of the tasks they wrote last, or from
nothing, and write each row in one statement only where it is still the
version they folded from; they may roll back (the batch is drained again
later). Generated task lifecycles (the adapters' shapes, as in
property_tests/test_task_projection.py), delivered in any order, some
events twice, in batches each drained by one of two drains (two caches: two
replicas, or one shared: two workers of one), each batch committed or first
rolled back: every task's stored doc and columns are those of one Python
merge of all its events, and ``task_counts`` counts the rows.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import psycopg
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from z4j.store import task_writes
from z4j.store.postgres import PG, PostgresStore, _configure
from z4j.tasks import TaskEvent, merge

from .test_task_projection import Run, celery_runs, dramatiq_runs, huey_runs, taskiq_runs

EXAMPLES = max(10, settings().max_examples // 2)

runs = celery_runs() | dramatiq_runs() | huey_runs() | taskiq_runs()


@pytest.fixture(scope="module")
def url(postgres: Any) -> Iterator[str]:
    name = f"z4j_task_writes_{uuid.uuid4().hex[:10]}"
    database = postgres.create_database(name)

    async def migrate() -> None:
        store = PostgresStore.from_url(database, pool_size=1, statement_timeout_ms=0)
        try:
            await store.migrate()
        finally:
            await store.aclose()

    trio.run(migrate)
    try:
        yield database
    finally:
        postgres.drop_database(name)


@st.composite
def deliveries(
    draw: Callable[[Any], Any], events: list[TaskEvent]
) -> list[tuple[list[TaskEvent], int, bool]]:
    """(batch, drain 0 or 1, rolled back first) in drain order: the events in
    any order, some twice, cut into batches."""
    rnd = draw(st.randoms(use_true_random=False))
    stream = [*events, *(rnd.choice(events) for _ in range(rnd.randint(0, len(events))))]
    rnd.shuffle(stream)
    cuts = sorted(rnd.sample(range(1, len(stream)), min(len(stream) - 1, rnd.randint(0, 8))))
    bounds = [0, *cuts, len(stream)]
    return [
        (stream[a:b], rnd.randrange(2), rnd.random() < 0.25) for a, b in itertools.pairwise(bounds)
    ]


def _check(conn: psycopg.Connection[Any], events: list[TaskEvent]) -> None:
    by_key: dict[tuple[bytes, str, str], list[TaskEvent]] = {}
    for event in events:
        by_key.setdefault((event.project_id, event.engine, event.task_id), []).append(event)
    rows = conn.execute(
        "SELECT project_id, engine, task_id, name, queue, state, attempts, agent_id, worker,"
        " exception, message, runtime_ms, parent_id, root_id, extract(epoch FROM first_seen),"
        " extract(epoch FROM received_at), extract(epoch FROM started_at),"
        " extract(epoch FROM finished_at), extract(epoch FROM last_event_at), doc FROM tasks"
    ).fetchall()
    assert len(rows) == len(by_key)
    for project, engine, task_id, *columns, doc in rows:
        want_doc, want = merge(None, by_key[project.bytes, engine, task_id])
        assert orjson.loads(doc) == orjson.loads(orjson.dumps(want_doc))
        got = dict(zip(_COLUMNS, columns, strict=True))
        got["agent_id"] = got["agent_id"].bytes if got["agent_id"] else b""
        for column in _COLUMNS:
            value, wanted = got[column], getattr(want, column)
            if column in _TIMES:
                assert (value is None) == (wanted is None), column
                if value is not None:
                    assert abs(float(value) - wanted) < 1e-5, column
            else:
                assert value == wanted, column
    counted = conn.execute(
        "SELECT project_id, engine, coalesce(queue, ''), state, count(*) FROM tasks GROUP BY 1, 2, 3, 4"
    ).fetchall()
    kept = conn.execute(
        "SELECT project_id, engine, queue, state, sum(n)::bigint FROM task_counts"
        " GROUP BY 1, 2, 3, 4 HAVING sum(n) <> 0"
    ).fetchall()
    assert sorted(counted) == sorted(kept)


_COLUMNS = (
    "name",
    "queue",
    "state",
    "attempts",
    "agent_id",
    "worker",
    "exception",
    "message",
    "runtime_ms",
    "parent_id",
    "root_id",
    "first_seen",
    "received_at",
    "started_at",
    "finished_at",
    "last_event_at",
)
_TIMES = frozenset(("first_seen", "received_at", "started_at", "finished_at", "last_event_at"))


@pytest.mark.postgres
@settings(max_examples=EXAMPLES)
@given(tasks=st.lists(runs, min_size=1, max_size=3), shared=st.booleans(), data=st.data())
def test_drains_with_caches_and_rollbacks_store_one_merge_of_every_event(
    url: str, tasks: list[Run], shared: bool, data: st.DataObject
) -> None:
    events = [event for run in tasks for event in run.events]
    one = task_writes.TaskCache()
    caches = (one, one if shared else task_writes.TaskCache())
    with psycopg.connect(url) as conn:
        _configure(conn)
        conn.execute("TRUNCATE tasks, task_counts")
        conn.commit()
        again: list[tuple[list[TaskEvent], int]] = []
        for batch, drain, rolled_back in data.draw(deliveries(events)):
            if rolled_back:
                task_writes.write_tasks(PG, conn, batch, caches[drain])
                conn.rollback()
                again.append((batch, 1 - drain))  # drained again later, maybe elsewhere
                continue
            task_writes.write_tasks(PG, conn, batch, caches[drain])
            conn.commit()
        random.Random(len(again)).shuffle(again)
        for batch, drain in again:
            task_writes.write_tasks(PG, conn, batch, caches[drain])
            conn.commit()
        _check(conn, events)

"""The agent directory (projects, agents, tokens, workers, audit) on both stores.

Each test runs against SQLite and a real Postgres (the `config` fixture), and
checks what landed with plain SQL on a connection of its own, so that a store
reading back its own mistakes cannot pass.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import psycopg
import pytest
import trio

from z4j.brain.maintenance import Maintenance
from z4j.config import Config
from z4j.store import Agent, DirectoryConflict, Project, Store
from z4j.store._filters import agents_where
from z4j.store.postgres import PG
from z4j.store.sqlite import SQ
from z4j.store.workers import CONNECTED_COUNTS
from z4j.testing.store import json_of, open_store, query


def json_type(config: Config, column: str, table: str) -> str:
    """The JSON type of a stored value: ``object`` when it was stored as an object."""
    fn = "jsonb_typeof" if config.database_url is not None else "json_type"
    (row,) = query(config, f"SELECT {fn}({column}) FROM {table}")
    return str(row[0])


def execute(config: Config, sql: str) -> None:
    """Write outside the store under test (blocking)."""
    if config.database_url is not None:
        with psycopg.connect(config.database_url, autocommit=True) as conn:
            conn.execute(sql.encode())
        return
    db = sqlite3.connect(config.sqlite_store_path, isolation_level=None)
    try:
        db.execute(sql)
    finally:
        db.close()


# -- projects ------------------------------------------------------------------------


async def test_projects_are_created_found_and_listed(config: Config) -> None:
    async with open_store(config) as store:
        shop = await store.create_project("shop")
        blog = await store.create_project("blog")
        assert isinstance(shop, Project) and shop.name == "shop"
        assert shop.id.version == 4 and shop.id != blog.id

        assert await store.find_project("shop") == shop
        assert await store.find_project(str(shop.id)) == shop
        assert await store.find_project(str(shop.id).upper()) == shop
        assert await store.find_project("nope") is None
        assert await store.find_project(str(uuid.uuid4())) is None
        assert await store.list_projects() == [blog, shop]  # by name

    assert sorted(query(config, "SELECT id, name FROM projects")) == sorted(
        [(str(shop.id), "shop"), (str(blog.id), "blog")]
    )


async def test_a_project_name_is_taken_once(config: Config) -> None:
    async with open_store(config) as store:
        first = await store.create_project("shop")
        with pytest.raises(DirectoryConflict, match="shop"):
            await store.create_project("shop")
        # The failed insert left the store usable and unchanged.
        assert await store.list_projects() == [first]
        assert (await store.create_project("other")).name == "other"


async def test_no_projects_and_no_agents_at_first(config: Config) -> None:
    async with open_store(config) as store:
        assert await store.list_projects() == []
        assert await store.list_agents() == []
        assert await store.agent_by_token(b"\0" * 32) is None
        assert await store.find_agent(str(uuid.uuid4())) is None


# -- agents --------------------------------------------------------------------------


async def test_agents_are_created_with_their_token_hash(config: Config) -> None:
    token = b"h" * 32
    async with open_store(config) as store:
        project = await store.create_project("shop")
        before = time.time()
        agent = await store.create_agent(project.id, "web-1", token)
        assert agent == Agent(agent.id, project.id, "web-1", False, agent.created_at)
        assert before - 5 <= agent.created_at <= time.time() + 5  # the database's clock on PG
        assert agent.id.version == 4
        assert await store.agent_by_token(token) == agent
        assert await store.agent_by_token(b"x" * 32) is None

    assert query(config, "SELECT id, project_id, name, revoked_at FROM agents") == [
        (str(agent.id), str(project.id), "web-1", None)
    ]
    assert query(config, "SELECT token_hash, agent_id FROM agent_tokens") == [
        (token, str(agent.id))
    ]


async def test_an_agent_name_is_taken_once_per_project(config: Config) -> None:
    async with open_store(config) as store:
        shop = await store.create_project("shop")
        blog = await store.create_project("blog")
        first = await store.create_agent(shop.id, "web", b"1" * 32)
        with pytest.raises(DirectoryConflict, match="web"):
            await store.create_agent(shop.id, "web", b"2" * 32)
        # Nothing of the refused agent stays: neither the row nor its token.
        assert await store.agent_by_token(b"2" * 32) is None
        assert await store.list_agents(shop.id) == [first]
        # The same name in another project is fine.
        other = await store.create_agent(blog.id, "web", b"3" * 32)
        assert other.project_id == blog.id
        # Revoked agents keep their names.
        assert await store.revoke_agent(first.id)
        with pytest.raises(DirectoryConflict):
            await store.create_agent(shop.id, "web", b"4" * 32)
    assert len(query(config, "SELECT * FROM agent_tokens")) == 2


async def test_an_agent_needs_an_existing_project(config: Config) -> None:
    async with open_store(config) as store:
        with pytest.raises(LookupError):
            await store.create_agent(uuid.uuid4(), "web", b"1" * 32)
        assert await store.agent_by_token(b"1" * 32) is None
    assert query(config, "SELECT count(*) FROM agents") == [(0,)]


async def test_agents_are_found_by_id_or_by_name_in_a_project(config: Config) -> None:
    async with open_store(config) as store:
        shop = await store.create_project("shop")
        blog = await store.create_project("blog")
        web = await store.create_agent(shop.id, "web", b"1" * 32)
        blog_web = await store.create_agent(blog.id, "web", b"2" * 32)

        assert await store.find_agent(str(web.id)) == web
        assert await store.find_agent(str(web.id), shop.id) == web
        assert await store.find_agent(str(web.id), blog.id) is None  # not that project's
        assert await store.find_agent("web", shop.id) == web
        assert await store.find_agent("web", blog.id) == blog_web
        assert await store.find_agent("web") is None  # a name needs its project
        assert await store.find_agent("nope", shop.id) is None
        assert await store.find_agent(str(uuid.uuid4()), shop.id) is None


async def test_agents_are_listed_by_project_then_name(config: Config) -> None:
    async with open_store(config) as store:
        shop = await store.create_project("shop")
        blog = await store.create_project("blog")
        s2 = await store.create_agent(shop.id, "worker", b"1" * 32)
        s1 = await store.create_agent(shop.id, "api", b"2" * 32)
        b1 = await store.create_agent(blog.id, "zeta", b"3" * 32)
        assert await store.list_agents() == [b1, s1, s2]
        assert await store.list_agents(shop.id) == [s1, s2]
        assert await store.list_agents(blog.id) == [b1]
        assert await store.list_agents(uuid.uuid4()) == []


async def test_a_revoked_agent_is_not_found_by_its_token(config: Config) -> None:
    async with open_store(config) as store:
        project = await store.create_project("shop")
        agent = await store.create_agent(project.id, "web", b"t" * 32)
        keep = await store.create_agent(project.id, "api", b"k" * 32)
        before = time.time()

        assert await store.revoke_agent(agent.id) is True
        assert await store.revoke_agent(agent.id) is False  # already revoked
        assert await store.revoke_agent(uuid.uuid4()) is False  # unknown

        assert await store.agent_by_token(b"t" * 32) is None
        assert await store.agent_by_token(b"k" * 32) == keep
        revoked = attrs.evolve(agent, revoked=True)
        assert await store.find_agent(str(agent.id)) == revoked
        assert await store.find_agent("web", project.id) == revoked
        assert await store.list_agents(project.id) == [keep, revoked]

    ((revoked_at,),) = query(config, "SELECT revoked_at FROM agents WHERE name = 'web'")
    assert before - 5 <= revoked_at <= time.time() + 5
    assert query(config, "SELECT revoked_at FROM agents WHERE name = 'api'") == [(None,)]


async def test_agents_are_paged_newest_first_by_creation_then_id(config: Config) -> None:
    async with open_store(config) as store:
        project = await store.create_project("shop")
        made = [await store.create_agent(project.id, f"a{n}", bytes([n]) * 32) for n in range(7)]
        await store.revoke_agent(made[1].id)
    # Three created at one instant: their ids order them.
    execute(
        config,
        "UPDATE agents SET created_at = (SELECT max(created_at) FROM agents)"
        " WHERE name IN ('a0', 'a3', 'a5')",
    )
    stored = sorted(
        ((at, uuid.UUID(id)) for id, at in query(config, "SELECT id, created_at FROM agents")),
        reverse=True,
    )
    async with open_store(config) as store:
        pages = [await store.agents_page(limit=3)]
        while len(pages[-1]) == 3:
            last = pages[-1][-1]
            pages.append(await store.agents_page(before=(last.created_at, last.id), limit=3))
        assert await store.agents_page(before=stored[-1], limit=3) == []
    assert [len(page) for page in pages] == [3, 3, 1]
    seen = [item for page in pages for item in page]
    assert [(a.created_at, a.id) for a in seen] == stored
    by_id = {a.id: a for a in made}
    assert [a.id for a in seen if a.revoked] == [made[1].id]
    # As created (three of them moved to one instant since).
    assert all(
        attrs.evolve(a, created_at=by_id[a.id].created_at) == by_id[a.id]
        for a in seen
        if not a.revoked
    )


async def test_a_page_of_agents_reads_its_index(config: Config) -> None:
    """Over 20,000 agents, a page after a cursor is a range of agents_by_created
    (migration 20) on both stores, not a walk from the newest."""
    async with open_store(config) as store:
        await store.create_project("bulk")
    pg = config.database_url is not None
    execute(
        config,
        "INSERT INTO agents (id, project_id, name, created_at)"
        " SELECT gen_random_uuid(), p.id, 'bulk-' || n, to_timestamp(1e9 - n)"
        " FROM projects p, generate_series(1, 20000) n"
        if pg
        else "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)"
        " INSERT INTO agents (id, project_id, name, created_at)"
        " SELECT lower(hex(randomblob(16))), p.id, 'bulk-' || i, 1e9 - i FROM projects p, n",
    )
    execute(config, "ANALYZE")
    where = agents_where(PG if pg else SQ, (1e9 - 5000, uuid.uuid4()))
    sql = f"SELECT a.id FROM agents a{where} ORDER BY a.created_at DESC, a.id DESC LIMIT 51"
    explain = "EXPLAIN " if pg else "EXPLAIN QUERY PLAN "
    plan = " ".join(
        str(row) for row in query(config, explain + sql.replace("%s", "?"), *where.params)
    )
    assert "agents_by_created" in plan, plan
    assert ("Index Cond" if pg else "SEARCH") in plan, plan


# -- workers -------------------------------------------------------------------------


async def _agent(store: Store) -> Agent:
    project = await store.create_project(f"p-{uuid.uuid4().hex[:8]}")
    return await store.create_agent(project.id, "web", uuid.uuid4().bytes * 2)


WORKER_COLUMNS = (
    "role, hello, instance_id, connected_at, last_seen, disconnected_at, status, registry"
)


def worker_row(config: Config, agent: Agent, worker_id: str) -> dict[str, Any]:
    rows = query(
        config,
        f"SELECT {WORKER_COLUMNS} FROM workers WHERE agent_id = ? AND worker_id = ?",
        str(agent.id),
        worker_id,
    )
    assert len(rows) == 1
    row = dict(zip(WORKER_COLUMNS.split(", "), rows[0], strict=True))
    for name in ("hello", "status", "registry"):
        row[name] = json_of(config, row[name])
    return row


async def test_a_worker_connects_is_seen_and_disconnects(config: Config) -> None:
    instance = uuid.uuid4()
    hello = {"worker_id": "w-1", "engines": ["fake"], "host": {"name": "héllo"}}
    async with open_store(config) as store:
        agent = await _agent(store)
        await store.worker_connected(
            agent.id, "w-1", role="web", hello=hello, instance_id=instance, at=1000.25
        )
        row = worker_row(config, agent, "w-1")
        assert row == {
            "role": "web",
            "hello": hello,
            "instance_id": str(instance),
            "connected_at": 1000.25,
            "last_seen": 1000.25,
            "disconnected_at": None,
            "status": None,
            "registry": {},
        }
        assert json_type(config, "hello", "workers") == "object"

        await store.worker_seen(agent.id, "w-1", at=1010.5)
        row = worker_row(config, agent, "w-1")
        assert row["last_seen"] == 1010.5 and row["status"] is None
        assert row["connected_at"] == 1000.25

        status = {"queues": {"default": 3}, "ok": True}
        await store.worker_seen(agent.id, "w-1", at=1020.0, status=status)
        row = worker_row(config, agent, "w-1")
        assert row["last_seen"] == 1020.0 and row["status"] == status
        assert json_type(config, "status", "workers") == "object"

        # A heartbeat without a status keeps the last one.
        await store.worker_seen(agent.id, "w-1", at=1030.0)
        assert worker_row(config, agent, "w-1")["status"] == status

        await store.worker_disconnected(agent.id, "w-1", at=1040.75)
        row = worker_row(config, agent, "w-1")
        assert row["disconnected_at"] == 1040.75 and row["last_seen"] == 1030.0

        # Unknown workers are no-ops, not errors.
        await store.worker_seen(agent.id, "nobody", at=1.0, status={"x": 1})
        await store.worker_disconnected(agent.id, "nobody", at=1.0)
        await store.worker_registry(
            agent.id, "nobody", engine="fake", added=[{"name": "t"}], removed=[], updated=[]
        )
    assert query(config, "SELECT worker_id FROM workers") == [("w-1",)]


async def test_connecting_twice_updates_the_one_row(config: Config) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    async with open_store(config) as store:
        agent = await _agent(store)
        await store.worker_connected(
            agent.id, "w-1", role="web", hello={"n": 1}, instance_id=first, at=100.0
        )
        await store.worker_seen(agent.id, "w-1", at=150.0, status={"s": 1})
        await store.worker_registry(
            agent.id, "w-1", engine="fake", added=[{"name": "a"}], removed=[], updated=[]
        )
        await store.worker_disconnected(agent.id, "w-1", at=160.0)
        await store.worker_connected(
            agent.id, "w-1", role=None, hello={"n": 2}, instance_id=second, at=200.0
        )
        # Another worker of the same agent has its own row.
        await store.worker_connected(
            agent.id, "w-2", role="beat", hello={"n": 3}, instance_id=first, at=210.0
        )
        row = worker_row(config, agent, "w-1")
        assert row == {
            "role": None,
            "hello": {"n": 2},
            "instance_id": str(second),
            "connected_at": 200.0,
            "last_seen": 200.0,
            "disconnected_at": None,
            # Kept across reconnects: the last status and the task registry.
            "status": {"s": 1},
            "registry": {"fake": {"a": {"name": "a"}}},
        }
    assert sorted(query(config, "SELECT worker_id FROM workers")) == [("w-1",), ("w-2",)]


async def test_workers_of_a_page_of_agents_and_the_connected_counts(config: Config) -> None:
    async with open_store(config) as store:
        a, b, c = [await _agent(store) for _ in range(3)]
        for agent, worker in ((a, "a-1"), (a, "a-2"), (b, "b-1"), (c, "c-1")):
            await store.worker_connected(
                agent.id, worker, role=None, hello={}, instance_id=uuid.uuid4(), at=1.0
            )
        await store.worker_disconnected(a.id, "a-2", at=2.0)
        await store.worker_disconnected(c.id, "c-1", at=2.0)

        some = await store.list_workers(agent_ids=frozenset({a.id, c.id}))
        assert [(w.agent_id, w.worker_id) for w in some] == sorted(
            [(a.id, "a-1"), (a.id, "a-2"), (c.id, "c-1")]
        )
        assert await store.list_workers(agent_ids=frozenset()) == []
        assert [w.worker_id for w in await store.list_workers(agent_ids=frozenset({b.id}))] == [
            "b-1"
        ]
        # Connected: a-1 and b-1, of agents a and b.
        assert await store.connected_counts() == (2, 2)


async def test_the_connected_counts_read_the_connected_workers_alone(config: Config) -> None:
    """Over 20,000 disconnected workers, the counts read workers_connected
    (migration 21), an index of the connected ones, on both stores."""
    async with open_store(config) as store:
        agent = await _agent(store)
        await store.worker_connected(
            agent.id, "live", role=None, hello={}, instance_id=uuid.uuid4(), at=1.0
        )
    pg = config.database_url is not None
    execute(
        config,
        "INSERT INTO workers (agent_id, worker_id, hello, connected_at, last_seen,"
        " disconnected_at) SELECT a.id, 'gone-' || n, '{}', now(), now(), now()"
        " FROM agents a, generate_series(1, 20000) n"
        if pg
        else "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)"
        " INSERT INTO workers (agent_id, worker_id, hello, connected_at, last_seen,"
        " disconnected_at) SELECT a.id, 'gone-' || i, '{}', 1, 1, 2 FROM agents a, n",
    )
    execute(config, "ANALYZE")
    async with open_store(config) as store:
        assert await store.connected_counts() == (1, 1)
    explain = "EXPLAIN " if pg else "EXPLAIN QUERY PLAN "
    plan = " ".join(str(row) for row in query(config, explain + CONNECTED_COUNTS))
    assert "workers_connected" in plan, plan


async def test_maintenance_forgets_workers_gone_longer_than_the_retention(
    config: Config,
) -> None:
    """Each agent start adds a worker row (z4j-bare names a new worker each
    time); those not seen for the retention go, connected ones and the agents stay."""
    day = 86_400.0
    now = 100 * day
    async with open_store(config) as store:
        agent = await _agent(store)
        for n in range(3):  # three restarts, 40 days ago: gone
            worker = f"bare-{n}"
            at = now - 40 * day + n
            await store.worker_connected(
                agent.id, worker, role=None, hello={}, instance_id=uuid.uuid4(), at=at
            )
            await store.worker_disconnected(agent.id, worker, at=at + 0.5)
        # Connected 40 days ago and seen since: it stays.
        await store.worker_connected(
            agent.id, "live", role=None, hello={}, instance_id=uuid.uuid4(), at=now - 40 * day
        )
        await store.worker_seen(agent.id, "live", at=now - 60)
        # Gone 10 days ago: within the retention, it stays.
        await store.worker_connected(
            agent.id, "recent", role=None, hello={}, instance_id=uuid.uuid4(), at=now - 11 * day
        )
        await store.worker_disconnected(agent.id, "recent", at=now - 10 * day)

        upkeep = Maintenance(store, retention_days=30, store_ready=trio.Event(), clock=lambda: now)
        await upkeep.run_once()
        left = await store.list_workers(agent.id)
        assert sorted(w.worker_id for w in left) == ["live", "recent"]
        assert [a.id for a in await store.list_agents()] == [agent.id]
        await upkeep.run_once()  # nothing more to do
        assert len(await store.list_workers(agent.id)) == 2


async def test_the_registry_takes_adds_updates_and_removals(config: Config) -> None:
    async with open_store(config) as store:
        agent = await _agent(store)
        await store.worker_connected(
            agent.id, "w-1", role=None, hello={}, instance_id=uuid.uuid4(), at=1.0
        )

        def registry() -> Any:
            return worker_row(config, agent, "w-1")["registry"]

        await store.worker_registry(
            agent.id,
            "w-1",
            engine="celery",
            added=[
                {"name": "app.add", "queue": "default"},
                {"name": "app.mul", "queue": "default"},
                {"queue": "no name"},  # skipped
                {"name": 7},  # skipped: not a string
            ],
            removed=[],
            updated=[],
        )
        assert registry() == {
            "celery": {
                "app.add": {"name": "app.add", "queue": "default"},
                "app.mul": {"name": "app.mul", "queue": "default"},
            }
        }
        assert json_type(config, "registry", "workers") == "object"

        await store.worker_registry(
            agent.id,
            "w-1",
            engine="rq",
            added=[{"name": "jobs.send", "timeout": 30}],
            removed=[],
            updated=[],
        )
        await store.worker_registry(
            agent.id,
            "w-1",
            engine="celery",
            added=[{"name": "app.sub"}],
            removed=["app.mul", "never.there"],
            updated=[{"name": "app.add", "queue": "fast"}],
        )
        assert registry() == {
            "celery": {
                "app.add": {"name": "app.add", "queue": "fast"},
                "app.sub": {"name": "app.sub"},
            },
            "rq": {"jobs.send": {"name": "jobs.send", "timeout": 30}},
        }

        await store.worker_registry(
            agent.id, "w-1", engine="rq", added=[], removed=["jobs.send"], updated=[]
        )
        assert registry()["rq"] == {}


async def test_registry_deltas_applied_together_lose_nothing(config: Config) -> None:
    """Concurrent read-modify-writes of one worker's registry serialise."""
    async with open_store(config) as store:
        agent = await _agent(store)
        await store.worker_connected(
            agent.id, "w-1", role=None, hello={}, instance_id=uuid.uuid4(), at=1.0
        )

        def add(n: int) -> Callable[[], Any]:
            return lambda: store.worker_registry(
                agent.id, "w-1", engine="e", added=[{"name": f"t{n}"}], removed=[], updated=[]
            )

        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(add(n))
    ((stored,),) = query(config, "SELECT registry FROM workers")
    assert sorted(json_of(config, stored)["e"]) == sorted(f"t{n}" for n in range(20))


# -- audit ---------------------------------------------------------------------------


async def test_audit_rows_are_written(config: Config) -> None:
    before = time.time()
    async with open_store(config) as store:
        await store.audit("project.create", "project:1", {"name": "shop"}, actor="cli:me")
        await store.audit("agent.revoke", "agent:2", {"why": ["lost", "laptop"]})
    rows = query(config, "SELECT at, actor, action, subject, details FROM audit_events ORDER BY id")
    assert [(r[1], r[2], r[3], json_of(config, r[4])) for r in rows] == [
        ("cli:me", "project.create", "project:1", {"name": "shop"}),
        (None, "agent.revoke", "agent:2", {"why": ["lost", "laptop"]}),
    ]
    assert all(before - 5 <= r[0] <= time.time() + 5 for r in rows)
    fn = "jsonb_typeof" if config.database_url is not None else "json_type"
    assert query(config, f"SELECT DISTINCT {fn}(details) FROM audit_events") == [("object",)]

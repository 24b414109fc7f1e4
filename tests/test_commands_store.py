"""Commands in both stores: rows, queries, compare-and-set transitions, audit.

Each test runs against SQLite and a real Postgres (the `config` fixture), and
checks what landed with plain SQL on a connection of its own where it matters.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import psycopg
import pytest
import trio

from z4j.config import Config
from z4j.store import (
    COMMAND_STATES,
    FINAL_COMMAND_STATES,
    Agent,
    CommandRecord,
    Store,
)
from z4j.testing.store import json_of, open_store, query


def json_types(config: Config, column: str, table: str) -> list[tuple[Any, ...]]:
    """The distinct JSON types of a column's values (``object`` for objects)."""
    fn = "jsonb_typeof" if config.database_url is not None else "json_type"
    return query(config, f"SELECT DISTINCT {fn}({column}) FROM {table} WHERE {column} IS NOT NULL")


async def _agent(store: Store, name: str = "web") -> Agent:
    project = await store.create_project(f"p-{uuid.uuid4().hex[:8]}")
    return await store.create_agent(project.id, name, uuid.uuid4().bytes * 2)


def command(agent: Agent, *, created_at: float = 1000.0, **changes: Any) -> CommandRecord:
    record = CommandRecord(
        id=uuid.uuid4(),
        project_id=agent.project_id,
        agent_id=agent.id,
        action="schedule.resync",
        target={"role": "web"},
        parameters={"n": 1, "names": ["a", "b"], "nested": {"ok": True}},
        timeout_seconds=30,
        issued_by="cli:me",
        state="pending",
        worker_id=None,
        delivery_claim_token=None,
        created_at=created_at,
        dispatched_at=None,
        finished_at=None,
        result=None,
        error=None,
    )
    return attrs.evolve(record, **changes)


@asynccontextmanager
async def hold_command(config: Config, command_id: uuid.UUID) -> AsyncIterator[None]:
    """Lock the command from a connection of our own until the block ends."""
    if config.database_url is not None:
        conn = await trio.to_thread.run_sync(psycopg.connect, config.database_url)
        try:
            await trio.to_thread.run_sync(
                lambda: conn.execute(
                    "SELECT 1 FROM commands WHERE id = %s FOR UPDATE", (command_id,)
                ).fetchone()
            )
            yield
        finally:
            await trio.to_thread.run_sync(conn.close)  # rolls back: the lock goes
        return
    db = sqlite3.connect(config.sqlite_store_path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
    finally:
        db.close()  # rolls back: the lock goes


def audit_rows(config: Config, record: CommandRecord) -> list[tuple[Any, ...]]:
    """(actor, action, details) of the command's audit rows, in order."""
    rows = query(
        config,
        "SELECT actor, action, details FROM audit_events WHERE subject = ? ORDER BY id",
        f"command:{record.id}",
    )
    return [(actor, action, json_of(config, details)) for actor, action, details in rows]


def test_the_states() -> None:
    assert COMMAND_STATES[0] == "pending" and len(set(COMMAND_STATES)) == 6
    assert set(COMMAND_STATES) - FINAL_COMMAND_STATES == {"pending", "dispatched"}


# -- creating and reading ------------------------------------------------------------


async def test_a_command_round_trips(config: Config) -> None:
    async with open_store(config) as store:
        agent = await _agent(store)
        record = command(agent, created_at=1000.25)
        await store.create_command(record)
        got = await store.get_command(record.id)
        assert got == record
        assert got is not None
        assert isinstance(got.id, uuid.UUID) and isinstance(got.agent_id, uuid.UUID)
        assert isinstance(got.created_at, float)
        assert isinstance(got.target, dict) and isinstance(got.parameters, dict)
        assert await store.get_command(uuid.uuid4()) is None

        # Every field as given, results and times included.
        full = command(
            agent,
            state="completed",
            issued_by=None,
            target={},
            worker_id="w-1",
            delivery_claim_token="tok",
            dispatched_at=1001.5,
            finished_at=1002.75,
            result={"rows": [1, 2], "héllo": "wörld"},
            error="partial",
        )
        await store.create_command(full)
        assert await store.get_command(full.id) == full

    rows = query(
        config,
        "SELECT id, project_id, agent_id, action, state, created_at, result"
        " FROM commands WHERE id = ?",
        str(record.id),
    )
    assert rows == [
        (
            str(record.id),
            str(agent.project_id),
            str(agent.id),
            "schedule.resync",
            "pending",
            1000.25,
            None,  # SQL NULL, not JSON null
        )
    ]
    for column in ("target", "parameters", "result"):
        assert json_types(config, column, "commands") == [("object",)]


async def test_creating_writes_an_audit_row(config: Config) -> None:
    before = time.time()
    async with open_store(config) as store:
        agent = await _agent(store)
        record = command(agent)
        anonymous = command(agent, issued_by=None)
        await store.create_command(record)
        await store.create_command(anonymous)
    assert audit_rows(config, record) == [
        (
            "cli:me",
            "command.created",
            {"action": "schedule.resync", "agent_id": str(agent.id), "issued_by": "cli:me"},
        )
    ]
    assert audit_rows(config, anonymous) == [
        (
            None,
            "command.created",
            {"action": "schedule.resync", "agent_id": str(agent.id), "issued_by": None},
        )
    ]
    assert json_types(config, "details", "audit_events") == [("object",)]
    ((at,),) = query(config, "SELECT min(at) FROM audit_events")
    assert before - 5 <= at <= time.time() + 5


async def test_a_command_needs_its_agent_in_its_project(config: Config) -> None:
    async with open_store(config) as store:
        agent = await _agent(store)
        other = await _agent(store)
        with pytest.raises(LookupError):
            await store.create_command(command(agent, agent_id=uuid.uuid4()))
        with pytest.raises(LookupError):
            await store.create_command(command(agent, project_id=other.project_id))
        with pytest.raises(ValueError, match="bogus"):
            await store.create_command(command(agent, state="bogus"))
        assert await store.list_commands() == []
    # Nothing stays of the refused commands, audit included.
    assert query(config, "SELECT count(*) FROM commands") == [(0,)]
    assert query(config, "SELECT count(*) FROM audit_events") == [(0,)]


async def test_open_and_listed_commands_in_order(config: Config) -> None:
    async with open_store(config) as store:
        web = await _agent(store, "web")
        api = await _agent(store, "api")
        # Created out of order on purpose: the order is by created_at.
        w2 = command(web, created_at=1002.0)
        a1 = command(api, created_at=1001.0)
        w1 = command(web, created_at=1000.0)
        w3 = command(
            web, created_at=1003.0, state="dispatched", worker_id="w", dispatched_at=1003.5
        )
        done = command(web, created_at=1004.0, state="completed", finished_at=1005.0)
        gone = command(api, created_at=999.0, state="cancelled", finished_at=999.5)
        for record in (w2, a1, w1, w3, done, gone):
            await store.create_command(record)

        assert await store.open_commands() == [w1, a1, w2, w3]
        assert await store.open_commands(None) == [w1, a1, w2, w3]
        assert await store.open_commands(web.id) == [w1, w2, w3]
        assert await store.open_commands(api.id) == [a1]
        assert await store.open_commands(uuid.uuid4()) == []

        assert await store.list_commands() == [done, w3, w2, a1, w1, gone]
        assert await store.list_commands(limit=2) == [done, w3]
        assert await store.list_commands(agent_id=web.id) == [done, w3, w2, w1]
        assert await store.list_commands(agent_id=api.id, limit=1) == [a1]
        assert await store.list_commands(agent_id=uuid.uuid4()) == []

        # Leaving the open states leaves the open list.
        await store.transition_command(
            w1.id, from_states=("pending",), to_state="cancelled", at=2000.0
        )
        assert await store.open_commands(web.id) == [w2, w3]


# -- transitions ---------------------------------------------------------------------


@pytest.mark.parametrize("final", ["completed", "failed"])
async def test_dispatched_then_finished(config: Config, final: str) -> None:
    async with open_store(config) as store:
        agent = await _agent(store)
        record = command(agent)
        await store.create_command(record)

        dispatched = await store.transition_command(
            record.id,
            from_states=("pending",),
            to_state="dispatched",
            at=1001.5,
            worker_id="w-1",
            delivery_claim_token="claim-1",
        )
        expected = attrs.evolve(
            record,
            state="dispatched",
            worker_id="w-1",
            delivery_claim_token="claim-1",
            dispatched_at=1001.5,
        )
        assert dispatched == expected
        assert await store.get_command(record.id) == expected

        error = None if final == "completed" else "boom"
        result = {"ok": final == "completed", "out": [1, "two"]}
        finished = await store.transition_command(
            record.id,
            from_states=("pending", "dispatched"),
            to_state=final,
            at=1002.25,
            result=result,
            error=error,
        )
        expected = attrs.evolve(
            expected, state=final, finished_at=1002.25, result=result, error=error
        )
        assert finished == expected  # worker and claim kept, dispatched_at too
        assert await store.get_command(record.id) == expected
        assert await store.open_commands() == []

    created = {"action": "schedule.resync", "agent_id": str(agent.id), "issued_by": "cli:me"}
    ended = {"from": "dispatched"} | ({"error": error} if error else {})
    assert audit_rows(config, record) == [
        ("cli:me", "command.created", created),
        (None, "command.dispatched", {"from": "pending", "worker_id": "w-1"}),
        (None, f"command.{final}", ended),
    ]


async def test_a_result_straight_from_pending_names_its_worker(config: Config) -> None:
    async with open_store(config) as store:
        agent = await _agent(store)
        record = command(agent)
        await store.create_command(record)
        done = await store.transition_command(
            record.id,
            from_states=("pending", "dispatched"),
            to_state="completed",
            at=1003.0,
            worker_id="w-2",
            result={"n": 1},
        )
        assert done == attrs.evolve(
            record, state="completed", worker_id="w-2", finished_at=1003.0, result={"n": 1}
        )
    assert audit_rows(config, record)[-1] == (
        None,
        "command.completed",
        {"from": "pending", "worker_id": "w-2"},
    )


@pytest.mark.parametrize("final", ["timeout", "cancelled"])
async def test_pending_straight_to_timeout_or_cancelled(config: Config, final: str) -> None:
    async with open_store(config) as store:
        agent = await _agent(store)
        record = command(agent)
        await store.create_command(record)
        error = "no result within 30 s" if final == "timeout" else None
        actor = "sweeper" if final == "timeout" else "cli:op"
        ended = await store.transition_command(
            record.id,
            from_states=("pending", "dispatched"),
            to_state=final,
            at=1040.0,
            actor=actor,
            error=error,
        )
        expected = attrs.evolve(record, state=final, finished_at=1040.0, error=error)
        assert ended == expected
        assert await store.get_command(record.id) == expected
        assert ended is not None and ended.dispatched_at is None and ended.worker_id is None
    assert audit_rows(config, record)[1:] == [
        (actor, f"command.{final}", {"from": "pending"} | ({"error": error} if error else {}))
    ]


async def test_a_missed_compare_and_set_changes_nothing(config: Config) -> None:
    async with open_store(config) as store:
        agent = await _agent(store)
        record = command(agent)
        await store.create_command(record)
        cancelled = await store.transition_command(
            record.id, from_states=("pending", "dispatched"), to_state="cancelled", at=1010.0
        )
        assert cancelled is not None

        # A late result cannot revive it, nor can a dispatch or another ending.
        assert (
            await store.transition_command(
                record.id,
                from_states=("pending", "dispatched"),
                to_state="completed",
                at=1020.0,
                worker_id="w-9",
                delivery_claim_token="late",
                result={"late": True},
                error="late",
            )
            is None
        )
        assert (
            await store.transition_command(
                record.id, from_states=("pending",), to_state="dispatched", at=1021.0
            )
            is None
        )
        assert (
            await store.transition_command(record.id, from_states=(), to_state="failed", at=1022.0)
            is None
        )
        # An unknown command misses too.
        assert (
            await store.transition_command(
                uuid.uuid4(), from_states=COMMAND_STATES, to_state="failed", at=1023.0
            )
            is None
        )
        assert await store.get_command(record.id) == cancelled

        with pytest.raises(ValueError, match="exploded"):
            await store.transition_command(
                record.id, from_states=("cancelled",), to_state="exploded", at=1024.0
            )
        assert await store.get_command(record.id) == cancelled

    # Only the creation and the one real transition were audited.
    assert [action for _, action, _ in audit_rows(config, record)] == [
        "command.created",
        "command.cancelled",
    ]
    assert query(config, "SELECT count(*) FROM audit_events") == [(2,)]


async def test_transitions_are_audited_with_their_actor(config: Config) -> None:
    async with open_store(config) as store:
        agent = await _agent(store)
        record = command(agent)
        await store.create_command(record)
        await store.transition_command(
            record.id,
            from_states=("pending",),
            to_state="dispatched",
            at=1001.0,
            actor="brain:1",
            worker_id="w-1",
        )
        await store.transition_command(
            record.id,
            from_states=("dispatched",),
            to_state="failed",
            at=1002.0,
            actor="brain:1",
            worker_id="w-1",
            error="it broke",
        )
    assert audit_rows(config, record)[1:] == [
        ("brain:1", "command.dispatched", {"from": "pending", "worker_id": "w-1"}),
        (
            "brain:1",
            "command.failed",
            {"from": "dispatched", "worker_id": "w-1", "error": "it broke"},
        ),
    ]
    assert json_types(config, "details", "audit_events") == [("object",)]


async def test_only_one_of_racing_transitions_wins(config: Config) -> None:
    async with open_store(config) as store:
        agent = await _agent(store)
        record = command(agent)
        await store.create_command(record)
        assert await store.transition_command(
            record.id, from_states=("pending",), to_state="dispatched", at=1001.0, worker_id="w"
        )
        outcomes: list[tuple[str, CommandRecord | None]] = []

        async def finish(n: int) -> None:
            to_state = "completed" if n % 2 else "timeout"
            outcome = await store.transition_command(
                record.id,
                from_states=("pending", "dispatched"),
                to_state=to_state,
                at=1002.0 + n,
                actor=f"task-{n}",
                result={"n": n} if to_state == "completed" else None,
                error=None if to_state == "completed" else f"timeout {n}",
            )
            outcomes.append((to_state, outcome))

        # Hold the command (Postgres: its row; SQLite: the write lock) from
        # outside while the racers start, so that they all pile up on it and
        # contend when it goes, rather than happening to run one by one.
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery, hold_command(config, record.id):
                for n in range(10):
                    nursery.start_soon(finish, n)
                await trio.sleep(0.5)

        won = [(to_state, outcome) for to_state, outcome in outcomes if outcome is not None]
        assert len(outcomes) == 10 and len(won) == 1
        ((to_state, winner),) = won
        assert winner is not None and winner.state == to_state
        assert await store.get_command(record.id) == winner

    actions = [action for _, action, _ in audit_rows(config, record)]
    assert actions == ["command.created", "command.dispatched", f"command.{to_state}"]


# -- overdue -------------------------------------------------------------------------


async def test_overdue_commands_by_their_own_timeout(config: Config) -> None:
    async with open_store(config) as store:
        agent = await _agent(store)
        short = command(agent, created_at=1000.0, timeout_seconds=10)  # due 1010
        long = command(agent, created_at=995.0, timeout_seconds=60)  # due 1055
        sent = command(
            agent,
            created_at=1001.0,
            timeout_seconds=20,  # due 1021
            state="dispatched",
            worker_id="w",
            dispatched_at=1002.0,
        )
        done = command(agent, created_at=900.0, timeout_seconds=1, state="completed")
        for record in (short, long, sent, done):
            await store.create_command(record)

        assert await store.overdue_commands(now=1005.0) == []
        assert await store.overdue_commands(now=1010.0) == []  # due, not yet past it
        assert await store.overdue_commands(now=1010.5) == [short]
        assert await store.overdue_commands(now=1030.0) == [short, sent]
        assert await store.overdue_commands(now=2000.0) == [long, short, sent]

        await store.transition_command(
            short.id, from_states=("pending", "dispatched"), to_state="timeout", at=2000.0
        )
        assert await store.overdue_commands(now=2000.0) == [long, sent]

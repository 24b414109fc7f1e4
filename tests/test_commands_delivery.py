"""Delivering a command to a worker: once per live worker, never after it is final.

The sweep, a notification and a worker's connect each read pending commands
and then deliver them, so a record in hand may be stale by the time it is
sent. These tests drive `Commands.deliver` on a real store (SQLite and
Postgres) with stand-in sessions that record what they are sent.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio.testing

from z4j.brain.commands import Commands
from z4j.brain.links import SessionTable
from z4j.config import Config
from z4j.protocol.agent import frames as f
from z4j.store import CommandRecord, Store, store_for


@attrs.define(eq=False)
class StandInSession:
    """What `Commands` uses of a live agent session; keeps what it is sent."""

    worker_id: str
    agent_id: uuid.UUID
    role: str | None = None
    kicked: int | None = None  # the close code, once closed
    sent: list[str] = attrs.Factory(list)
    claims: list[str | None] = attrs.Factory(list)  # the delivery_claim_token of each
    hold: trio.Event | None = None  # set: sends wait for it
    broken: bool = False  # the next send fails, as on a closing socket

    def kick(self, code: int) -> None:
        self.kicked = code

    async def send(self, payload: Any, *, frame_id: str | None = None) -> None:
        assert isinstance(payload, f.Command)
        if self.broken:
            self.broken = False
            raise trio.BrokenResourceError("socket closed")
        self.sent.append(frame_id)
        self.claims.append(payload.delivery_claim_token)
        if self.hold is not None:
            await self.hold.wait()


StandInEndpoint = SessionTable[StandInSession]


@asynccontextmanager
async def commands_on(
    config: Config, master_secret: bytes | None = None
) -> AsyncIterator[tuple[Commands, Store, StandInEndpoint]]:
    store = store_for(config)
    with trio.fail_after(30):
        try:
            await store.migrate()
            endpoint = StandInEndpoint()
            commands = Commands(store, master_secret=master_secret, sessions=endpoint)
            yield commands, store, endpoint
        finally:
            await store.aclose()


async def pending_command(commands: Commands, store: Store) -> CommandRecord:
    project = await store.create_project(f"p-{uuid.uuid4().hex[:8]}")
    agent = await store.create_agent(project.id, "web", uuid.uuid4().bytes * 2)
    # No session yet: minted, it stays pending.
    return await commands.send(agent.id, "ping")


def connect(endpoint: StandInEndpoint, record: CommandRecord, worker: str) -> StandInSession:
    session = StandInSession(worker_id=worker, agent_id=record.agent_id)
    endpoint.sessions[(record.agent_id, worker)] = session
    return session


async def test_a_stale_pending_record_is_not_sent_after_the_answer(config: Config) -> None:
    async with commands_on(config) as (commands, store, endpoint):
        record = await pending_command(commands, store)
        worker = connect(endpoint, record, "w-1")
        assert await commands.deliver(record)
        result = f.CommandResult(status="success", delivery_claim_token=worker.claims[0])
        assert await commands.answered(str(record.id), record.agent_id, "w-1", result)
        final = await store.get_command(record.id)
        assert final is not None and final.state == "completed"

        # The sweep read the command as pending before the answer landed.
        assert record.state == "pending"
        assert not await commands.deliver(record)
        assert worker.sent == [str(record.id)]


async def test_racing_deliveries_send_once(config: Config) -> None:
    async with commands_on(config) as (commands, store, endpoint):
        record = await pending_command(commands, store)
        worker = connect(endpoint, record, "w-1")
        worker.hold = trio.Event()
        results: list[bool] = []

        async def deliver() -> None:
            results.append(await commands.deliver(record))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliver)  # the worker's connect
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(deliver)  # a notification, while the first still sends
            await trio.testing.wait_all_tasks_blocked()
            worker.hold.set()
        assert sorted(results) == [False, True]
        assert worker.sent == [str(record.id)]


async def test_a_second_worker_gets_it_only_once_the_first_is_gone(config: Config) -> None:
    async with commands_on(config) as (commands, store, endpoint):
        record = await pending_command(commands, store)
        first = connect(endpoint, record, "w-1")
        assert await commands.deliver(record)
        second = connect(endpoint, record, "w-2")
        del endpoint.sessions[(record.agent_id, "w-1")]
        endpoint.sessions[(record.agent_id, "w-1")] = first  # still connected (now listed last)
        assert not await commands.deliver(record)
        assert (first.sent, second.sent) == ([str(record.id)], [])

        del endpoint.sessions[(record.agent_id, "w-1")]  # it went away without answering
        assert await commands.deliver(record)
        assert second.sent == [str(record.id)]


async def test_a_failed_send_is_tried_again(config: Config) -> None:
    async with commands_on(config) as (commands, store, endpoint):
        record = await pending_command(commands, store)
        worker = connect(endpoint, record, "w-1")
        worker.broken = True
        assert not await commands.deliver(record)
        assert await commands.deliver(record)
        assert worker.sent == [str(record.id)]


# -- only the worker a command went to may answer it ---------------------------------------


async def test_only_the_holder_may_ack_or_answer(config: Config) -> None:
    async with commands_on(config) as (commands, store, endpoint):
        record = await pending_command(commands, store)
        holder = connect(endpoint, record, "w-1")
        assert await commands.deliver(record)
        claim = holder.claims[0]
        stranger = await pending_command(commands, store)  # another project's agent
        cid = str(record.id)
        forged = [
            (stranger.agent_id, "w-1", claim),  # another agent, the right token
            (record.agent_id, "w-2", claim),  # another worker of the same agent
            (record.agent_id, "w-1", None),  # the holder's name, no token
            (record.agent_id, "w-1", "0" * 32),  # a guessed token
        ]
        for agent_id, worker, token in forged:
            ack = f.CommandAck(delivery_claim_token=token)
            assert not await commands.acknowledged(cid, agent_id, worker, ack)
            result = f.CommandResult(status="failed", error="x", delivery_claim_token=token)
            assert not await commands.answered(cid, agent_id, worker, result)
        now = await store.get_command(record.id)
        assert now is not None and (now.state, now.error) == ("pending", None)
        assert commands._stats.agent_rejected["foreign_command"] == 2 * len(forged)

        # The holder's own ack and result still land.
        assert await commands.acknowledged(
            cid, record.agent_id, "w-1", f.CommandAck(delivery_claim_token=claim)
        )
        result = f.CommandResult(status="success", result={"ok": 1}, delivery_claim_token=claim)
        assert await commands.answered(cid, record.agent_id, "w-1", result)
        done = await store.get_command(record.id)
        assert done is not None and (done.state, done.result) == ("completed", {"ok": 1})


async def test_a_claim_is_checked_by_any_replica_sharing_the_secret(config: Config) -> None:
    """On Postgres the answer may come through another replica (the worker
    reconnected there): the token checks out there with no shared state
    but the brain secret and the stored command."""
    secret = uuid.uuid4().bytes * 2
    async with (
        commands_on(config, secret) as (here, store, endpoint),
        commands_on(config, secret) as (there, _, _),
        commands_on(config, uuid.uuid4().bytes * 2) as (foreign_brain, _, _),
    ):
        record = await pending_command(here, store)
        holder = connect(endpoint, record, "w-1")
        assert await here.deliver(record)
        claim = holder.claims[0]
        result = f.CommandResult(status="success", delivery_claim_token=claim)
        # A brain with another secret cannot tell the token is good: refused.
        assert not await foreign_brain.answered(str(record.id), record.agent_id, "w-1", result)
        assert await there.answered(str(record.id), record.agent_id, "w-1", result)
        done = await store.get_command(record.id)
        assert done is not None and done.state == "completed"


async def test_a_redelivery_to_the_same_worker_keeps_its_claim(config: Config) -> None:
    """A worker that reconnects gets the command again with the same token, so
    the result it buffered on the first connection still lands."""
    async with commands_on(config) as (commands, store, endpoint):
        record = await pending_command(commands, store)
        first = connect(endpoint, record, "w-1")
        assert await commands.deliver(record)
        del endpoint.sessions[(record.agent_id, "w-1")]
        second = connect(endpoint, record, "w-1")  # the same worker, a new session
        assert await commands.deliver(record)
        assert first.claims == second.claims
        result = f.CommandResult(status="success", delivery_claim_token=first.claims[0])
        assert await commands.answered(str(record.id), record.agent_id, "w-1", result)

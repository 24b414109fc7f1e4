"""/ws/dashboard: sign-in, the live messages each producer sends, coalescing, dropping."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

import z4j.ingest
from z4j.config import Config
from z4j.dashboard_hub import QUEUE_SIZE, DashboardHub, _Subscriber
from z4j.stats import BrainStats
from z4j.testing.agents import admin_token, provision, raw_agent
from z4j.testing.brain import running_brain


class Viewer:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    async def next_event(self) -> Any:
        while True:
            for event in self.ws.events():
                return event
            self.ws.receive_data(await self.stream.receive_some(65536) or None)

    async def next_message(self, kind: str) -> dict[str, Any]:
        """The next JSON message of type ``kind`` (others are skipped)."""
        while True:
            event = await self.next_event()
            assert isinstance(event, TextMessage), event
            message: dict[str, Any] = orjson.loads(event.data)
            if message["type"] == kind:
                return message


@asynccontextmanager
async def viewer(http: tuple[str, int], token: str | None) -> AsyncIterator[Viewer]:
    stream = await trio.open_tcp_stream(*http)
    async with stream:
        v = Viewer(stream)
        headers = [(b"Authorization", f"Bearer {token}".encode())] if token else []
        await stream.send_all(
            v.ws.send(Request(host="x", target="/ws/dashboard", extra_headers=headers))
        )
        assert isinstance(await v.next_event(), AcceptConnection)
        yield v


async def test_a_signed_in_viewer_sees_events_commands_agents_and_instances(config: Config) -> None:
    token = await admin_token(config)
    agent_token, secret, agent_id = await provision(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            async with viewer(http, token) as v:
                hello = await v.next_message("hello")
                assert hello["instance_id"] == str(brain.addresses.instance_id)

                client = await z4j.ingest.open_trio(*brain.ingest)
                async with client:
                    assert await client.send_many([[{"t": "deploy", "n": 1}, {"t": "log"}]])
                events = await v.next_message("events")
                assert events["count"] == 2 and events["kinds"] == {"deploy": 1, "log": 1}
                assert {e["kind"] for e in events["sample"]} == {"deploy", "log"}

                async with raw_agent(http, agent_token, secret, worker_id="w-1"):
                    agent = await v.next_message("agent")
                    assert agent == {
                        "type": "agent",
                        "agent_id": str(agent_id),
                        "worker_id": "w-1",
                        "state": "connected",
                    }
                    record = await brain.addresses.commands.send(agent_id, "ping")
                    command = await v.next_message("command")
                    assert command["command"]["id"] == str(record.id)
                    assert command["command"]["state"] == "pending"
                assert (await v.next_message("agent"))["state"] == "disconnected"

                instance = await v.next_message("instance")
                assert instance["instance"]["id"] == str(brain.addresses.instance_id)
                assert brain.stats.dashboard_subscribers == 1
        assert brain.stats.dashboard_subscribers == 0


async def test_a_viewer_without_a_session_is_closed_4401(config: Config) -> None:
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            async with viewer(brain.addresses.http, None) as v:
                closed = await v.next_event()
                assert isinstance(closed, CloseConnection) and closed.code == 4401


def test_bursts_of_events_coalesce_and_a_slow_subscriber_is_dropped() -> None:
    stats = BrainStats()
    hub = DashboardHub(stats, None, instance_id="i")
    slow = _Subscriber()
    hub._subscribers.add(slow)
    for n in range(5):
        hub.publish({"type": "events", "count": 2, "kinds": {"k": 2}, "sample": [{"n": n}]})
    assert list(slow.queue) == [
        {
            "type": "events",
            "count": 10,
            "kinds": {"k": 10},
            "sample": [{"n": 4}, {"n": 3}, {"n": 2}, {"n": 1}, {"n": 0}],
        }
    ]
    assert stats.dashboard_coalesced == 4
    for n in range(QUEUE_SIZE - 1):  # the coalesced events message holds one place
        hub.publish({"type": "command", "command": {"n": n}})
    assert not slow.dropped and len(slow.queue) == QUEUE_SIZE
    hub.publish({"type": "command", "command": {"n": "one too many"}})
    assert slow.dropped and stats.dashboard_drops == 1
    assert not hub.has_subscribers

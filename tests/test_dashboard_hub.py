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
from z4j import keys
from z4j.brain.dashboard_hub import QUEUE_SIZE, RECHECK_SECONDS, DashboardHub, _Subscriber
from z4j.brain.http.auth import SESSION_COOKIE, Auth
from z4j.config import Config
from z4j.stats import BrainStats
from z4j.store import store_for
from z4j.testing.agents import admin_token, provision, raw_agent
from z4j.testing.brain import running_brain, wait_until
from z4j.testing.http import http_request


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
async def viewer(
    http: tuple[str, int],
    token: str | None,
    *,
    origin: str | None = None,
    session: str | None = None,
    csrf: str | None = None,
) -> AsyncIterator[Viewer]:
    """A dashboard socket signed in by a bearer ``token`` and/or a ``session``
    cookie (with its ``csrf`` token), sending ``origin`` as a browser would
    (Host is ``x``)."""
    stream = await trio.open_tcp_stream(*http)
    async with stream:
        v = Viewer(stream)
        headers = [(b"Authorization", f"Bearer {token}".encode())] if token else []
        if origin is not None:
            headers.append((b"Origin", origin.encode()))
        if session is not None:
            headers.append((b"Cookie", f"{SESSION_COOKIE}={session}".encode()))
        target = "/ws/dashboard" if csrf is None else f"/ws/dashboard?csrf={csrf}"
        await stream.send_all(v.ws.send(Request(host="x", target=target, extra_headers=headers)))
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

                async with raw_agent(http, agent_token, secret, worker_id="w-1", prove=True):
                    agent = await v.next_message("agent")
                    shown = await http_request(
                        http,
                        "GET",
                        f"/api/v1/agents/{agent_id}",
                        headers={"Authorization": f"Bearer {token}"},
                    )
                    assert agent == {
                        "type": "agent",
                        "agent_id": str(agent_id),
                        "project_id": shown.json()["project_id"],  # narrowed sockets need it
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
            async with viewer(brain.addresses.http, None, origin="http://x") as v:
                closed = await v.next_event()
                assert isinstance(closed, CloseConnection) and closed.code == 4401


async def _session(config: Config, token: str) -> tuple[str, str]:
    """A session opened with ``token``, and its CSRF token."""
    store = store_for(config)
    try:
        auth = Auth(store, keys.master_secret(config))
        opened = await auth.open_session(token)
    finally:
        await store.aclose()
    assert opened is not None
    session, _ = opened
    return session, auth.csrf_token(session)


async def test_a_cookie_socket_needs_its_csrf_token_and_an_origin(config: Config) -> None:
    """WebSockets have no CORS and browsers send the cookie with any handshake:
    a foreign page (which cannot read the CSRF token) must not read the feed,
    and a client without Origin (not a browser) must bring a bearer token."""
    token = await admin_token(config)
    session, csrf = await _session(config, token)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            for origin, given in [
                ("http://evil.example", None),
                ("http://evil.example", csrf[:-2] + "AA"),
                ("http://x", None),
                (None, csrf),  # the cookie with no Origin: not how browsers connect
            ]:
                async with viewer(http, None, origin=origin, session=session, csrf=given) as v:
                    closed = await v.next_event()
                    assert isinstance(closed, CloseConnection), (origin, closed)
                    assert closed.code == 4403, origin
            assert brain.stats.dashboard_subscribers == 0
            async with viewer(http, None, origin="http://x", session=session, csrf=csrf) as v:
                assert (await v.next_message("hello"))["type"] == "hello"
            async with viewer(http, token) as v:  # not a browser: no Origin, a bearer token
                assert (await v.next_message("hello"))["type"] == "hello"


async def test_a_socket_whose_origin_is_not_its_host_is_closed_4403() -> None:
    """Checked on the ASGI scope, where the Host header is."""

    async def opened(origin: str) -> list[dict[str, Any]]:
        hub = DashboardHub(BrainStats(), None, instance_id="i")
        sent: list[dict[str, Any]] = []
        incoming = [{"type": "websocket.connect"}, {"type": "websocket.disconnect"}]

        async def receive() -> dict[str, Any]:
            return incoming.pop(0) if incoming else {"type": "websocket.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        headers = [(b"host", b"brain.example:7700"), (b"origin", origin.encode())]
        with trio.fail_after(5):
            await hub({"type": "websocket", "headers": headers}, receive, send)
        return sent

    for foreign in ("http://evil.example", "http://brain.example", "null", "https://x:7700"):
        assert (await opened(foreign))[-1] == {"type": "websocket.close", "code": 4403}
    for same in ("http://brain.example:7700", "https://brain.example:7700"):
        assert [m["type"] for m in await opened(same)][:2] == ["websocket.accept", "websocket.send"]


async def test_a_foreign_origin_is_refused_on_the_real_socket(config: Config) -> None:
    """Over the brain's own WebSocket layer, where Host comes from the request line."""
    token = await admin_token(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            async with viewer(brain.addresses.http, token, origin="http://evil.example") as v:
                closed = await v.next_event()
                assert isinstance(closed, CloseConnection) and closed.code == 4403
            async with viewer(brain.addresses.http, token, origin="http://x") as v:
                assert (await v.next_message("hello"))["type"] == "hello"


async def test_revoking_a_token_closes_its_sockets_within_seconds(config: Config) -> None:
    token = await admin_token(config)
    other = await admin_token(config, name="other")
    session, csrf = await _session(config, token)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            async with (
                viewer(http, None, origin="http://x", session=session, csrf=csrf) as by_cookie,
                viewer(http, token) as by_bearer,
                viewer(http, other) as unrelated,
            ):
                for v in (by_cookie, by_bearer, unrelated):
                    await v.next_message("hello")
                store = store_for(config)
                try:
                    master = keys.master_secret(config)
                    assert await store.revoke_api_token(keys.api_token_hash(master, token))
                finally:
                    await store.aclose()
                # At the next recheck; the bound only allows for a busy machine.
                with trio.fail_after(10 * RECHECK_SECONDS + 10):
                    for v in (by_cookie, by_bearer):
                        while not isinstance(event := await v.next_event(), CloseConnection):
                            pass
                        assert event.code == 4401
                    await wait_until(lambda: brain.stats.dashboard_subscribers <= 1)  # gone
                await trio.sleep(RECHECK_SECONDS * 1.5)  # another recheck or so
                assert brain.stats.dashboard_subscribers == 1  # the other token's socket


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
            "projects": {},  # per project: none here
        }
    ]
    assert stats.dashboard_coalesced == 4
    for n in range(QUEUE_SIZE - 1):  # the coalesced events message holds one place
        hub.publish({"type": "command", "command": {"n": n}})
    assert not slow.dropped and len(slow.queue) == QUEUE_SIZE
    hub.publish({"type": "command", "command": {"n": "one too many"}})
    assert slow.dropped and stats.dashboard_drops == 1
    assert not hub.has_subscribers


async def test_an_opamp_agents_writes_reach_the_viewer(config: Config) -> None:
    """Its row written (a report that changes it), and its configuration's
    status moved: ids and what changed, the page reads the rest."""
    from test_opamp_http import UID, full_report, opamp_token, post, ready_brain

    from z4j.protocol.opamp import AgentCapability
    from z4j.protocol.opamp import opamp_pb2 as pb

    opamp = await opamp_token(config, "fleet")
    token = await admin_token(config)
    with trio.fail_after(30):
        async with ready_brain(config) as brain:
            http = brain.addresses.http
            async with viewer(http, token) as v:
                await v.next_message("hello")
                report = full_report()
                report.capabilities |= AgentCapability.ACCEPTS_REMOTE_CONFIG
                report.capabilities |= AgentCapability.REPORTS_REMOTE_CONFIG
                assert (await post(http, report.SerializeToString(), opamp)).status == 200
                message = await v.next_message("opamp_agent")
                assert message["instance_uid"] == UID.hex() and message["change"] == "state"
                project_id = message["project_id"]

                files = {"a.json": {"body": "{}", "content_type": "application/json"}}
                put = await http_request(
                    http,
                    "PUT",
                    f"/api/v1/opamp/agents/{UID.hex()}/config",
                    body=orjson.dumps({"files": files}),
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert put.status == 200, put
                applied = pb.AgentToServer(instance_uid=UID, sequence_num=1)
                applied.remote_config_status.last_remote_config_hash = bytes.fromhex(
                    put.json()["config_hash"]
                )
                applied.remote_config_status.status = pb.RemoteConfigStatus.STATUS_APPLIED
                assert (await post(http, applied.SerializeToString(), opamp)).status == 200
                changes = [await v.next_message("opamp_agent") for _ in range(2)]
                assert [(m["project_id"], m["instance_uid"], m["change"]) for m in changes] == [
                    (project_id, UID.hex(), "state"),
                    (project_id, UID.hex(), "config"),
                ]

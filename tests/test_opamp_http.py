"""``POST /v1/opamp`` on a running brain, on both stores.

The refusals (401 before anything else, 415, 413 for a large or inflating
body, BAD_REQUEST for garbage); the OpenTelemetry Python client's own agent
loop against the brain (listed with its description, online, offline at
once on ``stop()``, kept across a restart and converging after it); one
project's token against another's agent; and the writing rule: a message
that changes nothing writes nothing, except ``last_seen`` once per a third
of the heartbeat window.
"""

from __future__ import annotations

import atexit
import gzip
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from z4j import keys
from z4j.brain.http.opamp import OpampEndpoint
from z4j.brain.opamp_fleet import OpampFleet
from z4j.config import Config
from z4j.protocol.opamp import AgentCapability, ServerFlag, key_values
from z4j.protocol.opamp import opamp_pb2 as pb
from z4j.stats import BrainStats
from z4j.store import Store, store_for
from z4j.store.base import OpampAgent
from z4j.testing.agents import admin_token
from z4j.testing.brain import RunningBrain, make_config, running_brain, wait_until
from z4j.testing.http import HttpReply, http_request

pytest.importorskip("opentelemetry._opamp", reason="opentelemetry-opamp-client is not installed")
pytest.importorskip("requests")

from opentelemetry._opamp.agent import OpAMPAgent
from opentelemetry._opamp.callbacks import OpAMPCallbacks
from opentelemetry._opamp.client import OpAMPClient

PROTOBUF = {"Content-Type": "application/x-protobuf"}
IDENTIFYING = {"service.name": "checkout", "service.version": "1.2.0"}
NON_IDENTIFYING: dict[str, Any] = {"host.name": "web-1", "process.pid": 4242}
UID = uuid.UUID("0190b1c2-0000-7000-8000-000000000001").bytes


async def opamp_token(config: Config, project: str) -> str:
    """A project (made if missing) and a new OpAMP token for it, in the store directly."""
    store = store_for(config)
    try:
        await store.migrate()
        found = await store.find_project(project) or await store.create_project(project)
        token = keys.new_opamp_token()
        await store.add_opamp_token(
            found.id, keys.opamp_token_hash(keys.master_secret(config), token), "test"
        )
        return token
    finally:
        await store.aclose()


@asynccontextmanager
async def ready_brain(config: Config) -> AsyncIterator[RunningBrain]:
    """A running brain whose store is migrated (/v1/opamp answers 503 until then)."""
    async with running_brain(config) as brain:

        async def ready() -> bool:
            return (await http_request(brain.addresses.http, "GET", "/health/ready")).status == 200

        await wait_until(ready)
        yield brain


def full_report(uid: bytes = UID, seq: int = 0, **identifying: Any) -> pb.AgentToServer:
    message = pb.AgentToServer(
        instance_uid=uid,
        sequence_num=seq,
        capabilities=int(AgentCapability.REPORTS_STATUS | AgentCapability.REPORTS_HEALTH),
    )
    message.agent_description.identifying_attributes.extend(
        key_values(identifying or {"service.name": "raw"})
    )
    message.health.CopyFrom(
        pb.ComponentHealth(healthy=True, status="running", start_time_unix_nano=5)
    )
    message.health.component_health_map["exporter"].CopyFrom(
        pb.ComponentHealth(healthy=False, last_error="refused")
    )
    return message


async def post(
    address: tuple[str, int],
    body: bytes,
    token: str | None,
    headers: dict[str, str] | None = None,
) -> HttpReply:
    extra = dict(PROTOBUF if headers is None else headers)
    if token is not None:
        extra["Authorization"] = f"Bearer {token}"
    return await http_request(address, "POST", "/v1/opamp", body=body, headers=extra)


def reply_of(reply: HttpReply) -> pb.ServerToAgent:
    assert reply.status == 200, reply
    assert reply.headers["content-type"] == "application/x-protobuf"
    body = reply.body
    if reply.headers.get("content-encoding") == "gzip":
        body = gzip.decompress(body)
    return pb.ServerToAgent.FromString(body)


async def api(address: tuple[str, int], path: str, token: str) -> tuple[int, Any]:
    reply = await http_request(
        address, "GET", "/api/v1" + path, headers={"Authorization": f"Bearer {token}"}
    )
    return reply.status, reply.json()


# ---------------------------------------------------------------------------
# Refusals


async def test_refusals_come_before_any_opamp_processing(config: Config) -> None:
    config = make_config(config.data_dir, config.database_url, opamp_max_message_bytes=4096)
    token = await opamp_token(config, "a")
    body = full_report().SerializeToString()
    async with ready_brain(config) as brain:
        http = brain.addresses.http
        for bad in (None, "z4j_opamp_wrong", ""):
            reply = await post(http, body, bad)
            assert reply.status == 401 and reply.headers["www-authenticate"].startswith("Bearer")
        # A valid token of another kind is no OpAMP token.
        assert (await post(http, body, await admin_token(config))).status == 401
        for content_type in ("application/json", "application/x-protobufx", ""):
            reply = await post(http, body, token, {"Content-Type": content_type})
            assert reply.status == 415
        reply = await post(http, body, token, {"Content-Type": "application/X-Protobuf"})
        assert reply.status == 200  # media types are case-insensitive
        assert (await post(http, b"\x0a" * 5000, token)).status == 413
        bomb = gzip.compress(b"\x00" * 1_000_000)
        assert len(bomb) < 4096
        reply = await post(http, bomb, token, {**PROTOBUF, "Content-Encoding": "gzip"})
        assert reply.status == 413
        reply = await http_request(http, "GET", "/v1/opamp")
        assert reply.status == 405
        stats = brain.stats.opamp_rejected
        assert stats["unauthorized"] == 4 and stats["content_type"] == 3
        assert stats["too_large"] == 2
    # None of it reached the store.
    store = store_for(config)
    try:
        agents = await store.list_opamp_agents()
    finally:
        await store.aclose()
    assert [a.identifying for a in agents] == [{"service.name": "raw"}]


async def test_garbage_gets_bad_request_and_a_gzipped_report_is_read(config: Config) -> None:
    token = await opamp_token(config, "a")
    async with ready_brain(config) as brain:
        http = brain.addresses.http
        reply = reply_of(await post(http, b"\xff\xff\xff", token))
        assert reply.error_response.type == pb.ServerErrorResponse.TYPE_BAD_REQUEST
        assert not reply.capabilities
        short_uid = pb.AgentToServer(instance_uid=b"short").SerializeToString()
        reply = reply_of(await post(http, short_uid, token))
        assert reply.error_response.type == pb.ServerErrorResponse.TYPE_BAD_REQUEST
        assert reply.instance_uid == b"short"
        assert brain.stats.opamp_rejected["protobuf"] == 1
        assert brain.stats.opamp_rejected["instance_uid"] == 1

        # gzip both ways: the body as sent, the reply as the client allows.
        body = gzip.compress(full_report().SerializeToString())
        headers = {**PROTOBUF, "Content-Encoding": "gzip", "Accept-Encoding": "gzip"}
        raw = await post(http, body, token, headers)
        assert raw.headers["content-encoding"] == "gzip"
        reply = reply_of(raw)
        assert reply.instance_uid == UID and not reply.HasField("error_response")
        plain = await post(http, full_report(seq=1).SerializeToString(), token)
        assert "content-encoding" not in plain.headers
        refused = {**PROTOBUF, "Accept-Encoding": "gzip;q=0, identity"}
        assert "content-encoding" not in (await post(http, b"", token, refused)).headers

        admin = await admin_token(config)
        status, page = await api(http, "/opamp/agents", admin)
        assert status == 200
        [item] = page["items"]
        assert item["instance_uid"] == UID.hex() and item["project"] == "a"
        assert item["identifying"] == {"service.name": "raw"}
        assert item["capabilities"] == ["REPORTS_STATUS", "REPORTS_HEALTH"]
        assert item["health"]["healthy"] is True and item["health"]["status"] == "running"
        assert item["health"]["components"]["exporter"]["last_error"] == "refused"
        assert item["online"] is True and item["transport"] == "http"
        status, one = await api(http, f"/opamp/agents/{UID.hex()}", admin)
        assert status == 200 and one == item
        assert (await api(http, "/opamp/agents/zz", admin))[0] == 400
        assert (await api(http, f"/opamp/agents/{'0' * 32}", admin))[0] == 404
        assert (await http_request(http, "GET", "/api/v1/opamp/agents")).status == 401


async def test_a_token_never_reaches_another_projects_agent(config: Config) -> None:
    token_a = await opamp_token(config, "a")
    token_b = await opamp_token(config, "b")
    admin = await admin_token(config)
    async with ready_brain(config) as brain:
        http = brain.addresses.http
        reply_of(
            await post(http, full_report(**{"service.name": "b's"}).SerializeToString(), token_b)
        )
        # A's token sends B's agent's instance_uid: it speaks for an agent of A.
        claim = pb.AgentToServer(instance_uid=UID, agent_disconnect=pb.AgentDisconnect())
        reply_of(await post(http, claim.SerializeToString(), token_a))
        reply_of(
            await post(http, full_report(**{"service.name": "a's"}).SerializeToString(), token_a)
        )
        _, b = await api(http, f"/opamp/agents/{UID.hex()}?project=b", admin)
        assert b["identifying"] == {"service.name": "b's"} and b["online"] is True
        assert b["disconnected_at"] is None
        _, a = await api(http, f"/opamp/agents/{UID.hex()}?project=a", admin)
        assert a["identifying"] == {"service.name": "a's"}
        status, body = await api(http, f"/opamp/agents/{UID.hex()}", admin)
        assert status == 409 and body["error"] == "ambiguous"
        _, page = await api(http, "/opamp/agents?project=b", admin)
        assert [item["project"] for item in page["items"]] == ["b"]


# ---------------------------------------------------------------------------
# The writing rule, in memory with a clock of our own


class CountingStore:
    """A store that counts the OpAMP writes made through it."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.saved: list[OpampAgent] = []
        self.touched: list[tuple[int, float]] = []
        self.flushes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def write_opamp_states(self, writes: list[Any]) -> None:
        self.saved.extend(w.record for w in writes if w.record is not None)
        await self._store.write_opamp_states(writes)

    async def touch_opamp_agents(self, touches: list[tuple[uuid.UUID, bytes, int, float]]) -> None:
        self.touched.extend((seq, now) for _, _, seq, now in touches)
        self.flushes += 1
        await self._store.touch_opamp_agents(touches)


async def call(app: OpampEndpoint, message: pb.AgentToServer, token: str) -> pb.ServerToAgent:
    """One request through the ASGI app, no sockets."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/opamp",
        "headers": [
            (b"authorization", f"Bearer {token}".encode()),
            (b"content-type", b"application/x-protobuf"),
        ],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": message.SerializeToString(), "more_body": False}

    async def send(event: dict[str, Any]) -> None:
        sent.append(event)

    await app(scope, receive, send)
    assert sent[0]["status"] == 200, sent
    return pb.ServerToAgent.FromString(sent[1]["body"])


def endpoint(
    store: Any,
    config: Config,
    stats: BrainStats,
    now: list[float],
    on_change: Any = None,
) -> OpampEndpoint:
    fleet = OpampFleet(
        store,
        keys.master_secret(config),
        stats,
        max_message_bytes=1 << 20,
        heartbeat_window_seconds=90,
        on_change=on_change,
        clock=lambda: now[0],
    )
    return OpampEndpoint(fleet, stats)


async def test_a_message_that_changes_nothing_writes_nothing_but_last_seen_now_and_then(
    config: Config,
) -> None:
    token = await opamp_token(config, "a")
    store = CountingStore(store_for(config))
    now = [1000.0]
    stats = BrainStats()
    changes: list[tuple[uuid.UUID, str, str]] = []  # what the dashboard is told
    app = endpoint(store, config, stats, now, lambda *change: changes.append(change))
    fleet = app._fleet
    try:
        await store.migrate()
        assert not (await call(app, full_report(seq=0), token)).flags
        assert len(store.saved) == 1
        [(project_id, uid, what)] = changes
        assert (project_id, uid, what) == (store.saved[0].project_id, UID.hex(), "state")
        # Heartbeats in sequence: none is written at once. Each is queued
        # (the newest number wins) and the flush writes them in one
        # statement; meanwhile the skipped numbers keep the next in sequence.
        for seq in range(1, 6):
            now[0] += 5
            reply = await call(app, pb.AgentToServer(instance_uid=UID, sequence_num=seq), token)
            assert not reply.flags & ServerFlag.REPORT_FULL_STATE
        assert (len(store.saved), store.touched, store.flushes) == (1, [], 0)
        await fleet.flush()
        assert (len(store.saved), store.touched, store.flushes) == (1, [(5, 1025.0)], 1)
        [row] = await store.list_opamp_agents()
        assert (row.sequence_num, row.last_seen) == (5, 1025.0)
        # After a flush, this replica still answers in sequence.
        for seq in (6, 7):
            now[0] += 1
            reply = await call(app, pb.AgentToServer(instance_uid=UID, sequence_num=seq), token)
            assert not reply.flags & ServerFlag.REPORT_FULL_STATE
        await fleet.flush()
        assert (len(store.saved), store.touched, store.flushes) == (
            1,
            [(5, 1025.0), (7, 1027.0)],
            2,
        )
        now[0] += 1
        await call(app, pb.AgentToServer(instance_uid=UID, sequence_num=8), token)
        await fleet.flush()
        assert len(changes) == 1  # polls and last_seen are not news
        # A change is written at once, whatever the time.
        now[0] += 1
        changed = full_report(seq=9, **{"service.name": "renamed"})
        await call(app, changed, token)
        assert len(store.saved) == 2 and store.saved[-1].identifying == {"service.name": "renamed"}
        assert len(changes) == 2 and changes[-1][2] == "state"
        assert stats.opamp_writes == {
            "full": 2,
            "last_seen": 3,
            "last_seen_rows": 3,
            "coalesced": 5,  # messages whose number went into a touch still queued
        }
        assert stats.opamp_messages == {"status": 2, "heartbeat": 8}

        # Another replica (a fresh endpoint on the same store) has not heard
        # this agent: it asks for a full report once, whatever the number...
        other = endpoint(store, config, BrainStats(), now)
        now[0] += 1
        reply = await call(other, pb.AgentToServer(instance_uid=UID, sequence_num=10), token)
        assert reply.flags & ServerFlag.REPORT_FULL_STATE
        now[0] += 1
        reply = await call(other, full_report(seq=11, **{"service.name": "renamed"}), token)
        assert not reply.flags & ServerFlag.REPORT_FULL_STATE
        # ...then polls may alternate: each replica reads the other's flushed number.
        now[0] += 1
        reply = await call(app, pb.AgentToServer(instance_uid=UID, sequence_num=12), token)
        assert not reply.flags & ServerFlag.REPORT_FULL_STATE
        await app._fleet.flush()
        now[0] += 1
        reply = await call(other, pb.AgentToServer(instance_uid=UID, sequence_num=13), token)
        assert not reply.flags & ServerFlag.REPORT_FULL_STATE
        # A number the other replica has not flushed yet looks like a gap:
        # asked once, the answer settles it.
        now[0] += 1
        reply = await call(app, pb.AgentToServer(instance_uid=UID, sequence_num=14), token)
        assert reply.flags & ServerFlag.REPORT_FULL_STATE
        now[0] += 1
        reply = await call(app, full_report(seq=15, **{"service.name": "renamed"}), token)
        assert not reply.flags & ServerFlag.REPORT_FULL_STATE
        [row] = await store.list_opamp_agents()
        assert (row.sequence_num, row.full_state_requests) == (15, 0)
    finally:
        await store.aclose()


async def test_a_touch_never_overwrites_a_newer_row(config: Config) -> None:
    """A queued last_seen that reaches the store after a newer full write (this
    replica's or another's) leaves the newer row as it is."""
    token = await opamp_token(config, "a")
    store = store_for(config)
    now = [1000.0]
    a = endpoint(store, config, BrainStats(), now)
    b = endpoint(store, config, BrainStats(), now)
    try:
        await store.migrate()
        await call(a, full_report(seq=0), token)
        now[0] += 40
        await call(a, pb.AgentToServer(instance_uid=UID, sequence_num=1), token)  # queued on a
        now[0] += 1
        await call(b, full_report(seq=2, **{"service.name": "newer"}), token)  # written by b
        await a._fleet.flush()
        [row] = await store.list_opamp_agents()
        assert (row.sequence_num, row.last_seen, row.identifying) == (
            2,
            1041.0,
            {"service.name": "newer"},
        )
    finally:
        await store.aclose()


# ---------------------------------------------------------------------------
# The OpenTelemetry Python client's agent loop


class _Quiet(OpAMPCallbacks):
    """No remote configuration to apply: the loop only reports and polls."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_the_python_client_is_listed_online_offline_and_kept_across_a_restart(
    tmp_path: Path, database_url: str | None
) -> None:
    port = _free_port()
    config = make_config(tmp_path / "data", database_url, http_bind=f"127.0.0.1:{port}")
    token = await opamp_token(config, "fleet")
    admin = await admin_token(config)
    client = OpAMPClient(
        endpoint=f"http://127.0.0.1:{port}/v1/opamp",
        headers={"Authorization": f"Bearer {token}"},
        agent_identifying_attributes=IDENTIFYING,
        agent_non_identifying_attributes=NON_IDENTIFYING,
    )
    client.update_effective_config({"": {"exporter": "otlp"}}, "application/json")
    agent = OpAMPAgent(interval=0.1, callbacks=_Quiet(), client=client, initial_backoff=0.05)
    http = ("127.0.0.1", port)
    stopped = False

    async def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            await trio.to_thread.run_sync(lambda: agent.stop(timeout=5))

    async def listed() -> dict[str, Any] | None:
        status, page = await api(http, "/opamp/agents", admin)
        assert status == 200
        return page["items"][0] if page["items"] else None

    try:
        async with ready_brain(config) as brain:
            await trio.to_thread.run_sync(agent.start)
            await wait_until(listed)
            item = await listed()
            assert item is not None
            assert item["identifying"] == IDENTIFYING
            assert item["non_identifying"] == NON_IDENTIFYING
            assert item["online"] is True and item["project"] == "fleet"
            assert "REPORTS_EFFECTIVE_CONFIG" in item["capabilities"]
            [config_file] = item["effective_config"]["files"]
            assert config_file["name"] == "" and config_file["content_type"] == "application/json"
            await wait_until(lambda: brain.stats.opamp_messages["heartbeat"] >= 10)
            # Heartbeats in step change nothing: one full write for the first
            # report; the rest at most queue last_seen.
            assert brain.stats.opamp_writes["full"] == 1
        # The brain is gone; the agent keeps trying. A new brain on the same store:
        async with ready_brain(config) as brain:
            item = await listed()
            assert item is not None and item["identifying"] == IDENTIFYING  # kept
            before = brain.stats.opamp_messages["heartbeat"]
            await wait_until(lambda: brain.stats.opamp_messages["heartbeat"] >= before + 5)
            # A new process vouches for no agent it has not heard: the first
            # poll is asked for the full state, and the client answers it.
            assert brain.stats.opamp_messages["status"] >= 1
            store = store_for(config)
            try:
                [row] = await store.list_opamp_agents()
            finally:
                await store.aclose()
            assert row.full_state_requests == 0 and row.identifying == IDENTIFYING
            assert (await listed() or {})["online"] is True

            await stop()
            # The client's stop() queues agent_disconnect on its own thread;
            # once the brain has it, the agent is offline at once.
            await wait_until(lambda: brain.stats.opamp_messages["disconnect"] >= 1, timeout=30)
            item = await listed()
            assert item is not None and item["online"] is False
            assert item["disconnected_at"] is not None
    finally:
        await stop()
        atexit.unregister(agent.stop)


# The Python client in a process of its own, so that it can be killed.
_KILLABLE_AGENT = """
import os, threading
from opentelemetry._opamp.agent import OpAMPAgent
from opentelemetry._opamp.callbacks import OpAMPCallbacks
from opentelemetry._opamp.client import OpAMPClient

client = OpAMPClient(
    endpoint=os.environ["ENDPOINT"],
    headers={"Authorization": "Bearer " + os.environ["TOKEN"]},
    agent_identifying_attributes={"service.name": "killed"},
)
agent = OpAMPAgent(interval=0.2, callbacks=OpAMPCallbacks(), client=client)
agent.start()
print("started", flush=True)
threading.Event().wait()
"""


async def test_the_python_client_killed_goes_offline_after_the_window(
    tmp_path: Path, database_url: str | None
) -> None:
    """kill -9: no agent_disconnect ever comes; the silence window marks it
    offline (2 s here), and nothing marks it so before its polls stop."""
    config = make_config(tmp_path / "data", database_url, opamp_heartbeat_window_seconds=2.0)
    token = await opamp_token(config, "fleet")
    admin = await admin_token(config)
    async with ready_brain(config) as brain:
        http = brain.addresses.http

        async def item() -> dict[str, Any] | None:
            _, page = await api(http, "/opamp/agents", admin)
            return page["items"][0] if page["items"] else None

        env = {
            **os.environ,
            "ENDPOINT": f"http://{http[0]}:{http[1]}/v1/opamp",
            "TOKEN": token,
        }
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", _KILLABLE_AGENT], env=env, stdout=subprocess.DEVNULL
        )

        async def online() -> bool:
            return bool((await item() or {}).get("online"))

        async def offline() -> bool:
            return (await item() or {}).get("online") is False

        try:
            await wait_until(online, timeout=60)
        finally:
            process.kill()  # SIGKILL
            await process.wait()
        await wait_until(offline, timeout=60)
        gone = await item()
        assert gone is not None and gone["disconnected_at"] is None  # no goodbye was said
        assert brain.stats.opamp_messages["disconnect"] == 0

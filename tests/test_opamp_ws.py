"""OpAMP over WebSocket on ``/v1/opamp``, with our own client (z4j.testing.opamp).

What a connection adds to the HTTP transport's rules (z4j/brain/http/opamp_ws.py):
the token before the upgrade, the header byte, binary only, an empty
message, 1009, capabilities in the first reply only, a configuration pushed
unasked and only once per connection, and the newest connection of an
instance_uid winning. The replica faults are in tests/test_opamp_replicas.py.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
import trio

from z4j import keys
from z4j.brain.http.opamp_ws import OpampSockets
from z4j.brain.links import AlonePeers, OpampNudges, OpampSessionTable
from z4j.brain.opamp_fleet import OpampFleet
from z4j.config import Config
from z4j.protocol.close import CloseCode
from z4j.protocol.opamp import AgentCapability, ServerFlag, config_hash
from z4j.protocol.opamp import opamp_pb2 as pb
from z4j.protocol.opamp.attributes import key_values
from z4j.protocol.opamp.remote_config import ConfigFile
from z4j.stats import BrainStats
from z4j.store import store_for
from z4j.store.base import Store, StoreUnavailable
from z4j.testing import (
    OpampRejected,
    admin_token,
    http_request,
    make_config,
    opamp_socket,
    opamp_token,
    running_brain,
    wait_until,
)

UID = uuid.UUID("0190b1c2-0000-7000-8000-0000000000aa").bytes
ACCEPTS = AgentCapability.REPORTS_STATUS | AgentCapability.ACCEPTS_REMOTE_CONFIG
FILES = {"collector.yaml": {"body": "receivers: {}\n", "content_type": "text/yaml"}}


def hello(uid: bytes = UID, seq: int = 0, caps: AgentCapability = ACCEPTS) -> pb.AgentToServer:
    message = pb.AgentToServer(instance_uid=uid, sequence_num=seq, capabilities=int(caps))
    message.agent_description.identifying_attributes.extend(
        key_values({"service.name": "ws-agent"})
    )
    return message


def status(uid: bytes, seq: int, digest: bytes, state: int) -> pb.AgentToServer:
    message = pb.AgentToServer(instance_uid=uid, sequence_num=seq)
    message.remote_config_status.last_remote_config_hash = digest
    message.remote_config_status.status = state  # type: ignore[assignment]
    return message


def digest_of(files: dict[str, dict[str, str]]) -> bytes:
    return config_hash(
        {
            n: ConfigFile(body=f["body"].encode(), content_type=f["content_type"])
            for n, f in files.items()
        }
    )


async def api(
    address: tuple[str, int], method: str, path: str, token: str, body: Any = None
) -> tuple[int, Any]:
    reply = await http_request(
        address,
        method,
        "/api/v1" + path,
        body=b"" if body is None else orjson.dumps(body),
        headers={"Authorization": f"Bearer {token}"},
    )
    return reply.status, reply.json() if reply.body else None


async def ready(address: tuple[str, int]) -> None:
    async def is_ready() -> bool:
        return (await http_request(address, "GET", "/health/ready")).status == 200

    await wait_until(is_ready)


async def test_token_header_binary_empty_and_size(config: Config) -> None:
    config = make_config(config.data_dir, config.database_url, opamp_max_message_bytes=64 * 1024)
    token = await opamp_token(config, "ws")
    async with running_brain(config) as brain:
        http = brain.addresses.http
        await ready(http)
        # No token, or a wrong one: 401 on the upgrade itself.
        for bad in (None, "z4j_opamp_wrong"):
            with pytest.raises(OpampRejected) as rejected:
                async with opamp_socket(http, bad):
                    pass
            assert rejected.value.status_code == 401
        async with opamp_socket(http, token) as ws:
            # A header other than 0, an empty message, and header 0 with an
            # empty protobuf (no instance_uid): BAD_REQUEST, the socket stays.
            for raw in (b"\x01" + hello().SerializeToString(), b"", b"\x00"):
                await ws.send(raw)
                reply = await ws.receive()
                assert reply.error_response.type == pb.ServerErrorResponse.TYPE_BAD_REQUEST
                assert not reply.capabilities
            # A good message now: the first reply carries our capabilities...
            first = await ws.exchange(hello())
            assert first.instance_uid == UID and first.capabilities
            assert not first.HasField("error_response")
            # ...the next does not.
            second = await ws.exchange(pb.AgentToServer(instance_uid=UID, sequence_num=1))
            assert second.instance_uid == UID and not second.capabilities
            assert not second.flags & ServerFlag.REPORT_FULL_STATE
            # Another instance_uid on this connection: refused.
            other = await ws.exchange(hello(uuid.uuid4().bytes))
            assert other.error_response.type == pb.ServerErrorResponse.TYPE_BAD_REQUEST
        async with opamp_socket(http, token) as ws:
            await ws.send("text is not OpAMP")
            assert await ws.closed() == CloseCode.UNSUPPORTED_DATA
        async with opamp_socket(http, token) as ws:
            await ws.send(b"\x00" + b"\x0a" * (64 * 1024))
            assert await ws.closed() == CloseCode.TOO_LARGE
        text = (await http_request(http, "GET", "/metrics")).body.decode()
        for reason in ("unauthorized", "header", "instance_uid", "text", "too_large"):
            assert f'z4j_opamp_frames_rejected_total{{reason="{reason}"}}' in text, reason


async def test_a_configuration_is_pushed_once_and_never_before_the_agent_speaks(
    config: Config,
) -> None:
    token = await opamp_token(config, "ws")
    admin = await admin_token(config)
    async with running_brain(config) as brain:
        http = brain.addresses.http
        await ready(http)
        async with opamp_socket(http, token) as ws:
            # Connected but silent: the brain cannot know who this is, so a
            # configuration stored now is not sent; the first message the
            # agent gets is the reply to its own, which offers it.
            status_code, _ = await api(
                http, "PUT", f"/opamp/agents/{UID.hex()}/config?project=ws", admin, {"files": FILES}
            )
            assert status_code == 200
            reply = await ws.exchange(hello())
            assert reply.capabilities and reply.remote_config.config_hash == digest_of(FILES)
            # The next message does not offer it again (it went on this connection)...
            reply = await ws.exchange(
                status(UID, 1, digest_of(FILES), pb.RemoteConfigStatus.STATUS_APPLYING)
            )
            assert not reply.HasField("remote_config")
            # ...and a new configuration is pushed at once, unasked, once.
            changed = {
                "collector.yaml": {"body": "receivers: {otlp: {}}\n", "content_type": "text/yaml"}
            }
            await api(http, "PUT", f"/opamp/agents/{UID.hex()}/config", admin, {"files": changed})
            with trio.fail_after(30):
                pushed = await ws.receive()
            assert pushed.remote_config.config_hash == digest_of(changed)
            assert not pushed.capabilities
            reply = await ws.exchange(
                status(UID, 2, digest_of(changed), pb.RemoteConfigStatus.STATUS_APPLIED)
            )
            assert not reply.HasField("remote_config")
            _, shown = await api(http, "GET", f"/opamp/agents/{UID.hex()}/config", admin)
            assert (shown["status"], shown["config_hash"]) == ("applied", digest_of(changed).hex())
            # Pushing what it runs sends nothing: the next message is a reply.
            await api(http, "PUT", f"/opamp/agents/{UID.hex()}/config", admin, {"files": changed})
            reply = await ws.exchange(pb.AgentToServer(instance_uid=UID, sequence_num=3))
            assert not reply.HasField("remote_config") and not reply.flags
        text = (await http_request(http, "GET", "/metrics")).body.decode()
        assert "z4j_opamp_pushes_total 1.0" in text
        # The first change found no session here (the agent had not spoken
        # yet); on Postgres it was announced to other replicas.
        route = "no_session" if config.database_url is None else "forwarded"
        assert f'z4j_opamp_dispatch_total{{route="{route}"}} 1.0' in text
        assert 'z4j_opamp_dispatch_total{route="local"} 2.0' in text


async def test_an_agent_without_the_capability_is_never_pushed_to(config: Config) -> None:
    token = await opamp_token(config, "ws")
    admin = await admin_token(config)
    async with running_brain(config) as brain:
        http = brain.addresses.http
        await ready(http)
        async with opamp_socket(http, token) as ws:
            reply = await ws.exchange(hello(caps=AgentCapability.REPORTS_STATUS))
            assert reply.capabilities
            await api(
                http, "PUT", f"/opamp/agents/{UID.hex()}/config?project=ws", admin, {"files": FILES}
            )
            reply = await ws.exchange(pb.AgentToServer(instance_uid=UID, sequence_num=1))
            assert not reply.HasField("remote_config")


async def test_the_newest_connection_of_an_instance_uid_wins(config: Config) -> None:
    token = await opamp_token(config, "ws")
    admin = await admin_token(config)
    async with running_brain(config) as brain:
        http = brain.addresses.http
        await ready(http)
        async with opamp_socket(http, token) as old:
            await old.exchange(hello())
            async with opamp_socket(http, token) as new:
                reply = await new.exchange(hello())
                assert reply.capabilities  # its own first reply
                with trio.fail_after(30):  # a bound on a hang, not a speed check
                    assert await old.closed() == CloseCode.REPLACED
                # The push goes to the connection that won.
                await api(
                    http,
                    "PUT",
                    f"/opamp/agents/{UID.hex()}/config?project=ws",
                    admin,
                    {"files": FILES},
                )
                with trio.fail_after(30):
                    pushed = await new.receive()
                assert pushed.remote_config.config_hash == digest_of(FILES)


async def test_disconnect_marks_offline_at_once_and_a_session_keeps_last_seen(
    config: Config,
) -> None:
    config = make_config(config.data_dir, config.database_url, opamp_heartbeat_window_seconds=3)
    token = await opamp_token(config, "ws")
    admin = await admin_token(config)
    async with running_brain(config) as brain:
        http = brain.addresses.http
        await ready(http)
        async with opamp_socket(http, token) as ws:
            await ws.exchange(hello())
            _, shown = await api(http, "GET", f"/opamp/agents/{UID.hex()}", admin)
            assert shown["online"] and shown["transport"] == "websocket"
            first_seen = shown["last_seen"]

            # Silent but connected for two windows: the session keeps it online.
            async def kept_fresh() -> bool:
                _, row = await api(http, "GET", f"/opamp/agents/{UID.hex()}", admin)
                return bool(row["last_seen"] > first_seen and row["online"])

            await wait_until(kept_fresh, timeout=30)
            await ws.exchange(
                pb.AgentToServer(
                    instance_uid=UID, sequence_num=1, agent_disconnect=pb.AgentDisconnect()
                )
            )
            _, shown = await api(http, "GET", f"/opamp/agents/{UID.hex()}", admin)
            assert not shown["online"]
        with trio.fail_after(10):
            async with opamp_socket(http, token) as ws:
                await ws.exchange(hello(seq=2))
                _, shown = await api(http, "GET", f"/opamp/agents/{UID.hex()}", admin)
                assert shown["online"]


async def test_opamp_on_its_own_port_serves_opamp_and_nothing_else(config: Config) -> None:
    config = make_config(config.data_dir, config.database_url, opamp_bind="127.0.0.1:0")
    token = await opamp_token(config, "ws")
    admin = await admin_token(config)
    async with running_brain(config) as brain:
        await ready(brain.addresses.http)
        own = brain.addresses.opamp
        assert own is not None and own != brain.addresses.http
        async with opamp_socket(own, token) as ws:
            reply = await ws.exchange(hello())
            assert reply.instance_uid == UID and reply.capabilities
        polled = await http_request(
            own,
            "POST",
            "/v1/opamp",
            body=hello(seq=1).SerializeToString(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-protobuf"},
        )
        assert polled.status == 200
        assert pb.ServerToAgent.FromString(polled.body).instance_uid == UID
        # The API and the dashboard stay on the HTTP port.
        assert (await api(own, "GET", "/opamp/agents", admin))[0] == 404
        assert (await http_request(own, "GET", "/")).status == 404
        assert (await http_request(own, "GET", "/health/ready")).status == 200


async def test_a_revoked_tokens_sessions_are_closed(config: Config) -> None:
    config = make_config(config.data_dir, config.database_url, opamp_heartbeat_window_seconds=3)
    token = await opamp_token(config, "ws")
    async with running_brain(config) as brain:
        http = brain.addresses.http
        await ready(http)
        async with opamp_socket(http, token) as ws:
            await ws.exchange(hello())
            store = store_for(config)
            try:
                digest = keys.opamp_token_hash(keys.master_secret(config), token)
                assert await store.revoke_opamp_token(digest)
            finally:
                await store.aclose()
            with trio.fail_after(30):  # a bound on a hang: the check runs each second here
                assert await ws.closed() == CloseCode.REVOKED
        with pytest.raises(OpampRejected) as rejected:
            async with opamp_socket(http, token):
                pass
        assert rejected.value.status_code == 401


async def test_a_store_away_is_answered_unavailable_with_a_retry_hint(config: Config) -> None:
    """A message the store cannot serve now gets UNAVAILABLE with retry_info,
    and the connection stays open (the agent retries; nothing is lost)."""
    token = await opamp_token(config, "ws")
    store = store_for(config)
    await store.migrate()

    class Away:
        def __init__(self, inner: Store) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        async def load_opamp_agent(self, project_id: uuid.UUID, uid: bytes) -> Any:
            raise StoreUnavailable("the store is away (a test)")

    stats = BrainStats()
    fleet = OpampFleet(
        Away(store),  # type: ignore[arg-type]
        keys.master_secret(config),
        stats,
        max_message_bytes=1 << 20,
        heartbeat_window_seconds=90,
    )
    sockets = OpampSockets(
        fleet,
        stats,
        table=OpampSessionTable(),
        ownership=AlonePeers(),
        nudges=OpampNudges(),
        heartbeat_window_seconds=90,
    )
    incoming = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "bytes": b"\x00" + hello().SerializeToString()},
        {"type": "websocket.disconnect", "code": 1000},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "headers": [(b"authorization", f"Bearer {token}".encode())]}
    try:
        await sockets(scope, receive, send)
    finally:
        await store.aclose()
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send"]
    reply = pb.ServerToAgent.FromString(sent[1]["bytes"][1:])
    assert reply.instance_uid == UID
    assert reply.error_response.type == pb.ServerErrorResponse.TYPE_UNAVAILABLE
    assert reply.error_response.retry_info.retry_after_nanoseconds > 0

"""OpAMP across brain processes on one Postgres: polls alternating between
replicas, a configuration pushed through another replica, and the replica
holding an agent's WebSocket killed."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import trio

from z4j.protocol.opamp import AgentCapability, ServerFlag
from z4j.protocol.opamp import opamp_pb2 as pb
from z4j.protocol.opamp.attributes import key_values
from z4j.testing import (
    BrainProcess,
    HttpReply,
    admin_token,
    http_request,
    make_config,
    opamp_socket,
    opamp_token,
    wait_until,
)

pytestmark = pytest.mark.slow

SECRET = "opamp-replicas-share-this-master-secret-0123456789"


@contextmanager
def replicas(tmp_path: Path, url: str, names: str) -> Iterator[dict[str, BrainProcess]]:
    brains: dict[str, BrainProcess] = {}
    try:
        for name in names:
            env = {
                "Z4J_DATA_DIR": str(tmp_path / name),
                "Z4J_DATABASE_URL": url,
                "Z4J_SECRET": SECRET,
                "Z4J_INGEST_BIND": "127.0.0.1:0",
                "Z4J_HTTP_BIND": "127.0.0.1:0",
                "Z4J_INSTANCE_NAME": name,
                "Z4J_OWNERSHIP_TTL_SECONDS": "3",
                "Z4J_LEADER_LEASE_SECONDS": "3",
            }
            brains[name] = BrainProcess(env, log_path=tmp_path / f"{name}.log")
        yield brains
    finally:
        for brain in brains.values():
            brain.kill()


UID = uuid.UUID("0190b1c2-0000-7000-8000-0000000000bb").bytes
CAPS = (
    AgentCapability.REPORTS_STATUS
    | AgentCapability.REPORTS_HEALTH
    | AgentCapability.ACCEPTS_REMOTE_CONFIG
    | AgentCapability.REPORTS_REMOTE_CONFIG
)
FILES = {"otel.yaml": {"body": "exporters: {}\n", "content_type": "text/yaml"}}


def report(seq: int, name: str = "svc", healthy: bool = True) -> pb.AgentToServer:
    """A full report: description, health and (unset) config status."""
    message = pb.AgentToServer(instance_uid=UID, sequence_num=seq, capabilities=int(CAPS))
    message.agent_description.identifying_attributes.extend(key_values({"service.name": name}))
    message.health.CopyFrom(pb.ComponentHealth(healthy=healthy, status="ok" if healthy else "down"))
    message.remote_config_status.status = pb.RemoteConfigStatus.STATUS_UNSET
    return message


def heartbeat(seq: int) -> pb.AgentToServer:
    return pb.AgentToServer(instance_uid=UID, sequence_num=seq)


async def poll(brain: BrainProcess, token: str, message: pb.AgentToServer) -> pb.ServerToAgent:
    reply: HttpReply = await http_request(
        brain.http,
        "POST",
        "/v1/opamp",
        body=message.SerializeToString(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-protobuf"},
    )
    assert reply.status == 200, reply
    return pb.ServerToAgent.FromString(reply.body)


async def api(
    brain: BrainProcess, method: str, path: str, token: str, body: Any = None
) -> tuple[int, Any]:
    reply = await http_request(
        brain.http,
        method,
        "/api/v1" + path,
        body=b"" if body is None else orjson.dumps(body),
        headers={"Authorization": f"Bearer {token}"},
    )
    return reply.status, reply.json() if reply.body else None


def stored_sequence(url: str) -> int | None:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT sequence_num FROM opamp_agents WHERE instance_uid = %s", (UID,)
        ).fetchone()
    return None if row is None else int(row[0])


def owner(url: str) -> tuple[uuid.UUID, int] | None:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT instance_id, fencing_token FROM agent_sessions WHERE worker_id = %s",
            ("opamp:" + UID.hex(),),
        ).fetchone()
    return None if row is None else (row[0], int(row[1]))


async def test_polls_alternating_between_replicas_stay_consistent(
    tmp_path: Path, pg_url: str
) -> None:
    config = make_config(tmp_path / "cli", pg_url, secret=SECRET)
    token = await opamp_token(config, "fleet")
    admin = await admin_token(config)
    with replicas(tmp_path, pg_url, "AB") as brains, trio.fail_after(90):
        a, b = brains["A"], brains["B"]
        asked: dict[str, int] = {"A": 0, "B": 0}
        seq = 0
        for round_ in range(6):
            for name, brain in (("A", a), ("B", b)):
                # Health flips every other round: a change each time, written
                # by whichever replica the poll lands on.
                message = report(seq, healthy=round_ % 2 == 0) if name == "A" else heartbeat(seq)
                reply = await poll(brain, token, message)
                while reply.flags & ServerFlag.REPORT_FULL_STATE:
                    asked[name] += 1
                    seq += 1
                    reply = await poll(brain, token, report(seq, healthy=round_ % 2 == 0))
                # The next poll goes to the other replica once this one's
                # queued number is in the store (a load balancer's polls come
                # 30 s apart; a flush is 1 s).
                await wait_until(
                    lambda written=seq: stored_sequence(pg_url) in range(written, 1 << 62),  # type: ignore[misc]
                    timeout=30,
                )
                seq += 1
        # Each replica asked for the full state once at most: when it first
        # heard the agent (it vouches only for agents it has heard itself).
        assert asked["A"] <= 1 and asked["B"] <= 1, asked
        views = [
            (await api(brain, "GET", f"/opamp/agents/{UID.hex()}", admin))[1] for brain in (a, b)
        ]
        for view in views:
            assert view["identifying"] == {"service.name": "svc"}
            assert view["health"]["healthy"] is False  # round 5's report
            assert view["online"] is True
        assert views[0] == views[1]


async def test_a_push_through_another_replica_and_a_killed_socket_holder(
    tmp_path: Path, pg_url: str
) -> None:
    config = make_config(tmp_path / "cli", pg_url, secret=SECRET)
    token = await opamp_token(config, "fleet")
    admin = await admin_token(config)
    with replicas(tmp_path, pg_url, "AB") as brains, trio.fail_after(90):
        a, b = brains["A"], brains["B"]
        # The agent holds a WebSocket on A; a configuration PUT on B reaches
        # it at once through A (NOTIFY), unasked.
        async with opamp_socket(a.http, token) as ws:
            first = await ws.exchange(report(0))
            assert first.capabilities and not first.HasField("remote_config")
            await wait_until(lambda: owner(pg_url) is not None)
            held = owner(pg_url)
            assert held is not None
            status, _ = await api(
                b, "PUT", f"/opamp/agents/{UID.hex()}/config", admin, {"files": FILES}
            )
            assert status == 200
            pushed = await ws.receive()
            digest = pushed.remote_config.config_hash
            assert digest and set(pushed.remote_config.config.config_map) == {"otel.yaml"}
            applying = report(1)
            applying.remote_config_status.last_remote_config_hash = digest
            applying.remote_config_status.status = pb.RemoteConfigStatus.STATUS_APPLYING
            reply = await ws.exchange(applying)
            assert not reply.HasField("remote_config")
            # Now a second configuration, and A dies before it is pushed:
            # SIGKILL, no goodbye; its ownership row stays until it expires.
            a.kill()
        second = {"otel.yaml": {"body": "exporters: {otlp: {}}\n", "content_type": "text/yaml"}}
        status, stored = await api(
            b, "PUT", f"/opamp/agents/{UID.hex()}/config", admin, {"files": second}
        )
        assert status == 200 and stored["status"] == "pending"
        # The agent reconnects, to B: B takes the session over (a newer
        # fencing token) and the pending configuration goes once.
        async with opamp_socket(b.http, token) as ws:
            reply = await ws.exchange(report(2))
            assert reply.remote_config.config_hash.hex() == stored["config_hash"]
            taken = owner(pg_url)
            assert taken is not None and taken[1] > held[1] and taken[0] != held[0]
            applied = report(3)
            applied.remote_config_status.last_remote_config_hash = reply.remote_config.config_hash
            applied.remote_config_status.status = pb.RemoteConfigStatus.STATUS_APPLIED
            reply = await ws.exchange(applied)
            assert not reply.HasField("remote_config")
            # Heartbeats: each answer is the reply to it, never another push.
            for seq in range(4, 8):
                reply = await ws.exchange(heartbeat(seq))
                assert not reply.HasField("remote_config") and not reply.flags
            _, shown = await api(b, "GET", f"/opamp/agents/{UID.hex()}/config", admin)
            assert (shown["status"], shown["config_hash"]) == ("applied", stored["config_hash"])

"""Three brain processes on one Postgres: commands, results and the dashboard cross replicas.

And the faults: the replica holding an agent's socket is killed, Postgres
restarts, the leader is killed.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from z4j.protocol.agent import frames as f
from z4j.store.leases import renew as _renew
from z4j.testing.agents import RawAgent, admin_token, provision, raw_agent
from z4j.testing.brain import BrainProcess, make_config, wait_until
from z4j.testing.http import http_request
from z4j.testing.postgres import PostgresCluster

SECRET = "replicas-share-this-master-secret-0123456789"

pytestmark = pytest.mark.slow


def replica_env(tmp_path: Path, name: str, url: str, **extra: str) -> dict[str, str]:
    return {
        "Z4J_DATA_DIR": str(tmp_path / name),
        "Z4J_DATABASE_URL": url,
        "Z4J_SECRET": SECRET,
        "Z4J_INGEST_BIND": "127.0.0.1:0",
        "Z4J_HTTP_BIND": "127.0.0.1:0",
        "Z4J_HEARTBEAT_SECONDS": "0.5",
        "Z4J_INSTANCE_NAME": name,
        "Z4J_OWNERSHIP_TTL_SECONDS": "3",
        "Z4J_LEADER_LEASE_SECONDS": "3",
        **extra,
    }


@contextmanager
def replicas(tmp_path: Path, url: str, names: str = "ABC") -> Iterator[dict[str, BrainProcess]]:
    brains: dict[str, BrainProcess] = {}
    try:
        for name in names:
            brains[name] = BrainProcess(
                replica_env(tmp_path, name, url), log_path=tmp_path / f"{name}.log"
            )
        yield brains
    finally:
        for brain in brains.values():
            brain.kill()


async def api(
    brain: BrainProcess, method: str, path: str, token: str, body: Any = None
) -> tuple[int, Any]:
    payload = b"" if body is None else orjson.dumps(body)
    reply = await http_request(
        brain.http,
        method,
        f"/api/v1{path}",
        body=payload,
        headers={"Authorization": f"Bearer {token}"},
    )
    return reply.status, reply.json()


async def answer_commands(agent: RawAgent, seen: list[str]) -> None:
    """Act as a worker: acknowledge and complete every command that arrives."""
    while True:
        frame = await agent.receive()
        if isinstance(frame.payload, f.Command):
            seen.append(frame.id)
            token = frame.payload.delivery_claim_token
            await agent.send(f.CommandAck(delivery_claim_token=token), frame_id=frame.id)
            await agent.send(
                f.CommandResult(
                    status="success", result={"pong": True}, delivery_claim_token=token
                ),
                frame_id=frame.id,
            )


@asynccontextmanager
async def dashboard(brain: BrainProcess, token: str) -> AsyncIterator[list[dict[str, Any]]]:
    """Messages a dashboard viewer on ``brain`` receives, collected as they come."""
    messages: list[dict[str, Any]] = []
    stream = await trio.open_tcp_stream(*brain.http)
    ws = WSConnection(ConnectionType.CLIENT)
    auth = [(b"Authorization", f"Bearer {token}".encode())]
    await stream.send_all(ws.send(Request(host="x", target="/ws/dashboard", extra_headers=auth)))

    async def read() -> None:
        while data := await stream.receive_some(65536):
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, TextMessage):
                    messages.append(orjson.loads(event.data))
                else:
                    assert isinstance(event, AcceptConnection), event

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(read)
        yield messages
        nursery.cancel_scope.cancel()


async def test_commands_results_and_the_dashboard_cross_replicas(
    tmp_path: Path, pg_url: str
) -> None:
    config = make_config(tmp_path / "cli", pg_url, secret=SECRET)
    token = await admin_token(config)
    agent_token, project_secret, agent_id = await provision(config)
    with replicas(tmp_path, pg_url) as brains, trio.fail_after(60):
        a, b, c = brains["A"], brains["B"], brains["C"]
        async with (
            dashboard(b, token) as seen_on_b,
            raw_agent(a.http, agent_token, project_secret, prove=True) as agent,
        ):
            commands: list[str] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer_commands, agent, commands)

                def session_held() -> bool:  # A has recorded it holds the agent's session
                    with psycopg.connect(pg_url) as conn:
                        return (
                            conn.execute(
                                "SELECT 1 FROM agent_sessions WHERE agent_id = %s", (agent_id,)
                            ).fetchone()
                            is not None
                        )

                await wait_until(session_held, timeout=30)
                # Minted on C; the agent's socket is on A.
                status, command = await api(
                    c, "POST", "/commands", token, {"agent": str(agent_id), "action": "ping"}
                )
                assert status == 201
                await wait_until(lambda: commands == [command["id"]], timeout=30)
                _, metrics = await http_status(c, "/metrics")
                assert b'z4j_command_dispatch_total{route="forwarded"} 1.0' in metrics

                async def completed_on_b() -> bool:
                    _, now = await api(b, "GET", f"/commands/{command['id']}", token)
                    return bool(now["state"] == "completed")

                await wait_until(completed_on_b, timeout=30)
                _, final = await api(b, "GET", f"/commands/{command['id']}", token)
                assert final["result"] == {"pong": True}

                # Events sent to A reach a dashboard viewer on B.
                batch = f.EventBatch(
                    events=(
                        f.AgentEvent(
                            id="e-1", kind="job.done", raw={"id": "e-1", "kind": "job.done"}
                        ),
                    )
                )
                await agent.send(batch, frame_id="b-1")

                def events_seen() -> bool:
                    return any(
                        m["type"] == "events" and m["kinds"].get("job.done") for m in seen_on_b
                    )

                await wait_until(events_seen, timeout=30)
                # And the command's transitions made on A showed up on B too.
                states = [
                    m["command"]["state"]
                    for m in seen_on_b
                    if m["type"] == "command" and m["command"]["id"] == command["id"]
                ]
                assert "completed" in states
                nursery.cancel_scope.cancel()
        assert commands == [command["id"]], "delivered exactly once"


async def test_killing_the_socket_holder_moves_ownership_and_delivers_once(
    tmp_path: Path, pg_url: str
) -> None:
    config = make_config(tmp_path / "cli", pg_url, secret=SECRET)
    token = await admin_token(config)
    agent_token, project_secret, agent_id = await provision(config)

    def owner() -> tuple[uuid.UUID, int] | None:
        with psycopg.connect(pg_url) as conn:
            row = conn.execute(
                "SELECT instance_id, fencing_token FROM agent_sessions WHERE agent_id = %s",
                (agent_id,),
            ).fetchone()
        return None if row is None else (row[0], row[1])

    with replicas(tmp_path, pg_url, "AB") as brains, trio.fail_after(60):
        a, b = brains["A"], brains["B"]
        async with raw_agent(a.http, agent_token, project_secret, worker_id="w-1", prove=True):
            await wait_until(lambda: owner() is not None)
            first = owner()
            assert first is not None
            a.kill()  # SIGKILL: no goodbye, its ownership row stays until it expires
        # While no worker is connected, a command waits as pending.
        status, command = await api(
            b, "POST", "/commands", token, {"agent": str(agent_id), "action": "ping"}
        )
        assert status == 201 and command["state"] == "pending"
        # The agent reconnects, to B.
        commands: list[str] = []
        async with raw_agent(
            b.http, agent_token, project_secret, worker_id="w-1", prove=True
        ) as agent:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer_commands, agent, commands)
                await wait_until(lambda: commands == [command["id"]], timeout=30)
                second = owner()
                assert second is not None and second[1] > first[1], "a new fencing token"
                # The dead replica's claim, renewed under its old token, is refused.
                with psycopg.connect(pg_url) as conn:
                    kept = _renew(conn, first[0], [((agent_id, "w-1"), first[1])], 60.0)
                assert kept == set()
                assert owner() == second
                await trio.sleep(2)  # the sweep runs meanwhile: nothing is sent twice
                nursery.cancel_scope.cancel()
        assert commands == [command["id"]]


async def test_postgres_restart_listeners_recover_and_nothing_is_lost(
    tmp_path: Path, own_postgres: PostgresCluster
) -> None:
    url = own_postgres.url
    config = make_config(tmp_path / "cli", url, secret=SECRET)
    token = await admin_token(config)
    agent_token, project_secret, agent_id = await provision(config)
    with replicas(tmp_path, url, "AB") as brains, trio.fail_after(90):
        a, b = brains["A"], brains["B"]

        async def listening(brain: BrainProcess) -> bool:
            status, _ = await http_status(brain, "/health/ready")
            return status == 200

        await wait_until(lambda: listening(a), timeout=20)
        await wait_until(lambda: listening(b), timeout=20)
        commands: list[str] = []
        async with raw_agent(a.http, agent_token, project_secret, prove=True) as agent:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer_commands, agent, commands)
                await trio.to_thread.run_sync(own_postgres.stop, "immediate")
                await trio.to_thread.run_sync(own_postgres.start)

                # Minted on B as soon as the database answers again, perhaps
                # before either listener is back: the sweep delivers it.
                async def mint() -> bool:
                    status, body = await api(
                        b, "POST", "/commands", token, {"agent": str(agent_id), "action": "ping"}
                    )
                    if status == 201:
                        minted.append(body["id"])
                    return status == 201

                minted: list[str] = []
                await wait_until(mint, timeout=30, interval=0.2)
                await wait_until(lambda: commands == minted, timeout=30)
                # Both listeners are back (the readiness check includes them).
                await wait_until(lambda: listening(a), timeout=20)
                await wait_until(lambda: listening(b), timeout=20)
                nursery.cancel_scope.cancel()


async def test_a_killed_leader_is_replaced_within_the_lease(tmp_path: Path, pg_url: str) -> None:
    def holder() -> uuid.UUID | None:
        with psycopg.connect(pg_url) as conn:
            row = conn.execute(
                "SELECT holder FROM leader_lease WHERE expires_at > now()"
            ).fetchone()
        return None if row is None else row[0]

    def instance_of(brain: BrainProcess) -> uuid.UUID | None:
        with psycopg.connect(pg_url) as conn:
            row = conn.execute(
                "SELECT id FROM instances WHERE pid = %s", (brain.proc.pid,)
            ).fetchone()
        return None if row is None else uuid.UUID(str(row[0]))

    with replicas(tmp_path, pg_url) as brains, trio.fail_after(60):
        await wait_until(lambda: holder() is not None, timeout=20)
        # A leader may hold the lease before every heartbeat has written its row.
        await wait_until(lambda: all(instance_of(b) for b in brains.values()), timeout=20)
        ids = {name: instance_of(brain) for name, brain in brains.items()}
        leader = next(name for name, i in ids.items() if i == holder())
        brains[leader].proc.send_signal(signal.SIGKILL)
        killed_at = trio.current_time()
        await wait_until(lambda: holder() not in (None, ids[leader]), timeout=30)
        # lease + one renewal period + slack for a busy machine (the queries and wakeups lag)
        assert trio.current_time() - killed_at <= 3 + 1 + 6
        # The dead leader's instance row is marked stopped by the new leader.
        with psycopg.connect(pg_url) as conn:

            def marked() -> bool:
                row = conn.execute(
                    "SELECT stopped_at FROM instances WHERE id = %s", (ids[leader],)
                ).fetchone()
                return row is not None and row[0] is not None

            await wait_until(marked, timeout=30)


async def http_status(brain: BrainProcess, path: str) -> tuple[int, bytes]:
    reply = await http_request(brain.http, "GET", path)
    return reply.status, reply.body

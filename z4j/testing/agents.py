"""Agents for tests and benchmarks: provisioning, and a raw protocol client.

`raw_agent` speaks the AGENT role of the sans-IO core over trio-websocket
with no policy of its own (no spool, no retries), so a test can misbehave
exactly as it needs to.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio
import trio_websocket

from .. import keys
from ..config import Config
from ..protocol.agent import frames as f
from ..protocol.agent.connection import AgentProtocol, Role
from ..protocol.agent.signing import decode_secret
from ..store import store_for

__all__ = ["RawAgent", "admin_token", "provision", "raw_agent"]


async def provision(
    config: Config, *, project: str = "demo", agent: str = "bare"
) -> tuple[str, str, uuid.UUID]:
    """Create a project and an agent; return (token, project secret, agent id)."""
    master = keys.master_secret(config)
    store = store_for(config)
    try:
        await store.migrate()
        created_project = await store.create_project(project)
        token = keys.new_agent_token()
        created = await store.create_agent(
            created_project.id, agent, keys.token_hash(master, token)
        )
    finally:
        await store.aclose()
    return token, keys.project_secret_text(master, created_project.id), created.id


async def admin_token(config: Config, name: str = "test") -> str:
    """A new admin token for the API and the dashboard, made in the store directly."""
    from ..brain.http.auth import Auth

    store = store_for(config)
    try:
        await store.migrate()
        return await Auth(store, keys.master_secret(config)).new_token(name)
    finally:
        await store.aclose()


@attrs.define
class RawAgent:
    ws: trio_websocket.WebSocketConnection
    protocol: AgentProtocol

    async def send(self, payload: f.Payload, frame_id: str | None = None) -> None:
        await self.ws.send_message(self.protocol.send(payload, frame_id=frame_id))

    async def receive(self) -> f.Frame:
        return self.protocol.receive_message(await self.ws.get_message())

    async def closed_with(self) -> int | None:
        """Read until the brain closes; its close code."""
        return (await self.closed_because())[0]

    async def closed_because(self) -> tuple[int | None, str | None]:
        """Read until the brain closes; its close code and reason text."""
        try:
            while True:
                await self.ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            if exc.reason is None:
                return None, None
            return exc.reason.code, exc.reason.reason


@asynccontextmanager
async def raw_agent(
    http: tuple[str, int],
    token: str,
    secret: str,
    *,
    worker_id: str = "w-1",
    hello: bool = True,
    protocol_version: str = "2",
    prove: bool = False,
    capabilities: dict[str, list[str]] | None = None,
    schedulers: tuple[str, ...] = (),
    runtime_features: tuple[str, ...] = (),
) -> AsyncIterator[RawAgent]:
    """A connected agent (after hello_ack, if ``hello``). With ``prove`` it then
    sends a heartbeat, as z4j agents do at once: the brain gives a connection
    its worker's slot and commands only after a signed frame proves the key.
    ``capabilities``: what its hello advertises, per engine or scheduler;
    ``schedulers`` and ``runtime_features``: its hello's fields of those names."""
    host, port = http
    # We own the stream: trio-websocket 0.12 leaves a client's socket open
    # when the server closes first.
    stream = await trio.open_tcp_stream(host, port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                stream,
                f"{host}:{port}",
                "/ws/agent",
                extra_headers=[(b"Authorization", f"Bearer {token}".encode())],
            )
            agent = RawAgent(ws, AgentProtocol(Role.AGENT, key=decode_secret(secret)))
            if hello:
                await ws.send_message(
                    agent.protocol.hello_message(
                        f.Hello(
                            protocol_version="2",
                            worker_id=worker_id,
                            framework="test",
                            capabilities=dict(capabilities or {}),
                            schedulers=schedulers,
                            runtime_features=runtime_features,
                        )
                    )
                )
                if protocol_version == "2":
                    ack = await agent.receive()
                    assert isinstance(ack.payload, f.HelloAck)
                    if prove:
                        await agent.send(f.Heartbeat())
            try:
                yield agent
            finally:
                with trio.move_on_after(2):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)

"""/ws/agent over real sockets: every close code the brain sends, and restarts.

A raw client (`z4j.testing.agents.raw_agent`) drives the AGENT role of our
sans-IO core over trio-websocket, so each test can misbehave exactly as it
needs to.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from z4j.buffer import BufferFile
from z4j.config import Config
from z4j.protocol.agent import frames as f
from z4j.protocol.agent.connection import AgentProtocol
from z4j.protocol.close import CloseCode
from z4j.store import store_for
from z4j.testing.agents import provision, raw_agent
from z4j.testing.brain import buffer_rows, make_config, read_events, running_brain, wait_until


def events(n: int, prefix: str = "e") -> f.EventBatch:
    return f.EventBatch(
        events=tuple(
            f.AgentEvent(
                id=f"{prefix}-{i}", kind="k", raw={"id": f"{prefix}-{i}", "kind": "k", "n": i}
            )
            for i in range(n)
        )
    )


async def test_replacement_closes_the_older_connection_with_4002(config: Config) -> None:
    token, secret, _ = await provision(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            async with raw_agent(
                brain.addresses.http, token, secret, worker_id="same", prove=True
            ) as old:
                # The new connection takes the slot with its first signed frame.
                async with raw_agent(
                    brain.addresses.http, token, secret, worker_id="same", prove=True
                ) as new:
                    assert await old.closed_with() == CloseCode.REPLACED
                    await new.send(events(1), frame_id="b-1")
                    ack = await new.receive()
                    assert ack.payload == f.EventBatchAck(
                        acked_id="b-1", received=1, accepted=1, rejected=0
                    )
                    assert brain.stats.agent_sessions_open == 1


async def test_worker_cap_closes_with_4429(tmp_path: Path, database_url: str | None) -> None:
    config = make_config(tmp_path / "data", database_url, ws_per_agent_concurrency_cap=2)
    token, secret, _ = await provision(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            async with raw_agent(brain.addresses.http, token, secret, worker_id="a"):
                async with raw_agent(brain.addresses.http, token, secret, worker_id="b"):
                    async with raw_agent(
                        brain.addresses.http, token, secret, worker_id="c", protocol_version="none"
                    ) as third:
                        assert await third.closed_with() == CloseCode.RATE_LIMITED
            assert brain.stats.agent_rejected["worker_cap"] == 1


async def test_idle_connection_closes_with_4408(tmp_path: Path, database_url: str | None) -> None:
    config = make_config(tmp_path / "data", database_url, ws_heartbeat_interval_seconds=1)
    token, secret, _ = await provision(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            async with raw_agent(brain.addresses.http, token, secret) as agent:
                started = trio.current_time()
                assert await agent.closed_with() == CloseCode.IDLE
                assert 2.5 <= trio.current_time() - started < 10


@pytest.mark.parametrize("limit", ["frames", "events"])
async def test_rate_limits_close_with_an_error_and_4429(
    tmp_path: Path, database_url: str | None, limit: str
) -> None:
    config = make_config(
        tmp_path / "data",
        database_url,
        ws_rate_limit_frames_per_second=5 if limit == "frames" else 1000,
        ws_rate_limit_events_per_second=10 if limit == "events" else 1000,
    )
    token, secret, _ = await provision(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            async with raw_agent(brain.addresses.http, token, secret) as agent:
                # Within the budget: acknowledged.
                await agent.send(events(4), frame_id="ok")
                assert (await agent.receive()).payload == f.EventBatchAck(
                    acked_id="ok", received=4, accepted=4, rejected=0
                )
                if limit == "frames":
                    for _ in range(10):
                        await agent.send(f.Heartbeat(buffer_size=0))
                else:
                    await agent.send(events(7), frame_id="too-many")
                error = await agent.receive()
                assert isinstance(error.payload, f.Error)
                assert error.payload.code == "rate_limited" and error.payload.fatal
                assert await agent.closed_with() == CloseCode.RATE_LIMITED
            assert brain.stats.agent_rejected["rate_limit"] == 1


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("tampered", 4403),
        ("oversize", 1009),
        ("not json", 1007),
        ("wrong direction", 1002),
    ],
)
async def test_protocol_violations_close_with_their_code(
    config: Config, message: str, code: int
) -> None:
    token, secret, _ = await provision(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            async with raw_agent(brain.addresses.http, token, secret) as agent:
                if message == "tampered":
                    frame = json.loads(agent.protocol.send(events(1)))
                    frame["payload"]["events"][0]["n"] = 99
                    await agent.ws.send_message(json.dumps(frame).encode())
                elif message == "oversize":
                    # The brain closes as soon as the frame header gives the
                    # length: the agent may still be sending it then.
                    with contextlib.suppress(trio_websocket.ConnectionClosed):
                        await agent.ws.send_message(b"x" * (config.ws_max_frame_bytes + 1))
                elif message == "not json":
                    await agent.ws.send_message(b"{not json")
                else:
                    frame = json.loads(agent.protocol.send(events(1)))
                    frame["type"] = "command"
                    await agent.ws.send_message(json.dumps(frame).encode())
                assert await agent.closed_with() == code


async def test_wrong_protocol_version_closes_with_4426(config: Config) -> None:
    token, secret, _ = await provision(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            async with raw_agent(brain.addresses.http, token, secret, hello=False) as agent:
                hello = {
                    "v": 2,
                    "id": "h",
                    "ts": None,
                    "type": "hello",
                    "payload": {"protocol_version": "1"},
                }
                await agent.ws.send_message(json.dumps(hello).encode())
                assert await agent.closed_with() == 4426


async def test_revocation_closes_live_sockets_with_4003(config: Config) -> None:
    token, secret, agent_id = await provision(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            async with raw_agent(brain.addresses.http, token, secret) as agent:
                store = store_for(config)
                try:
                    assert await store.revoke_agent(agent_id)
                finally:
                    await store.aclose()
                assert await agent.closed_with() == CloseCode.REVOKED
            # And the token no longer opens a session.
            async with raw_agent(brain.addresses.http, token, secret, hello=False) as again:
                assert await again.closed_with() == 4401


async def test_brain_restart_mid_stream_loses_nothing_and_duplicates_nothing(
    config: Config,
) -> None:
    """Batches acked before a hard stop stay; unacked ones re-sent after it land once."""
    token, secret, _ = await provision(config)
    acked: set[str] = set()
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            async with raw_agent(brain.addresses.http, token, secret) as agent:
                for b in range(10):
                    await agent.send(events(5, prefix=f"b{b}"), frame_id=f"b{b}")
                for _ in range(10):
                    frame = await agent.receive()
                    assert isinstance(frame.payload, f.EventBatchAck)
                    acked.add(frame.payload.acked_id)
                # Two more sent, then the brain is cancelled before it answers.
                await agent.send(events(5, prefix="b10"), frame_id="b10")
                await agent.send(events(5, prefix="b11"), frame_id="b11")
                brain.cancel_scope.cancel()
        # A new brain on the same data; the agent re-sends everything not acked,
        # and (to be sure of dedupe) one batch that was acked.
        async with running_brain(config) as brain:
            async with raw_agent(brain.addresses.http, token, secret) as agent:
                for b in (10, 11, 3):
                    await agent.send(events(5, prefix=f"b{b}"), frame_id=f"b{b}")
                    frame = await agent.receive()
                    assert isinstance(frame.payload, f.EventBatchAck)
            await wait_until(lambda: buffer_rows(config) == 0)
            await wait_until(lambda: len(read_events(config)) >= 60)
    ids = [e["body"]["id"] for e in read_events(config)]
    assert sorted(ids) == sorted(f"b{b}-{i}" for b in range(12) for i in range(5))
    assert acked == {f"b{b}" for b in range(10)}


async def test_graceful_shutdown_closes_agents_with_1001(config: Config) -> None:
    token, secret, _ = await provision(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            async with raw_agent(brain.addresses.http, token, secret) as agent:
                await agent.send(events(2), frame_id="before")
                assert isinstance((await agent.receive()).payload, f.EventBatchAck)
                brain.shutdown.set()
                assert await agent.closed_with() == 1001


async def test_events_no_store_can_keep_are_rejected_in_the_ack(config: Config) -> None:
    token, secret, _ = await provision(config)
    bad = [
        f.AgentEvent(id="big", kind="k", raw={"id": "big", "kind": "k", "n": 2**64}),
        f.AgentEvent(id="nul", kind="k", raw={"id": "nul", "kind": "k", "msg": "a\x00b"}),
        f.AgentEvent(id="ok", kind="k", raw={"id": "ok", "kind": "k", "msg": "a\\u0000b"}),
    ]
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            async with raw_agent(brain.addresses.http, token, secret) as agent:
                await agent.send(f.EventBatch(events=tuple(bad)), frame_id="b-1")
                ack = (await agent.receive()).payload
                assert ack == f.EventBatchAck(acked_id="b-1", received=3, accepted=1, rejected=2)
            await wait_until(lambda: buffer_rows(config) == 0)
            assert brain.stats.agent_rejected["bad_event"] == 2
    assert [e["body"]["id"] for e in read_events(config)] == ["ok"]


async def test_a_failure_to_build_acks_closes_1011_and_the_batch_comes_again(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our bug, not the agent's: rather than leave batches unacknowledged on an
    open connection, the brain closes 1011; re-sent, the batch lands once."""
    token, secret, _ = await provision(config)
    real_send = AgentProtocol.send
    broken = {"on": True}

    def send(self: AgentProtocol, payload: f.Payload, *, frame_id: str | None = None) -> bytes:
        if broken["on"] and isinstance(payload, f.EventBatchAck):
            raise RuntimeError("ack encoder broke")
        return real_send(self, payload, frame_id=frame_id)

    monkeypatch.setattr(AgentProtocol, "send", send)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            async with raw_agent(brain.addresses.http, token, secret) as agent:
                await agent.send(events(3, "once"), frame_id="b1")
                assert await agent.closed_with() == 1011
            assert brain.stats.agent_rejected["internal_error"] == 1
            broken["on"] = False
            async with raw_agent(brain.addresses.http, token, secret) as agent:
                await agent.send(events(3, "once"), frame_id="b1")
                ack = await agent.receive()
                assert isinstance(ack.payload, f.EventBatchAck) and ack.payload.accepted == 3
            await wait_until(lambda: buffer_rows(config) == 0)
    assert sorted(e["body"]["id"] for e in read_events(config)) == ["once-0", "once-1", "once-2"]  # type: ignore[index]


async def test_a_protocol_error_behind_a_batch_in_flight_closes_with_its_own_code(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch waits for its commit while a later frame breaks the protocol:
    the session closes with the protocol's code (no ack can follow its close,
    and that is no internal error); re-sent, the batch lands once."""
    token, secret, _ = await provision(config)
    gate = threading.Event()
    real_append = BufferFile.append

    def held_append(self: BufferFile, rows: Any) -> None:
        gate.wait(60)  # on the writer thread: the commit waits for the test
        real_append(self, rows)

    monkeypatch.setattr(BufferFile, "append", held_append)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            async with raw_agent(brain.addresses.http, token, secret) as agent:
                await agent.send(events(2, "held"), frame_id="b1")
                await wait_until(lambda: brain.stats.agent_frames["event_batch"] >= 1)
                await agent.ws.send_message(b"{not json")
                # The bad frame is read (and refused) while b1 still waits.
                await wait_until(lambda: sum(brain.stats.agent_rejected.values()) >= 1)
                gate.set()
                assert await agent.closed_with() == 1007
            assert brain.stats.agent_rejected["internal_error"] == 0
            async with raw_agent(brain.addresses.http, token, secret) as agent:
                await agent.send(events(2, "held"), frame_id="b1")
                ack = await agent.receive()
                assert isinstance(ack.payload, f.EventBatchAck) and ack.payload.accepted == 2
            await wait_until(lambda: buffer_rows(config) == 0)
    assert sorted(e["body"]["id"] for e in read_events(config)) == ["held-0", "held-1"]  # type: ignore[index]

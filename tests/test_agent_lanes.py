"""Agents stay in their lane, over real sockets with real signing.

- An ack or result counts only from the worker its command was delivered to
  (its delivery_claim_token); anyone else's is refused with a non-fatal
  ``error`` frame, and the holder's own answer still lands.
- The hello is unsigned: a connection holding only the bearer token can
  neither displace a live worker nor receive its commands. It gets the
  worker's slot with its first signed frame that verifies.
- Agent-supplied text reaches the log on one line, escaped and bounded.
"""

from __future__ import annotations

import logging
import uuid

import pytest
import trio

from z4j.brain.agents import COMMAND_REFUSED
from z4j.config import Config
from z4j.protocol.agent import frames as f
from z4j.protocol.agent.connection import AgentProtocol, Role
from z4j.protocol.agent.signing import encode_secret
from z4j.protocol.close import CloseCode
from z4j.testing.agents import RawAgent, provision, raw_agent
from z4j.testing.brain import running_brain, wait_until

WRONG_SECRET = encode_secret(b"\x07" * 32)  # what an attacker with only the token has


async def next_command(agent: RawAgent) -> f.Frame:
    while True:
        frame = await agent.receive()
        if isinstance(frame.payload, f.Command):
            return frame


async def nothing_within(agent: RawAgent, seconds: float) -> bool:
    """No frame from the brain for ``seconds`` (the connection still open)."""
    with trio.move_on_after(seconds):
        await agent.ws.get_message()
        return False
    return True


async def test_a_result_from_another_agent_or_worker_is_refused(config: Config) -> None:
    token, secret, agent_id = await provision(config)
    other_token, other_secret, _ = await provision(config, project="other", agent="mallory")
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            commands = brain.addresses.commands
            async with (
                raw_agent(brain.addresses.http, token, secret, prove=True) as holder,
                raw_agent(brain.addresses.http, token, secret, worker_id="w-2", prove=True) as peer,
                raw_agent(brain.addresses.http, other_token, other_secret, prove=True) as outsider,
            ):
                await wait_until(lambda: len(brain.addresses.commands.sessions.sessions) == 3)
                record = await commands.send(
                    agent_id, "ping", target={"worker_id": "w-1"}, parameters={"secret": 1}
                )
                command = await next_command(holder)
                claim = command.payload.delivery_claim_token  # type: ignore[union-attr]
                # Both know the id (and here even the token): neither may end it.
                for agent in (outsider, peer):
                    await agent.send(f.CommandAck(delivery_claim_token=claim), frame_id=command.id)
                    answer = f.CommandResult(
                        status="failed", error="forged", delivery_claim_token=claim
                    )
                    await agent.send(answer, frame_id=command.id)
                    for _ in range(2):
                        error = await agent.receive()
                        assert isinstance(error.payload, f.Error)
                        assert error.payload.code == COMMAND_REFUSED and not error.payload.fatal
                now = await commands.wait(record.id, within=0)
                assert now is not None and (now.state, now.error) == ("pending", None)
                assert brain.stats.agent_rejected["foreign_command"] == 4
                # The holder's answer still lands; its connection saw no error.
                await holder.send(f.CommandAck(delivery_claim_token=claim), frame_id=command.id)
                answer = f.CommandResult(
                    status="success", result={"ok": 1}, delivery_claim_token=claim
                )
                await holder.send(answer, frame_id=command.id)
                done = await commands.wait(record.id, within=10)
                assert done is not None and (done.state, done.result) == ("completed", {"ok": 1})
                assert done.worker_id == "w-1"
                assert await nothing_within(holder, 0.2)


async def test_a_hello_with_only_the_token_displaces_nothing_and_gets_no_command(
    config: Config,
) -> None:
    token, secret, agent_id = await provision(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            commands = brain.addresses.commands
            async with raw_agent(brain.addresses.http, token, secret, prove=True) as live:
                await wait_until(lambda: len(brain.addresses.commands.sessions.sessions) == 1)
                # The same worker id, the right bearer token, no signing key.
                async with raw_agent(brain.addresses.http, token, WRONG_SECRET) as intruder:
                    assert await nothing_within(live, 0.5), "the live worker was not displaced"
                    record = await commands.send(agent_id, "ping", parameters={"password": "x"})
                    command = await next_command(live)
                    assert command.id == str(record.id)
                    assert await nothing_within(intruder, 0.5)
                    # Its first signed frame fails verification: 4403, the live one stays.
                    await intruder.send(f.Heartbeat())
                    assert await intruder.closed_with() == 4403
                assert await nothing_within(live, 0.3)
                assert brain.stats.agent_sessions_open == 1
                # A connection that does prove the key takes the slot over (4002).
                async with raw_agent(brain.addresses.http, token, secret) as successor:
                    assert await nothing_within(live, 0.3)
                    await successor.send(f.Heartbeat())
                    assert await live.closed_with() == CloseCode.REPLACED


async def test_queued_commands_wait_for_a_proven_connection(config: Config) -> None:
    token, secret, agent_id = await provision(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            commands = brain.addresses.commands
            record = await commands.send(agent_id, "ping", parameters={"password": "x"})
            async with raw_agent(brain.addresses.http, token, secret) as agent:
                # Past the one-second sweep too: nothing before a signed frame.
                assert await nothing_within(agent, 1.5)
                await agent.send(f.Heartbeat())
                command = await next_command(agent)
                assert command.id == str(record.id)


def test_a_signed_frame_proves_the_key_the_hello_does_not() -> None:
    """The sans-IO core says when the peer has shown the key."""
    key = b"k" * 32
    brain = AgentProtocol(Role.BRAIN)
    agent = AgentProtocol(Role.AGENT, key=key)
    brain.receive_message(agent.hello_message(f.Hello(protocol_version="2", worker_id="w")))
    assert not brain.peer_proven
    ack = brain.accept(
        key=key,
        agent_id=str(uuid.uuid4()),
        project_id=str(uuid.uuid4()),
        brain_version="t",
        heartbeat_interval_seconds=10,
        max_frame_size_bytes=1 << 20,
    )
    agent.receive_message(ack)
    assert not brain.peer_proven
    brain.receive_message(agent.send(f.Heartbeat()))
    assert brain.peer_proven


@pytest.mark.parametrize("where", ["error frame", "refused result"])
async def test_agent_text_reaches_the_log_on_one_line(
    config: Config, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    token, secret, agent_id = await provision(config)
    other_token, other_secret, _ = await provision(config, project="other", agent="mallory")
    forged = (
        "boom\n2030-01-01 00:00:00 CRITICAL z4j.brain.http.auth admin token leaked\x1b[2J"
        + "x" * 5000
    )
    caplog.set_level(logging.DEBUG, logger="z4j")
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            if where == "error frame":
                async with raw_agent(brain.addresses.http, token, secret, prove=True) as agent:
                    await agent.send(f.Error(code="x\ny", message=forged[:8192], fatal=False))
                    await wait_until(lambda: brain.stats.agent_frames["error"] == 1)
                    await wait_until(lambda: "reports" in caplog.text)
            else:
                record = await brain.addresses.commands.send(agent_id, "ping")
                async with raw_agent(
                    brain.addresses.http,
                    other_token,
                    other_secret,
                    worker_id=forged[:120],
                    prove=True,
                ) as agent:
                    await agent.send(
                        f.CommandResult(status="failed", error=forged[:8192]),
                        frame_id=str(record.id),
                    )
                    await wait_until(lambda: brain.stats.agent_rejected["foreign_command"] == 1)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("z4j")]
    mentions = [line for line in lines if "boom" in line]
    assert mentions, lines
    for line in mentions:
        assert "\n" not in line and "\x1b" not in line and len(line) < 1000

"""The Trio agent (`z4j.agent`) against a small fake brain, over loopback.

The fake brain is trio-websocket's `serve_websocket` plus the sans-IO core in
the brain role: it checks the bearer token, accepts the hello, acks event
batches (or not, on demand), sends commands and drops connections when told.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_websocket
from z4j_core.transport import frames as zf
from z4j_core.transport.framing import FrameVerifier

from z4j.agent import Agent, Backoff, SpoolFull
from z4j.protocol.agent import frames as f
from z4j.protocol.agent.connection import AgentProtocol, Role
from z4j.protocol.agent.signing import derive_project_secret, encode_secret
from z4j.protocol.errors import RemoteProtocolError

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "tok_test_123"
PROJECT_ID = "11111111-2222-3333-4444-555555555555"
AGENT_ID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
KEY = derive_project_secret(b"0123456789abcdef0123456789abcdef", uuid.UUID(PROJECT_ID))
SECRET = encode_secret(KEY)


@attrs.define
class BrainSession:
    ws: trio_websocket.WebSocketConnection
    proto: AgentProtocol
    hello: f.Hello
    lock: trio.Lock = attrs.field(factory=trio.Lock)
    close_code: int | None = None
    heartbeats: int = 0

    async def send(self, payload: f.Payload, frame_id: str | None = None) -> None:
        async with self.lock:
            await self.ws.send_message(self.proto.send(payload, frame_id=frame_id))


class FakeBrain:
    def __init__(self, *, heartbeat: int = 10) -> None:
        self.token = TOKEN
        self.heartbeat = heartbeat
        self.url = ""
        self.reject_http: int | None = None  # answer the upgrade with this status
        self.close_before_ack: int | None = None  # close with this code after hello
        self.silent = False  # never answer the hello
        self.max_frame: int | None = None  # advertised in hello_ack
        self.ack_batches = True
        self.drop_after: Callable[[int], float | None] = lambda n: None
        # Close session n (1012) when its k-th heartbeat arrives: k = drop_at_heartbeat(n).
        self.drop_at_heartbeat: Callable[[int], int | None] = lambda n: None
        self.refused_tokens: list[str] = []
        self.sessions: list[BrainSession] = []
        self.batches: list[tuple[int, str, tuple[str, ...]]] = []  # (session, frame id, event ids)
        self.stored: dict[str, dict[str, Any]] = {}  # event id -> event, from acked batches
        self.acked_event_ids: list[str] = []
        self.command_acks: list[tuple[str, str | None]] = []
        self.results: list[tuple[str, f.CommandResult]] = []
        self.heartbeats: list[f.Heartbeat] = []
        self.errors: list[str] = []  # what the brain (or z4j-core) refused: always empty
        self.silent_closes: list[str] = []

    async def start(self, nursery: trio.Nursery) -> None:
        server = await nursery.start(
            trio_websocket.serve_websocket, self.handle, "127.0.0.1", 0, None
        )
        self.url = f"http://127.0.0.1:{server.port}"

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        if request.path != "/ws/agent":
            await request.reject(404)
            return
        headers = {k.lower(): v for k, v in request.headers}
        auth = headers.get(b"authorization", b"").decode()
        if self.reject_http is not None:
            await request.reject(self.reject_http)
            return
        ws = await request.accept()
        if auth != f"Bearer {self.token}":
            self.refused_tokens.append(auth)
            await ws.aclose(4401, "unknown token")
            return
        proto = AgentProtocol(Role.BRAIN)
        message = await ws.get_message()
        assert isinstance(message, bytes)  # like z4j-bare: binary messages of UTF-8 JSON
        assert isinstance(zf.parse_frame(message), zf.HelloFrame)  # the reference model agrees
        hello = proto.receive_message(message).payload
        assert isinstance(hello, f.Hello)
        if self.close_before_ack is not None:
            await ws.aclose(self.close_before_ack)
            return
        if self.silent:
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                await ws.get_message()
            self.silent_closes.append(repr(ws.closed))
            return
        await ws.send_message(
            proto.accept(
                key=KEY,
                agent_id=AGENT_ID,
                project_id=PROJECT_ID,
                brain_version="1.13.0",
                heartbeat_interval_seconds=self.heartbeat,
                max_frame_size_bytes=self.max_frame,
            )
        )
        session = BrainSession(ws=ws, proto=proto, hello=hello)
        assert proto.binding is not None
        reference = FrameVerifier(  # z4j-core's own checks, as a second opinion
            secret=KEY,
            agent_id=AGENT_ID,
            project_id=PROJECT_ID,
            session_id=proto.binding.session_id,
            direction="agent->brain",
        )
        number = len(self.sessions)
        self.sessions.append(session)
        async with trio.open_nursery() as nursery:
            drop = self.drop_after(number)
            if drop is not None:
                nursery.start_soon(self._drop_later, session, drop)
            try:
                while True:
                    message = await ws.get_message()
                    frame = proto.receive_message(message)
                    try:
                        reference.parse_and_verify(message)
                    except Exception as exc:
                        self.errors.append(f"z4j-core refused {frame.type}: {exc!r}")
                    await self._on_frame(number, session, frame)
            except trio_websocket.ConnectionClosed:
                session.close_code = ws.closed.code if ws.closed else None
            except RemoteProtocolError as exc:
                self.errors.append(str(exc))
                await ws.aclose(exc.close_code or 1002)
            nursery.cancel_scope.cancel()

    async def _drop_later(self, session: BrainSession, delay: float) -> None:
        await trio.sleep(delay)
        await session.ws.aclose(1012)

    async def _on_frame(self, number: int, session: BrainSession, frame: f.Frame) -> None:
        payload = frame.payload
        if isinstance(payload, f.EventBatch):
            ids = tuple(e.id for e in payload.events)
            self.batches.append((number, frame.id, ids))
            if self.ack_batches:
                for event in payload.events:
                    self.stored.setdefault(event.id, event.raw)
                self.acked_event_ids.extend(ids)
                ack = f.EventBatchAck(
                    acked_id=frame.id, received=len(ids), accepted=len(ids), rejected=0
                )
                await session.send(ack)
        elif isinstance(payload, f.CommandAck):
            self.command_acks.append((frame.id, payload.delivery_claim_token))
        elif isinstance(payload, f.CommandResult):
            self.results.append((frame.id, payload))
        elif isinstance(payload, f.Heartbeat):
            self.heartbeats.append(payload)
            session.heartbeats += 1
            if session.heartbeats == self.drop_at_heartbeat(number):
                await session.ws.aclose(1012)

    async def command(
        self,
        action: str,
        parameters: dict[str, Any] | None = None,
        *,
        command_id: str | None = None,
        token: str = "claim-1",
    ) -> str:
        command_id = command_id or str(uuid.uuid4())
        command = f.Command(
            action=action,
            target={"worker": "any"},
            parameters=parameters or {},
            delivery_claim_token=token,
        )
        await self.sessions[-1].send(command, command_id)
        return command_id

    def results_for(self, command_id: str) -> list[f.CommandResult]:
        return [r for cid, r in self.results if cid == command_id]

    async def drop(self, code: int = 1012) -> None:
        await self.sessions[-1].ws.aclose(code)


def make_agent(brain: FakeBrain, **kwargs: Any) -> Agent:
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("secret", SECRET)
    kwargs.setdefault("close_timeout", 30.0)  # bounds a close that hangs, nothing more
    kwargs.setdefault("random", lambda: 0.0)  # reconnect at once unless a test says otherwise
    return Agent(brain.url, **kwargs)


async def until(predicate: Callable[[], bool]) -> None:
    """Poll: the conditions span the agent, the brain and the network."""
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(0.005)


@asynccontextmanager
async def brain_running(**kwargs: Any) -> AsyncIterator[tuple[FakeBrain, trio.Nursery]]:
    brain = FakeBrain(**kwargs)
    async with trio.open_nursery() as nursery:
        await brain.start(nursery)
        yield brain, nursery
        assert brain.errors == []
        nursery.cancel_scope.cancel()


class RecordingSleep:
    """The backoff's sleep: records each delay and returns at once; stops the agent after n."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.delays: list[float] = []
        self.agent: Agent | None = None

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if len(self.delays) >= self.n and self.agent is not None:
            self.agent.stop()
        await trio.lowlevel.checkpoint()


# -- events -----------------------------------------------------------------------------


async def test_events_are_delivered_acked_and_leave_the_spool() -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, nursery):
            agent = make_agent(brain, batch_max_events=100, worker_role="web")
            mine: dict[str, Any] = {"kind": "task.succeeded", "id": "my-id", "data": {"n": [1, 2]}}
            emitted = [agent.emit(mine)]
            mine["data"]["n"].append(3)  # the agent keeps a copy
            emitted += [agent.emit({"kind": "log", "i": i}) for i in range(249)]
            ack = await nursery.start(agent.run)
            assert isinstance(ack, f.HelloAck) and ack.agent_id == AGENT_ID
            await until(lambda: agent.statistics().spooled_events == 0)

            assert sorted(brain.acked_event_ids) == sorted(emitted)
            assert [len(ids) for _, _, ids in brain.batches] == [100, 100, 50]
            assert brain.stored["my-id"]["data"] == {"n": [1, 2]}
            assert all(e["occurred_at"] and e["kind"] for e in brain.stored.values())
            uuid.UUID(emitted[1])  # generated ids are uuid4 strings
            hello = brain.sessions[0].hello
            assert (hello.protocol_version, hello.framework) == ("2", "trio")
            assert (hello.worker_id, hello.worker_role) == (agent.worker_id, "web")
            stats = agent.statistics()
            assert (stats.connected, stats.acked_events, stats.unacked_batches) == (True, 250, 0)
            await until(lambda: len(brain.heartbeats) >= 1)  # the first right after hello_ack
            await agent.aclose()


async def test_an_unacked_batch_is_resent_after_reconnect_with_the_same_ids() -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, nursery):
            agent = make_agent(brain, batch_max_events=2)
            brain.ack_batches = False
            await nursery.start(agent.run)
            emitted = [agent.emit({"kind": "k", "i": i}) for i in range(5)]
            await until(lambda: len(brain.batches) == 3)
            assert agent.statistics().spooled_events == 5

            brain.ack_batches = True
            await brain.drop()
            await until(lambda: agent.statistics().spooled_events == 0)
            emitted += [agent.emit({"kind": "k", "i": 5})]
            await until(lambda: agent.statistics().spooled_events == 0)

            first = [(fid, ids) for n, fid, ids in brain.batches if n == 0]
            second = [(fid, ids) for n, fid, ids in brain.batches if n == 1]
            assert second[:3] == first  # same frame ids, same event ids, same order
            assert len(second) == 4
            assert sorted(brain.acked_event_ids) == sorted(emitted)  # nothing lost, nothing twice
            assert Counter(brain.acked_event_ids).most_common(1)[0][1] == 1
            assert brain.sessions[1].hello.worker_id == brain.sessions[0].hello.worker_id
            await agent.aclose()


async def test_a_batch_not_acked_in_time_is_resent_in_the_same_session() -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, nursery):
            agent = make_agent(brain, ack_timeout=0.2)
            brain.ack_batches = False
            await nursery.start(agent.run)
            event_id = agent.emit({"kind": "k"})
            await until(lambda: len(brain.batches) >= 2)  # sent again, unacked
            brain.ack_batches = True
            await until(lambda: agent.statistics().spooled_events == 0)
            # However often it went (a slow ack may be overtaken by one more
            # re-send): one session, the same frame id, the same event.
            assert {(n, fid, ids) for n, fid, ids in brain.batches} == {
                (0, brain.batches[0][1], (event_id,))
            }
            assert set(brain.acked_event_ids) == {event_id}
            await agent.aclose()


async def test_a_full_spool_refuses_events_until_it_drains() -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, nursery):
            agent = make_agent(brain, max_spool=3)
            for i in range(3):
                agent.emit({"kind": "k", "i": i})
            with pytest.raises(SpoolFull):
                agent.emit({"kind": "k", "i": 3})
            assert agent.statistics().refused_events == 1
            await nursery.start(agent.run)
            await until(lambda: agent.statistics().spooled_events == 0)
            agent.emit({"kind": "k", "i": 4})
            await until(lambda: len(brain.acked_event_ids) == 4)
            await until(lambda: bool(brain.heartbeats))
            assert brain.heartbeats[0].dropped_events == 1
            await agent.aclose()


def test_emit_checks_the_event() -> None:
    agent = Agent("http://127.0.0.1:9", token=TOKEN, secret=SECRET)
    with pytest.raises(ValueError, match="kind"):
        agent.emit({"message": "no kind"})
    with pytest.raises(ValueError, match="not JSON"):
        agent.emit({"kind": "k", "x": float("nan")})
    with pytest.raises(ValueError, match="over the"):
        agent.emit({"kind": "k", "blob": "x" * 600_000})
    with pytest.raises(TypeError):
        agent.emit([("kind", "k")])  # type: ignore[arg-type]
    assert agent.statistics().spooled_events == 0


def test_constructor_checks() -> None:
    assert Agent("https://b.example/base/", token="t", secret=SECRET).ws_url == (
        "wss://b.example/base/ws/agent"
    )
    assert Agent("http://localhost:8000", token="t", secret=SECRET).ws_url == (
        "ws://localhost:8000/ws/agent"
    )
    with pytest.raises(ValueError, match="clear text"):
        Agent("http://brain.example", token="t", secret=SECRET)
    assert Agent("http://b.example", token="t", secret=SECRET, allow_insecure=True).ws_url
    with pytest.raises(ValueError):
        Agent("http://localhost", token="t", secret="not+base64")
    with pytest.raises(ValueError):
        Agent("ftp://localhost", token="t", secret=SECRET)
    with pytest.raises(ValueError):
        Agent("http://localhost", token="", secret=SECRET)


# -- commands -----------------------------------------------------------------------------


async def test_command_round_trips() -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, nursery):
            agent = make_agent(brain)

            @agent.command("echo")
            async def echo(target: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
                return {"target": target, "parameters": parameters}

            async def boom(target: dict[str, Any], parameters: dict[str, Any]) -> None:
                raise RuntimeError("boom " + "x" * 10_000)

            agent.on_command("boom", boom)
            with pytest.raises(ValueError):
                agent.on_command("boom", boom)
            await nursery.start(agent.run)
            assert brain.sessions[0].hello.capabilities == {"trio": ["boom", "echo"]}

            ok = await brain.command("echo", {"x": [1, "é"]}, token="c-ok")
            failed = await brain.command("boom")
            unknown = await brain.command("nope")
            await until(lambda: len(brain.results) == 3)

            (result,) = brain.results_for(ok)
            assert result == f.CommandResult(
                status="success",
                result={"target": {"worker": "any"}, "parameters": {"x": [1, "é"]}},
                delivery_claim_token="c-ok",
            )
            (result,) = brain.results_for(failed)
            assert result.status == "failed" and result.error is not None
            assert result.error.startswith("RuntimeError: boom xxx")
            assert len(result.error) == f.MAX_ERROR_LENGTH
            (result,) = brain.results_for(unknown)
            assert (result.status, result.error) == ("failed", "unknown action 'nope'")
            assert (ok, "c-ok") in brain.command_acks
            # the ack comes before the result, each with the command id as frame id
            assert {cid for cid, _ in brain.command_acks} == {ok, failed, unknown}
            await agent.aclose()


async def test_a_repeated_command_id_runs_once() -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, nursery):
            agent = make_agent(brain)
            calls = 0
            release = trio.Event()

            @agent.command("slow")
            async def slow(target: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
                nonlocal calls
                calls += 1
                await release.wait()
                return {"calls": calls}

            await nursery.start(agent.run)
            cid = await brain.command("slow", token="t1")
            await until(lambda: agent.statistics().running_commands == 1)
            await brain.command("slow", command_id=cid, token="t2")  # while running: ack only
            await until(lambda: len(brain.command_acks) == 2)
            assert brain.command_acks == [(cid, "t1"), (cid, "t2")]
            release.set()
            await until(lambda: len(brain.results) == 1)
            assert brain.results_for(cid)[0].delivery_claim_token == "t2"

            await brain.command("slow", command_id=cid, token="t3")  # finished: re-send result
            await until(lambda: len(brain.results) == 2)
            first, again = brain.results_for(cid)
            assert again == attrs.evolve(first, delivery_claim_token="t3")
            assert first.result == {"calls": 1}
            assert calls == 1
            await agent.aclose()


async def test_a_result_outlives_the_connection_it_was_asked_on() -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, nursery):
            agent = make_agent(brain)
            release = trio.Event()

            @agent.command("slow")
            async def slow(target: dict[str, Any], parameters: dict[str, Any]) -> None:
                await release.wait()

            await nursery.start(agent.run)
            cid = await brain.command("slow")
            await until(lambda: agent.statistics().running_commands == 1)
            await brain.drop()
            await until(lambda: len(brain.sessions) == 2 and agent.connected)
            release.set()
            await until(lambda: len(brain.results) == 1)
            assert brain.results[0] == (
                cid,
                f.CommandResult(status="success", delivery_claim_token="claim-1"),
            )
            await agent.aclose()


# -- reconnects -------------------------------------------------------------------------


async def test_backoff_grows_and_is_capped() -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, _):
            brain.close_before_ack = 1011
            sleep = RecordingSleep(9)
            agent = make_agent(brain, random=lambda: 1.0, sleep=sleep)
            sleep.agent = agent
            await agent.run()  # returns once the sleep has stopped it
            assert sleep.delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
            assert agent.statistics().last_disconnect == "transient: brain closed 1011"


async def test_backoff_uses_full_jitter() -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, _):
            brain.reject_http = 503
            sleep = RecordingSleep(4)
            agent = make_agent(
                brain,
                random=iter([0.5, 0.1, 0.9, 0.0]).__next__,
                sleep=sleep,
                backoff=Backoff(base=1, cap=4),
            )
            sleep.agent = agent
            await agent.run()
            assert sleep.delays == [0.5, 0.2, 3.6, 0.0]


async def test_backoff_resets_after_a_session_that_lasted_a_heartbeat() -> None:
    with trio.fail_after(60):
        async with brain_running(heartbeat=2) as (brain, _):
            # Sessions 0-2 end at once; session 3 when its second heartbeat
            # arrives, which the agent sends a heartbeat interval after the
            # hello_ack: it lasted a heartbeat however slow the machine is.
            brain.drop_after = lambda n: 0.0 if n < 3 else None
            brain.drop_at_heartbeat = lambda n: 2 if n == 3 else None
            sleep = RecordingSleep(4)
            agent = make_agent(brain, random=lambda: 1.0, sleep=sleep)
            sleep.agent = agent
            await agent.run()
            assert sleep.delays == [0.5, 1.0, 2.0, 0.5]


@pytest.mark.parametrize("how", ["close 4401", "HTTP 401"])
async def test_a_wrong_token_backs_off_as_an_auth_failure(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, _):
            if how == "HTTP 401":
                brain.reject_http = 401
            sleep = RecordingSleep(3)
            agent = make_agent(brain, token="wrong", random=lambda: 1.0, sleep=sleep)
            sleep.agent = agent
            with caplog.at_level(logging.ERROR, logger="z4j.agent"):
                await agent.run()
            assert sleep.delays == [10.0, 20.0, 40.0]
            assert agent.statistics().sessions_opened == 0
            assert agent.statistics().last_disconnect.startswith("auth:")  # type: ignore[union-attr]
            if how == "close 4401":
                assert brain.refused_tokens == ["Bearer wrong"] * 3
            assert any("credentials" in r.getMessage() for r in caplog.records)


async def test_a_wrong_protocol_version_backs_off_as_incompatible() -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, _):
            brain.close_before_ack = 4426
            sleep = RecordingSleep(2)
            agent = make_agent(brain, random=lambda: 1.0, sleep=sleep)
            sleep.agent = agent
            await agent.run()
            assert sleep.delays == [120.0, 240.0]


async def test_a_forged_frame_from_the_brain_closes_the_session_and_reconnects() -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, nursery):
            agent = make_agent(brain)
            await nursery.start(agent.run)
            session = brain.sessions[0]
            frame = json.loads(session.proto.send(f.Command(action="x"), frame_id="c-1"))
            frame["payload"]["action"] = "y"  # the hmac no longer matches
            await session.ws.send_message(json.dumps(frame))
            await until(lambda: len(brain.sessions) == 2 and agent.connected)
            assert session.close_code == 4403
            assert brain.results == []
            await agent.aclose()


async def test_an_unreachable_brain_is_a_transient_failure() -> None:
    with trio.fail_after(60):
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))  # bound, not listening: refused
        port = listener.getsockname()[1]
        sleep = RecordingSleep(2)
        agent = Agent(
            f"http://127.0.0.1:{port}", token=TOKEN, secret=SECRET, random=lambda: 1.0, sleep=sleep
        )
        sleep.agent = agent
        with listener:
            await agent.run()
        assert sleep.delays == [0.5, 1.0]
        assert (agent.statistics().last_disconnect or "").startswith("transient: cannot connect")


async def test_no_hello_ack_in_time_closes_and_retries() -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, _):
            brain.silent = True
            sleep = RecordingSleep(1)
            agent = make_agent(brain, hello_timeout=0.1, sleep=sleep)
            sleep.agent = agent
            await agent.run()
            assert agent.statistics().last_disconnect == "transient: no hello_ack within 0.1s"
            await until(lambda: bool(brain.silent_closes))
            assert "code=1000" in brain.silent_closes[0]


async def test_a_fatal_error_frame_ends_the_session() -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, nursery):
            agent = make_agent(brain)
            await nursery.start(agent.run)
            await brain.sessions[0].send(f.Error(code="slow_down", message="m", fatal=False))
            await brain.sessions[0].send(f.Error(code="boom", message="bye", fatal=True))
            await until(lambda: len(brain.sessions) == 2 and agent.connected)
            assert brain.sessions[0].close_code == 1000
            assert agent.statistics().last_disconnect == (
                "transient: fatal error from the brain: boom: bye"
            )
            await agent.aclose()


async def test_batches_fit_the_brains_frame_limit() -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, nursery):
            brain.max_frame = 4096
            agent = make_agent(brain)
            await nursery.start(agent.run)
            small = [agent.emit({"kind": "k", "pad": "x" * 500}) for _ in range(10)]
            agent.emit({"kind": "k", "pad": "x" * 5000})  # can never fit: dropped
            await until(lambda: agent.statistics().spooled_events == 0)
            assert sorted(brain.acked_event_ids) == sorted(small)
            assert max(len(ids) for _, _, ids in brain.batches) < 10
            assert agent.statistics().dropped_events == 1
            await agent.aclose()


# -- shutdown -------------------------------------------------------------------------------


async def test_aclose_flushes_then_closes_with_1000() -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, nursery):
            agent = make_agent(brain, shutdown_grace=30)  # bounds a flush that hangs
            await nursery.start(agent.run)
            ids = [agent.emit({"kind": "k", "i": i}) for i in range(10)]
            await agent.aclose()
            assert sorted(brain.acked_event_ids) == sorted(ids)
            await until(lambda: brain.sessions[0].close_code is not None)
            assert brain.sessions[0].close_code == 1000
            assert not agent.connected


async def test_cancelling_run_leaves_nothing_behind_and_closes_with_1000() -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, _):
            agent = make_agent(brain)
            release = trio.Event()

            @agent.command("hang")
            async def hang(target: dict[str, Any], parameters: dict[str, Any]) -> None:
                await release.wait()

            async with trio.open_nursery() as agent_nursery:
                await agent_nursery.start(agent.run)
                await brain.command("hang")
                await until(lambda: agent.statistics().running_commands == 1)
                start = trio.current_time()
                agent_nursery.cancel_scope.cancel()
            # No waiting for the hung command or a close timeout (30 s here).
            assert trio.current_time() - start < 15
            assert agent.statistics().running_commands == 0
            await until(lambda: brain.sessions[0].close_code is not None)
            assert brain.sessions[0].close_code == 1000
            # run() can be started again, and picks up where it was
            async with trio.open_nursery() as agent_nursery:
                await agent_nursery.start(agent.run)
                agent_nursery.cancel_scope.cancel()


async def test_stopping_while_backing_off_returns_at_once() -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, nursery):
            brain.reject_http = 503
            agent = make_agent(brain, random=lambda: 1.0, backoff=Backoff(base=3600, cap=3600))
            nursery.start_soon(agent.run)
            await until(lambda: agent.statistics().last_disconnect is not None)
            await agent.aclose()  # does not wait out the hour


# -- the example ------------------------------------------------------------------------------


async def test_the_worker_example_streams_events_and_answers_ping() -> None:
    with trio.fail_after(60):
        async with brain_running() as (brain, nursery):
            script = str(ROOT / "examples" / "agent_worker.py")
            done: list[subprocess.CompletedProcess[bytes]] = []

            async def example(task_status: trio.TaskStatus[trio.Process]) -> None:
                done.append(
                    await trio.run_process(
                        [sys.executable, script, brain.url, "--events", "3"],
                        env={"Z4J_TOKEN": TOKEN, "Z4J_HMAC_SECRET": SECRET, "PATH": ""},
                        capture_stdout=True,
                        capture_stderr=True,
                        check=False,
                        task_status=task_status,
                    )
                )

            process: trio.Process = await nursery.start(example)
            await until(lambda: len(brain.sessions) == 1)
            await brain.command("ping", command_id="p-1")
            await until(lambda: len(brain.acked_event_ids) == 3 and bool(brain.results))
            # Stopped once it has done its work, not after a time it may need more of.
            process.send_signal(signal.SIGTERM)
            await until(lambda: bool(done))
            assert done[0].returncode == 0, done[0].stderr.decode()
            assert len(brain.acked_event_ids) == 3
            (result,) = brain.results_for("p-1")
            assert result.status == "success" and result.result is not None
            assert result.result["pong"] is True


def test_the_worker_example_has_help() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "agent_worker.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "Z4J_TOKEN" in out

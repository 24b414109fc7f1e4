"""Agent rules checked once per run rather than by the state machine.

Each needs something a random sequence of steps should not be made to pay
for every time: waiting out three heartbeat intervals (idle-4408), opening
cap + 1 connections (worker-cap-4429, when the cap is too large for the
machine's worker pool), a brain whose frame rate limit is low (the frames
half of rate-limit-4429), revoking the agent (revoked-4003, which ends the
agent's usefulness, so it runs last). Each returns None when the rule held,
or why it was skipped; a broken rule raises `Violation` with the transcript.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from .agent_client import AgentConnection
from .agent_violations import hello_message
from .agent_wire import Signer
from .target import AgentTarget, Hooks, Timeouts
from .transcript import Transcript, Violation

__all__ = ["CHECKS", "check_frame_rate", "check_idle", "check_revocation", "check_worker_cap"]

Check = Callable[[AgentTarget, Hooks, Timeouts, Transcript], Awaitable[str | None]]
MAX_CAP_CHECKED = 256
LINGER_SECONDS = 10.0  # as in agent_machine: how long a closed connection may still count
# A brain judges the frame rate as it reads, so a slowed brain spreads a
# burst out and may never see it. The burst is this many seconds' worth of
# frames: a brain that stays under its limit must take that long to read it,
# which no load makes plausible. It also caps the limits checked (we send
# rate * RATE_BURST_SECONDS frames).
RATE_BURST_SECONDS = 100
MAX_FRAME_RATE_CHECKED = 10


async def _connect(
    target: AgentTarget,
    transcript: Transcript,
    nursery: trio.Nursery,
    name: str,
    timeouts: Timeouts,
    *,
    keepalive: bool = False,
) -> AgentConnection:
    conn = AgentConnection(target, transcript, name, keepalive=keepalive)
    await conn.open(nursery, hello_message(name))
    await conn.wait_hello_ack(timeouts.reply)
    return conn


@asynccontextmanager
async def _connections() -> AsyncIterator[trio.Nursery]:
    """A nursery for a check's connections; a Violation comes out of it as itself."""
    raised: Violation | None = None
    async with trio.open_nursery() as nursery:
        try:
            yield nursery
        except Violation as exc:
            raised = exc
        finally:
            nursery.cancel_scope.cancel()
    if raised is not None:
        raise raised


def _outcome(conn: AgentConnection) -> str:
    if conn.http_status is not None:
        return f"HTTP {conn.http_status}"
    if conn.opened():
        return "hello_ack"
    return f"close {conn.close_code}" if conn.close_code is not None else "nothing"


async def check_idle(
    target: AgentTarget, hooks: Hooks, timeouts: Timeouts, transcript: Transcript
) -> str | None:
    """A connection that sends nothing after hello_ack closes with 4408 after 3 intervals."""
    async with _connections() as nursery:
        conn = await _connect(target, transcript, nursery, "idle", timeouts)
        try:
            if not conn.opened() or conn.hello_ack is None:
                raise Violation(
                    "handshake", f"hello was answered with {_outcome(conn)}", transcript
                )
            interval = conn.hello_ack.get("heartbeat_interval_seconds")
            if not isinstance(interval, int) or interval < 1:
                raise Violation("handshake", f"heartbeat interval {interval!r}", transcript)
            limit = 3 * interval
            if limit > target.max_idle_wait:
                return f"3 heartbeat intervals are {limit}s, over --max-idle-wait"
            started = time.monotonic()
            transcript.step(f"idle-4408(sending nothing for {limit}s)")
            code = await conn.wait_closed(limit + max(2.0, interval))
            took = time.monotonic() - started
            if code != 4408:
                what = "still open" if code is None else f"closed with {code}"
                raise Violation("idle-4408", f"{what} after {took:.1f}s of silence", transcript)
            if took < limit - 0.5:
                raise Violation(
                    "idle-4408", f"closed 4408 after {took:.1f}s, before {limit}s", transcript
                )
            return None
        finally:
            await conn.abort()


async def check_worker_cap(
    target: AgentTarget, hooks: Hooks, timeouts: Timeouts, transcript: Transcript
) -> str | None:
    """cap workers connect; one more is closed 4429; replacing one of them still works."""
    cap = target.worker_cap
    if cap is None:
        return "the cap is not known (--worker-cap)"
    if cap > MAX_CAP_CHECKED:
        return f"a cap of {cap} is more connections than this check opens"
    tag = secrets.token_hex(3)
    conns: list[AgentConnection] = []
    async with _connections() as nursery:
        try:
            transcript.step(f"worker-cap-4429({cap} workers, then one more)")
            for i in range(cap):
                name = f"cap{tag}-{i}"
                conn = await _connect(target, transcript, nursery, name, timeouts, keepalive=True)
                deadline = time.monotonic() + LINGER_SECONDS
                while conn.close_code == 4429 and time.monotonic() < deadline:
                    # Connections closed just before (by an earlier run) may still count.
                    await trio.sleep(0.2)
                    conn = await _connect(
                        target, transcript, nursery, name, timeouts, keepalive=True
                    )
                conns.append(conn)
                if not conn.opened():
                    raise Violation(
                        "worker-cap-4429",
                        f"worker {i + 1} of {cap} was answered with {_outcome(conn)}",
                        transcript,
                    )
                await conn.prove()  # takes the worker's slot
                nursery.start_soon(conn.keep_alive)
            extra = await _connect(target, transcript, nursery, f"cap{tag}-{cap}", timeouts)
            conns.append(extra)
            if await extra.wait_closed(timeouts.close) != 4429 or extra.hello_ack is not None:
                raise Violation(
                    "worker-cap-4429",
                    f"worker {cap + 1} of a cap of {cap} was answered with {_outcome(extra)}",
                    transcript,
                )
            again = await _connect(target, transcript, nursery, f"cap{tag}-0", timeouts)
            conns.append(again)
            await again.prove()  # replaces the older connection once proven
            replaced = await conns[0].wait_closed(timeouts.close)
            if not again.opened() or replaced != 4002:
                raise Violation(
                    "worker-cap-4429",
                    f"replacing a worker at the cap: new {_outcome(again)}, old closed {replaced}",
                    transcript,
                )
            return None
        finally:
            for conn in conns:
                await conn.close(timeout=1.0)


async def check_frame_rate(
    target: AgentTarget, hooks: Hooks, timeouts: Timeouts, transcript: Transcript
) -> str | None:
    """A hundred seconds' worth of frames at once closes the connection with 4429."""
    rate = target.frames_per_second
    if rate is None:
        return "the frame rate limit is not known (--frames-per-second)"
    if rate > MAX_FRAME_RATE_CHECKED:
        return (
            f"a limit of {rate} frames/s is too high to exceed for certain; give a brain "
            f"whose limit is at most {MAX_FRAME_RATE_CHECKED} (--rate-agent-url)"
        )
    burst = max(RATE_BURST_SECONDS * rate, 2 * rate + 10)
    async with _connections() as nursery:
        conn = await _connect(target, transcript, nursery, "rate", timeouts)
        try:
            if not conn.opened():
                raise Violation(
                    "handshake", f"hello was answered with {_outcome(conn)}", transcript
                )
            transcript.step(f"rate-limit-4429({burst} frames at once, {rate} frames/s allowed)")
            probe = f"rate-probe-{secrets.token_hex(3)}"

            def build(signer: Signer) -> list[dict[str, Any]]:
                beat = {"buffer_size": 0, "dropped_events": 0}
                frames = [signer.frame("heartbeat", beat) for _ in range(burst)]
                return [*frames, signer.frame("event_batch", {"events": []}, frame_id=probe)]

            await conn.send_built(build, note="a valid frame behind them: closed, or answered?")
            # A brain that enforces the limit closes within a few frames; one
            # that does not answers the probe. Either comes once the burst is read.
            await conn.wait(
                lambda: conn.closed.is_set() or _acked(conn, probe),
                timeouts.reply + timeouts.close,
            )
            if conn.close_code != 4429:
                what = (
                    "stayed open (it answered a batch sent after them)"
                    if _acked(conn, probe)
                    else _outcome(conn)
                )
                raise Violation(
                    "rate-limit-4429",
                    f"{burst} frames at once ({rate} frames/s allowed): {what}; "
                    "expected close 4429",
                    transcript,
                )
            return None
        finally:
            await conn.abort()


def _acked(conn: AgentConnection, batch: str) -> bool:
    return any(
        frame.get("type") == "event_batch_ack"
        and isinstance(frame.get("payload"), dict)
        and frame["payload"].get("acked_id") == batch
        for frame in conn.received
    )


async def check_revocation(
    target: AgentTarget, hooks: Hooks, timeouts: Timeouts, transcript: Transcript
) -> str | None:
    """Revoking the agent closes its live connection (4003); its token is refused after."""
    revoke = hooks.revoke_agent
    if revoke is None:
        return "no way to revoke the agent (--revoke-command or --z4j-store)"
    async with _connections() as nursery:
        conn = await _connect(target, transcript, nursery, "revoked", timeouts, keepalive=True)
        again: AgentConnection | None = None
        try:
            if not conn.opened() or conn.hello_ack is None:
                raise Violation(
                    "handshake", f"hello was answered with {_outcome(conn)}", transcript
                )
            await conn.prove()
            nursery.start_soon(conn.keep_alive)
            agent_id = str(conn.hello_ack["agent_id"])
            transcript.step(f"revoked-4003(revoking agent {agent_id})")
            await trio.to_thread.run_sync(revoke, agent_id)
            code = await conn.wait_closed(timeouts.delivery + timeouts.close)
            if code != 4003:
                what = "stayed open" if code is None else f"was closed with {code}"
                raise Violation("revoked-4003", f"the live connection {what}", transcript)
            again = await _connect(target, transcript, nursery, "after", timeouts)
            await again.wait_closed(timeouts.close)
            if again.opened() or not (
                again.http_status in (401, 403) or again.close_code in (4401, 4403)
            ):
                raise Violation(
                    "revoked-4003",
                    f"the revoked token was answered with {_outcome(again)}; expected HTTP "
                    "401/403 or close 4401/4403",
                    transcript,
                )
            return None
        finally:
            await conn.abort()
            if again is not None:
                await again.abort()


# In the order they run; revocation last, since it uses the agent up.
CHECKS: dict[str, Check] = {
    "idle-4408": check_idle,
    "worker-cap-4429": check_worker_cap,
    "rate-limit-4429": check_frame_rate,
    "revoked-4003": check_revocation,
}

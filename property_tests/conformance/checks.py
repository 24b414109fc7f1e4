"""Agent rules checked once per run rather than by the state machine.

Each needs something a random sequence of steps should not be made to pay
for every time: waiting out three heartbeat intervals (idle-4408), opening
cap + 1 connections (worker-cap-4429, when the cap is too large for the
machine's worker pool), revoking the agent (revoked-4003, which ends the
agent's usefulness, so it runs last). Each returns None when the rule held,
or why it was skipped; a broken rule raises `Violation` with the transcript.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from .agent_client import AgentConnection
from .agent_violations import hello_message
from .target import AgentTarget, Hooks, Timeouts
from .transcript import Transcript, Violation

__all__ = ["CHECKS", "check_idle", "check_revocation", "check_worker_cap"]

Check = Callable[[AgentTarget, Hooks, Timeouts, Transcript], Awaitable[str | None]]
MAX_CAP_CHECKED = 256


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
                deadline = time.monotonic() + 2.0
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
    "revoked-4003": check_revocation,
}

"""A mixed workload for the crash properties: ingest clients and agents at once.

Each client sends until its brain goes away and writes down, in a
`Ledger`, what it sent and what the brain acknowledged. After a restart,
`resend` plays the agents' part (every batch is sent again, as agents do
with batches whose ack they may have lost), and `problems` compares the
store with the ledger: every acknowledged record exactly once, nothing
twice.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from typing import Any

import attrs
import trio

import z4j.ingest
from property_tests.conformance.agent_client import AgentConnection
from property_tests.conformance.agent_violations import hello_message
from property_tests.conformance.target import AgentTarget
from property_tests.conformance.transcript import Transcript

__all__ = ["Ledger", "problems", "resend", "run_agent", "run_ingest_client"]

GONE = (
    OSError,
    z4j.ingest.IngestConnectionError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)
MAX_UNACKED = 16  # batches an agent has in flight before it waits for acks


@attrs.define
class Ledger:
    prefix: str
    records_acked: set[str] = attrs.field(factory=set)  # ingest record ids answered OK
    batches: dict[str, list[dict[str, Any]]] = attrs.field(factory=dict)  # agent batches sent
    batches_acked: set[str] = attrs.field(factory=set)


async def run_ingest_client(host: str, port: int, ledger: Ledger, name: str, size: int) -> None:
    """Pipelined payloads of ``size`` records until the connection breaks (no
    reconnect: the brain is being killed)."""
    try:
        async with await z4j.ingest.open_trio(host, port, retry_seconds=0) as client:
            for round_ in itertools.count():
                ids = [f"{ledger.prefix}.{name}.{round_}.{k}" for k in range(4)]
                payloads = [[{"t": "log", "rid": f"{pid}/{i}"} for i in range(size)] for pid in ids]
                results = await client.send_many(payloads)
                for pid, ok in zip(ids, results, strict=True):
                    if ok:
                        ledger.records_acked.update(f"{pid}/{i}" for i in range(size))
    except GONE:
        return


def _take_acks(conn: AgentConnection, ledger: Ledger, seen: int) -> int:
    for frame in conn.received[seen:]:
        payload = frame.get("payload")
        if frame.get("type") == "event_batch_ack" and isinstance(payload, dict):
            ledger.batches_acked.add(str(payload.get("acked_id")))
    return len(conn.received)


def _progressed(conn: AgentConnection, seen: int) -> bool:
    return len(conn.received) > seen or conn.closed.is_set()


LIFECYCLE = ("task.received", "task.started", "task.succeeded")


def task_event(batch: str, i: int) -> dict[str, Any]:
    """The i-th event of a batch: one step of a task's life (three events a
    task, across batches when a batch is smaller), so that the drain also
    folds tasks while the brain is killed."""
    return {
        "id": f"{batch}/{i}",
        "kind": LIFECYCLE[i % 3],
        "engine": "prop",
        "task_id": f"{batch}/t{i // 3}",
        "occurred_at": f"2026-12-06T12:00:{i % 60:02d}+00:00",
        "data": {"task_name": "prop.job"},
    }


async def run_agent(target: AgentTarget, ledger: Ledger, worker: str, size: int) -> None:
    """Batches of ``size`` events, a few in flight, until the connection closes."""
    async with trio.open_nursery() as nursery:
        conn = AgentConnection(target, Transcript(), worker, keepalive=False)
        try:
            await conn.open(nursery, hello_message(worker))
            await conn.wait_hello_ack(10)
            seen = 0
            for k in itertools.count():
                if not conn.opened():
                    break
                batch = f"{ledger.prefix}.{worker}.{k}"
                events = [task_event(batch, i) for i in range(size)]
                ledger.batches[batch] = events
                await conn.send_signed("event_batch", {"events": events}, frame_id=batch)
                seen = _take_acks(conn, ledger, seen)
                if len(ledger.batches) - len(ledger.batches_acked) > MAX_UNACKED:
                    await conn.wait(functools.partial(_progressed, conn, seen), 5)
        except GONE:
            pass
        finally:
            await conn.abort()
            nursery.cancel_scope.cancel()


async def resend(target: AgentTarget, ledger: Ledger) -> None:
    """Send every batch again on a new connection; every one must be acknowledged."""
    async with trio.open_nursery() as nursery:
        conn = AgentConnection(target, Transcript(), "resend", keepalive=False)
        await conn.open(nursery, hello_message("resend"))
        await conn.wait_hello_ack(10)
        assert conn.opened(), f"the restarted brain answered hello with {conn.close_code}"
        names = sorted(ledger.batches)
        acked: set[str] = set()
        for start in range(0, len(names), 32):
            window = names[start : start + 32]
            for batch in window:
                await conn.send_signed(
                    "event_batch", {"events": ledger.batches[batch]}, frame_id=batch
                )

            def done(window: list[str] = window) -> bool:
                acked.update(
                    f["payload"]["acked_id"]
                    for f in conn.received
                    if f.get("type") == "event_batch_ack"
                )
                return set(window) <= acked

            assert await conn.wait(done, 30), "the restarted brain did not ack every batch"
        await conn.close()
        nursery.cancel_scope.cancel()


def problems(stored: list[dict[str, Any]], ledger: Ledger) -> list[str]:
    """What the store got wrong: lost acknowledged records, records stored twice."""
    ours = [e for e in stored if str(e.get("rid", e.get("id", ""))).startswith(ledger.prefix)]
    counts = Counter(str(e.get("rid", e.get("id"))) for e in ours)
    found = [f"stored twice: {sorted(k for k, n in counts.items() if n > 1)[:5]}"]
    if not any(n > 1 for n in counts.values()):
        found = []
    lost_records = sorted(r for r in ledger.records_acked if r not in counts)
    if lost_records:
        found.append(f"{len(lost_records)} acknowledged records lost, e.g. {lost_records[:5]}")
    # Every batch was sent again after the restart, so every event must be there.
    lost_events = sorted(
        e["id"] for events in ledger.batches.values() for e in events if e["id"] not in counts
    )
    if lost_events:
        found.append(f"{len(lost_events)} agent events lost, e.g. {lost_events[:5]}")
    return found

"""Every event batch is acknowledged exactly once per send, and only once durable.

A Hypothesis state machine drives a real brain over /ws/agent with a raw
agent: it sends new batches, re-sends old ones (as an agent does after a
lost ack), waits for the acks, and hard-stops and restarts the brain (an
agent then re-sends whatever was not acknowledged).

Checked:
- at the moment an ack arrives, the batch's events are durable: in the
  buffer file or in the store (the drain commits to the store before it
  deletes from the buffer, so a durable event is always in one of them);
- each send is answered by exactly one ack, never more, never for a batch
  that was not sent;
- at the end, every event of every acknowledged batch is stored exactly once.

The brain runs in a Trio run on a thread of its own that lives for one
example; the rules call into it with ``trio.from_thread.run``.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from z4j.brain.agents import AgentEndpoint, Session, _Batch, origin_json
from z4j.buffer import NewRow
from z4j.config import Config
from z4j.protocol.agent import frames as f
from z4j.testing.agents import RawAgent, provision, raw_agent
from z4j.testing.brain import buffer_rows, make_config, read_events, running_brain, wait_until

T = TypeVar("T")


def batch(batch_id: str, size: int) -> f.EventBatch:
    return f.EventBatch(
        events=tuple(
            f.AgentEvent(id=f"{batch_id}/{i}", kind="k", raw={"id": f"{batch_id}/{i}", "kind": "k"})
            for i in range(size)
        )
    )


def durable_event_ids(config: Config) -> set[str]:
    """Event ids in the buffer file or the store, read from the files themselves."""
    ids = {e["body"]["id"] for e in read_events(config)}  # type: ignore[index]
    db = sqlite3.connect(config.resolved_buffer_path)
    try:
        for (body,) in db.execute("SELECT body FROM payloads WHERE source = 'agent'"):
            ids.update(event["id"] for event in orjson.loads(body))
    finally:
        db.close()
    return ids


class TrioThread:
    """A Trio run on its own thread, for the lifetime of one example."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        assert self._ready.wait(60), "the Trio thread did not start"

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await trio.sleep_forever()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self.token)

    def close(self) -> None:
        trio.from_thread.run_sync(self.nursery.cancel_scope.cancel, trio_token=self.token)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the Trio thread did not stop"


class DurableAcks(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.trio = TrioThread()
        self.tmp = tempfile.mkdtemp(prefix="z4j-acks-")
        self.config = make_config(Path(self.tmp) / "data")
        self.token, self.secret, _ = self.trio.run(provision, self.config)
        self.sizes: dict[str, int] = {}
        self.sends: Counter[str] = Counter()
        self.acks: Counter[str] = Counter()
        self.problems: list[str] = []
        self.scope: trio.CancelScope | None = None
        self.agent: RawAgent | None = None
        self.trio.run(self._start)

    # -- the brain and its agent, on the Trio thread ------------------------------------

    async def _start(self) -> None:
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()
        self.agent = await self.trio.nursery.start(self._brain_and_agent)

    async def _brain_and_agent(self, task_status: trio.TaskStatus[RawAgent]) -> None:
        assert self.scope is not None
        try:
            with self.scope:
                async with running_brain(self.config) as brain:
                    async with raw_agent(brain.addresses.http, self.token, self.secret) as agent:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._read_acks, agent)
                            task_status.started(agent)
        finally:
            self.stopped.set()

    async def _read_acks(self, agent: RawAgent) -> None:
        while True:
            frame = await agent.receive()
            if not isinstance(frame.payload, f.EventBatchAck):
                continue
            batch_id = frame.payload.acked_id
            # Checked right here, on the loop, before anything else moves.
            missing = {f"{batch_id}/{i}" for i in range(self.sizes.get(batch_id, 0))}
            missing -= durable_event_ids(self.config)
            if batch_id not in self.sizes:
                self.problems.append(f"ack for unknown batch {batch_id}")
            elif missing:
                self.problems.append(f"{batch_id} acked before durable: {sorted(missing)}")
            self.acks[batch_id] += 1
            if self.acks[batch_id] > self.sends[batch_id]:
                self.problems.append(f"{batch_id}: more acks than sends")

    async def _send(self, batch_id: str) -> None:
        assert self.agent is not None
        self.sends[batch_id] += 1
        await self.agent.send(batch(batch_id, self.sizes[batch_id]), frame_id=batch_id)

    async def _stop(self) -> None:
        assert self.scope is not None
        self.scope.cancel()
        await self.stopped.wait()

    async def _settle(self) -> None:
        await wait_until(lambda: self.acks == self.sends or self.problems, timeout=60)

    # -- rules ---------------------------------------------------------------------------

    @rule(size=st.integers(1, 4))
    def send_new_batch(self, size: int) -> None:
        batch_id = f"b{len(self.sizes)}"
        self.sizes[batch_id] = size
        self.trio.run(self._send, batch_id)

    @precondition(lambda self: bool(self.sizes))
    @rule(data=st.data())
    def send_again(self, data: st.DataObject) -> None:
        """An agent re-sends a batch whose ack it did not see."""
        self.trio.run(self._send, data.draw(st.sampled_from(sorted(self.sizes))))

    @rule()
    def wait_for_acks(self) -> None:
        self.trio.run(self._settle)
        assert not self.problems, self.problems
        assert self.acks == self.sends

    @rule()
    def restart_brain(self) -> None:
        """Hard stop mid-stream; the agent re-sends everything not acknowledged."""
        self.trio.run(self._stop)
        unacked = [b for b in self.sizes if self.acks[b] == 0]
        # Acks for sends in flight are lost with the connection.
        self.sends = Counter({b: n for b, n in self.acks.items() if n})
        self.trio.run(self._start)
        for batch_id in unacked:
            self.trio.run(self._send, batch_id)

    @invariant()
    def no_ack_is_wrong(self) -> None:
        assert not self.problems, self.problems

    def teardown(self) -> None:
        try:
            if self.agent is not None:
                self.trio.run(self._settle)
                assert not self.problems, self.problems
                assert self.acks == self.sends
                self.trio.run(wait_until, lambda: buffer_rows(self.config) == 0)
                stored = Counter(e["body"]["id"] for e in read_events(self.config))  # type: ignore[index]
                assert not [k for k, n in stored.items() if n > 1], "stored twice"
                for batch_id, acked in self.acks.items():
                    if acked:
                        for i in range(self.sizes[batch_id]):
                            assert stored[f"{batch_id}/{i}"] == 1, f"{batch_id}/{i} lost"
        finally:
            self.trio.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


DurableAcks.TestCase.settings = settings(
    max_examples=max(5, settings.default.max_examples // 5),
    stateful_step_count=12,
    deadline=None,
)
test_durable_acks = DurableAcks.TestCase


# -- the machine bites: brains broken on purpose, inside the test only ---------------------
#
# Each bite drives the machine through a fixed list of its own rules (no
# random draws, no example database) against a brain whose fault shows on
# the wire in an order the machine cannot miss, whatever the machine's
# speed: a fault that only shows if a check happens to run inside some
# window would make the bite pass or fail by luck.

Step = Callable[[DurableAcks], None]


def run_steps(steps: list[Step]) -> None:
    """One run of the machine, as Hypothesis runs it: invariants after each step, then teardown."""
    machine = DurableAcks()
    try:
        machine.no_ack_is_wrong()
        for step in steps:
            step(machine)
            machine.no_ack_is_wrong()
    finally:
        machine.teardown()


def send(size: int) -> Step:
    return lambda machine: machine.send_new_batch(size)


def wait_for_acks(machine: DurableAcks) -> None:
    machine.wait_for_acks()


# b0 is acked; then b1 is sent and acked (each ack waited for).
TWO_BATCHES: list[Step] = [send(2), wait_for_acks, send(1), wait_for_acks]


def _acks(batches: list[_Batch]) -> list[f.Payload]:
    return [
        f.EventBatchAck(
            acked_id=b.id,
            received=len(b.payload.events),
            accepted=len(b.payload.events),
            rejected=0,
        )
        for b in batches
    ]


def test_the_bite_steps_pass_against_the_real_brain() -> None:
    """The control: what the bites below catch comes from the broken brains."""
    run_steps(TWO_BATCHES)


def test_an_ack_sent_before_the_batch_is_durable_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held = trio.Event()  # never set: the run's end cancels the wait

    async def ack_then_buffer(self: AgentEndpoint, session: Session, batches: list[_Batch]) -> None:
        """Broken: acks first; the rows go to the buffer only once ``held`` is set.

        So every ack arrives while its events are in neither the buffer nor the store.
        """
        await session.send_all(_acks(batches))
        await held.wait()
        origin = origin_json(session)
        rows = [
            NewRow(
                received_at=time.time(),
                source="agent",
                body=orjson.dumps([e.raw for e in b.payload.events]),
                origin=origin,
            )
            for b in batches
        ]
        if self._buffer.admit(len(rows)):
            await self._buffer.append(rows)

    monkeypatch.setattr(AgentEndpoint, "_buffer_batches", ack_then_buffer)
    with pytest.raises(AssertionError, match="b0 acked before durable"):
        run_steps(TWO_BATCHES)


def test_a_second_ack_for_one_send_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer_batches = AgentEndpoint._buffer_batches
    earlier: list[f.Payload] = []

    async def ack_again(self: AgentEndpoint, session: Session, batches: list[_Batch]) -> None:
        """Broken: acks each group again, durable by then, just before the next group's acks.

        One connection keeps frames in order, so the machine reads b0's
        second ack before b1's ack, which it waits for.
        """
        if earlier:
            await session.send_all(earlier)
        earlier[:] = _acks(batches)
        await buffer_batches(self, session, batches)

    monkeypatch.setattr(AgentEndpoint, "_buffer_batches", ack_again)
    with pytest.raises(AssertionError, match="b0: more acks than sends"):
        run_steps(TWO_BATCHES)

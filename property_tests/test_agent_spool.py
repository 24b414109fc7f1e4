"""The agent's spool (`z4j.agent._spool.Spool`) against a simple model, no sockets.

A state machine emits events, sends batches (some refused as too large),
acks known and unknown ids, reconnects and lets time pass, and checks after
every step that:

- every live event (accepted, not acked, not dropped) is in exactly one
  place: pending or one un-acked batch, and a batch never changes;
- a batch is sent again on every reconnect, oldest first and before any new
  batch, and within a session once it is overdue, until it is acked;
- acks for ids the spool does not hold change nothing;
- the bounds hold: at most `max_spool` events, `batch_max_events` per batch,
  `max_in_flight` in flight, and a batch of several events fits its
  ``max_bytes``.
"""

from __future__ import annotations

import ast
import itertools
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import z4j.agent
from z4j.agent import SpoolFull
from z4j.agent._spool import Batch, Spool

ACK_TIMEOUT = 10.0


class SpoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ids = itertools.count()
        self.spool: Spool | None = None
        self.now = 0.0
        self.accepted = 0
        self.refused = 0
        # The model: the order events were emitted in, where each live one is,
        # and what each batch held when it was formed.
        self.pending: list[str] = []
        self.batches: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self.in_flight: OrderedDict[str, float] = OrderedDict()
        self.resend: list[str] = []
        self.acked: set[str] = set()
        self.dropped: set[str] = set()
        self.sizes: dict[str, int] = {}

    @initialize(
        max_spool=st.integers(1, 30),
        batch_max_events=st.integers(1, 6),
        max_in_flight=st.integers(1, 4),
    )
    def start(self, max_spool: int, batch_max_events: int, max_in_flight: int) -> None:
        batch_ids = itertools.count()
        self.spool = Spool(
            max_spool=max_spool,
            batch_max_events=batch_max_events,
            max_in_flight=max_in_flight,
            ack_timeout=ACK_TIMEOUT,
            new_id=lambda: f"b{next(batch_ids)}",
        )

    def _spool(self) -> Spool:
        assert self.spool is not None
        return self.spool

    @rule(size=st.integers(1, 20))
    def emit(self, size: int) -> None:
        spool = self._spool()
        event_id = f"e{next(self.ids)}"
        live = len(self.pending) + sum(len(b) for b in self.batches.values())
        if live >= spool.max_spool:
            with pytest.raises(SpoolFull):
                spool.add({"id": event_id, "kind": "k"}, size)
            self.refused += 1
            return
        spool.add({"id": event_id, "kind": "k"}, size)
        self.accepted += 1
        self.pending.append(event_id)
        self.sizes[event_id] = size

    def _expected_choice(self) -> str | None:
        """The model's pick: overdue, then a queued re-send, then None for "new"."""
        if self.in_flight:
            oldest, sent_at = next(iter(self.in_flight.items()))
            if self.now - sent_at >= ACK_TIMEOUT:
                return oldest
        return None

    def _step(self, max_bytes: int) -> Batch | None:
        """One send-loop step, as the agent's session takes it; checks the pick."""
        spool = self._spool()
        overdue = self._expected_choice()
        batch = spool.overdue(self.now)
        if overdue is not None:
            assert batch is not None and batch.id == overdue
        else:
            assert batch is None
            if len(self.in_flight) >= spool.max_in_flight:
                assert spool.next_batch(max_bytes) is None
                return None
            while self.resend and (
                self.resend[0] not in self.batches or self.resend[0] in self.in_flight
            ):
                self.resend.pop(0)
            batch = spool.next_batch(max_bytes)
            if self.resend:
                assert batch is not None and batch.id == self.resend.pop(0)
            elif not self.pending:
                assert batch is None
                return None
            else:
                assert batch is not None and batch.id not in self.batches
                ids = tuple(e["id"] for e, _ in batch.items)
                # A new batch is the oldest pending events, within its bounds.
                assert ids == tuple(self.pending[: len(ids)])
                assert 1 <= len(ids) <= spool.batch_max_events
                total = sum(self.sizes[i] + 1 for i in ids)
                assert len(ids) == 1 or total <= max_bytes
                if len(ids) < min(len(self.pending), spool.batch_max_events):
                    # It stopped early only because the next event did not fit.
                    assert total + self.sizes[self.pending[len(ids)]] + 1 > max_bytes
                del self.pending[: len(ids)]
                self.batches[batch.id] = ids
        # The same frame id carries the same events for life.
        assert tuple(e["id"] for e, _ in batch.items) == self.batches[batch.id]
        assert [e.id for e in batch.payload.events] == list(self.batches[batch.id])
        spool.sending(batch, self.now)
        self.in_flight[batch.id] = self.now
        self.in_flight.move_to_end(batch.id)
        return batch

    @rule(max_bytes=st.integers(1, 60))
    def send(self, max_bytes: int) -> None:
        self._step(max_bytes)

    @rule(max_bytes=st.integers(1, 60))
    def send_too_large(self, max_bytes: int) -> None:
        batch = self._step(max_bytes)
        if batch is None:
            return
        dropped = self._spool().too_large(batch)
        ids = self.batches.pop(batch.id)
        del self.in_flight[batch.id]
        if len(ids) > 1:
            assert dropped is None
            self.pending[:0] = ids  # back to the front, in order
        else:
            assert dropped is not None and dropped["id"] == ids[0]
            self.dropped.add(ids[0])

    @rule(data=st.data())
    @precondition(lambda self: bool(self.batches))
    def ack(self, data: st.DataObject) -> None:
        batch_id = data.draw(st.sampled_from(list(self.batches)))
        batch = self._spool().ack(batch_id)
        assert batch is not None and batch.id == batch_id
        self.acked.update(self.batches.pop(batch_id))
        self.in_flight.pop(batch_id, None)

    @rule(data=st.data())
    def ack_unknown(self, data: st.DataObject) -> None:
        spool = self._spool()
        batch_id = data.draw(
            st.sampled_from([f"b{n}" for n in range(40)] + ["", "ev_x"]).filter(
                lambda i: i not in self.batches
            )
        )
        before = (list(spool.pending), list(spool.batches), list(spool.in_flight), spool.spooled)
        assert spool.ack(batch_id) is None
        after = (list(spool.pending), list(spool.batches), list(spool.in_flight), spool.spooled)
        assert after == before

    @rule()
    def reconnect(self) -> None:
        assert self._spool().open_session() == len(self.batches)
        self.in_flight.clear()
        self.resend = list(self.batches)

    @rule()
    @precondition(lambda self: bool(self.batches))
    def reconnect_and_resend_all(self) -> None:
        """After a reconnect every un-acked batch goes again, oldest first, before new ones."""
        spool = self._spool()
        self.reconnect()
        expected = list(self.batches)
        sent: list[str] = []
        for _ in expected:
            if len(self.in_flight) >= spool.max_in_flight:
                break
            batch = self._step(10_000)
            assert batch is not None
            sent.append(batch.id)
        assert sent == expected[: len(sent)]

    @rule(seconds=st.sampled_from([0.5, 3.0, ACK_TIMEOUT, 25.0]))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    @invariant()
    def every_live_event_is_in_exactly_one_place(self) -> None:
        spool = self._spool()
        places = [e["id"] for e, _ in spool.pending]
        for batch in spool.batches.values():
            places.extend(e["id"] for e, _ in batch.items)
        assert len(places) == len(set(places))
        assert [e["id"] for e, _ in spool.pending] == self.pending
        assert {b: tuple(e["id"] for e, _ in x.items) for b, x in spool.batches.items()} == dict(
            self.batches
        )
        assert not set(places) & (self.acked | self.dropped)

    @invariant()
    def counts_and_bounds(self) -> None:
        spool = self._spool()
        live = len(self.pending) + sum(len(b) for b in self.batches.values())
        assert spool.spooled == live <= spool.max_spool
        assert spool.acked_events == len(self.acked)
        assert spool.dropped == len(self.dropped)
        assert spool.refused == self.refused
        assert self.accepted == live + len(self.acked) + len(self.dropped)
        assert list(spool.in_flight) == list(self.in_flight)
        assert set(spool.in_flight) <= set(spool.batches)
        assert len(spool.in_flight) <= spool.max_in_flight
        assert all(len(b.items) <= spool.batch_max_events for b in spool.batches.values())
        assert spool.empty == (live == 0)
        oldest = next(iter(self.in_flight.values()), None)
        assert spool.deadline() == (float("inf") if oldest is None else oldest + ACK_TIMEOUT)


TestSpool = SpoolMachine.TestCase


def test_a_batch_is_resent_until_acked() -> None:
    """One batch, never acked: every reconnect and every ack timeout sends it again."""
    spool = Spool(max_spool=5, batch_max_events=5, max_in_flight=1, ack_timeout=ACK_TIMEOUT)
    spool.add({"id": "a", "kind": "k"}, 10)
    first = spool.next_batch(1000)
    assert first is not None
    spool.sending(first, 0.0)
    assert spool.overdue(ACK_TIMEOUT - 0.1) is None
    assert spool.next_batch(1000) is None  # max_in_flight reached
    for attempt in range(3):
        now = (attempt + 1) * ACK_TIMEOUT
        again = spool.overdue(now)
        assert again is first
        spool.sending(again, now)
        assert spool.open_session() == 1
        assert spool.next_batch(1000) is first
        spool.sending(first, now)
    assert spool.ack(first.id) is first
    assert spool.ack(first.id) is None  # a second ack for a re-sent batch
    assert spool.open_session() == 0 and spool.next_batch(1000) is None
    stats: dict[str, Any] = {"spooled": spool.spooled, "acked": spool.acked_events}
    assert stats == {"spooled": 0, "acked": 1}


@pytest.mark.parametrize("module", ["_spool.py", "_backoff.py"])
def test_the_spool_and_the_backoff_are_sans_io(module: str) -> None:
    """They import no trio, no websocket, no socket: only the stdlib, attrs and protocol/."""
    tree = ast.parse((Path(z4j.agent.__file__).parent / module).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 2 and (node.module or "").startswith("protocol"), ast.dump(node)
    assert not imported & {"trio", "trio_websocket", "socket", "ssl", "wsproto"}, imported

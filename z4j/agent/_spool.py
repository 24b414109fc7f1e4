"""The agent's spool: events from `emit` until the brain acks them (sans-IO).

Kept apart from the connection so at-least-once delivery is plain state that
property tests can drive without sockets or a clock (no trio here: time comes
in as ``now``). The rules it holds:

- Every accepted event is in exactly one place: pending (in no batch yet) or
  one un-acked batch. It leaves only by an ack of its batch, or by being
  dropped as too large for the brain's frame limit.
- A batch keeps its frame id and its events for life, so a re-send is a
  repeat the brain can recognise.
- Per session: a batch is in flight from its send until its ack. When a
  session opens, every un-acked batch is queued for re-send, oldest first;
  within a session, the oldest in-flight batch is re-sent once it has waited
  `ack_timeout`. At most `max_in_flight` batches are in flight at once.
- An ack for an id the spool does not hold (acked before, or never sent) is
  ignored.
"""

from __future__ import annotations

import math
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import attrs

from ..protocol.agent import frames as f

__all__ = ["Batch", "Spool", "SpoolFull"]


class SpoolFull(Exception):
    """`Agent.emit` refused an event: the spool holds `max_spool` events already."""


def _batch_id() -> str:
    return f"ev_{uuid.uuid4().hex}"


@attrs.frozen(kw_only=True)
class Batch:
    id: str
    payload: f.EventBatch
    items: tuple[tuple[dict[str, Any], int], ...]  # (event, encoded size)


class Spool:
    """Pending events, un-acked batches, and one session's in-flight view of them."""

    def __init__(
        self,
        *,
        max_spool: int,
        batch_max_events: int,
        max_in_flight: int,
        ack_timeout: float,
        new_id: Callable[[], str] = _batch_id,
    ) -> None:
        self.max_spool = max_spool
        self.batch_max_events = batch_max_events
        self.max_in_flight = max_in_flight
        self.ack_timeout = ack_timeout
        self._new_id = new_id
        self.pending: deque[tuple[dict[str, Any], int]] = deque()
        self.batches: OrderedDict[str, Batch] = OrderedDict()
        self.spooled = 0  #: events not yet acked: pending plus in batches
        self.acked_events = 0
        self.refused = 0  #: `add` raised SpoolFull
        self.dropped = 0  #: too large for the brain's frame limit
        # This session's view: batch id -> sent at, and batches to send again.
        self.in_flight: OrderedDict[str, float] = OrderedDict()
        self.resend: deque[str] = deque()

    @property
    def empty(self) -> bool:
        return not (self.pending or self.batches)

    def add(self, event: dict[str, Any], size: int) -> None:
        """Take an event (already validated, ``size`` bytes of JSON), or raise `SpoolFull`."""
        if self.spooled >= self.max_spool:
            self.refused += 1
            raise SpoolFull(f"the agent's spool holds {self.max_spool} events; event refused")
        self.pending.append((event, size))
        self.spooled += 1

    def open_session(self) -> int:
        """A new session: nothing is in flight, every un-acked batch goes again, in order."""
        self.in_flight.clear()
        self.resend = deque(self.batches)
        return len(self.resend)

    def overdue(self, now: float) -> Batch | None:
        """The oldest in-flight batch if it has waited `ack_timeout` for its ack."""
        if self.in_flight:
            batch_id, sent_at = next(iter(self.in_flight.items()))
            if now - sent_at >= self.ack_timeout:
                return self.batches[batch_id]
        return None

    def next_batch(self, max_bytes: int) -> Batch | None:
        """The next batch to send: a queued re-send, else a new one of at most ``max_bytes``.

        None when `max_in_flight` batches are in flight or there is nothing to send.
        """
        if len(self.in_flight) >= self.max_in_flight:
            return None
        while self.resend:
            batch = self.batches.get(self.resend.popleft())
            if batch is not None and batch.id not in self.in_flight:
                return batch
        return self._form_batch(max_bytes)

    def deadline(self) -> float:
        """When the oldest in-flight batch becomes overdue (inf: none in flight)."""
        oldest = next(iter(self.in_flight.values()), math.inf)
        return oldest + self.ack_timeout

    def sending(self, batch: Batch, now: float) -> None:
        """``batch`` is about to be sent: it is in flight from ``now`` (and newest)."""
        self.in_flight[batch.id] = now
        self.in_flight.move_to_end(batch.id)

    def too_large(self, batch: Batch) -> dict[str, Any] | None:
        """``batch`` was over the brain's frame limit: re-batch its events, or drop a lone one.

        Returns the dropped event, if one was.
        """
        del self.in_flight[batch.id]
        del self.batches[batch.id]
        if len(batch.items) > 1:
            self.pending.extendleft(reversed(batch.items))
            return None
        self.spooled -= 1
        self.dropped += 1
        return batch.items[0][0]

    def ack(self, batch_id: str) -> Batch | None:
        """The brain acked ``batch_id``: release its events. None if it is not held."""
        self.in_flight.pop(batch_id, None)
        batch = self.batches.pop(batch_id, None)
        if batch is None:
            return None  # acked before (it was sent twice), or never ours
        self.spooled -= len(batch.items)
        self.acked_events += len(batch.items)
        return batch

    def _form_batch(self, max_bytes: int) -> Batch | None:
        if not self.pending:
            return None
        items: list[tuple[dict[str, Any], int]] = []
        total = 0
        while self.pending and len(items) < self.batch_max_events:
            size = self.pending[0][1] + 1
            if items and total + size > max_bytes:
                break
            items.append(self.pending.popleft())
            total += size
        payload = f.EventBatch(
            events=tuple(f.AgentEvent(id=e["id"], kind=e["kind"], raw=e) for e, _ in items)
        )
        batch = Batch(id=self._new_id(), payload=payload, items=tuple(items))
        self.batches[batch.id] = batch
        return batch

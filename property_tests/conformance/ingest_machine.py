"""Ingest protocol v1 as a Hypothesis state machine, against a live brain.

One rule does the work: on one of a few connections, write a run of
frames (valid payloads, ``[]``, ``PING``, content errors), maybe ending
in a framing error or end of stream, in one write or cut into pieces, and
read the replies. The model says what each reply must be, in order, and
whether the connection must then be open or closed. `teardown` checks that
every record of a payload answered ``2:OK`` was stored exactly once.

For the backpressure rule the target is a brain whose drains do not run:
the model counts accepted payloads against its capacity.
"""

from __future__ import annotations

import gzip
import json
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar

import attrs
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from .ingest_client import IngestConnection
from .ingest_wire import (
    ERROR,
    OK,
    PING,
    Malformed,
    content_errors,
    encode,
    framing_errors,
    token_field,
)
from .portal import TrioPortal
from .stored import landing_problem
from .strategies import ChoiceCount, extras
from .target import Hooks, IngestTarget, Timeouts
from .transcript import Transcript, Violation

__all__ = ["IngestMachine", "ingest_machine"]

ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "compact": lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode(),
    "ascii escapes": lambda v: json.dumps(v).encode(),
    "indented": lambda v: json.dumps(v, indent=1, ensure_ascii=False).encode(),
}
KINDS = ["request", "query", "job", "exception", "log", "k" * 128, "é"]

FRAME_KINDS = st.sampled_from(
    ["records", "records", "ping", "empty", "content error", "any token field"]
)
RECORDS = st.lists(
    st.tuples(st.sampled_from(KINDS), st.just({}) | extras()), min_size=1, max_size=4
)
ENCODINGS = st.sampled_from(sorted(ENCODERS))
GZIP_LEVELS = st.none() | st.integers(0, 9)
# Without a token, any token-hash field of up to 64 bytes without a colon passes.
TOKEN_FIELDS = st.binary(max_size=64).filter(lambda b: b":" not in b)


@attrs.frozen
class Expect:
    """The reply one frame must get; ``None``: either, as the buffer's fill decides."""

    reply: bytes | None
    rule: str
    what: str
    records: tuple[dict[str, Any], ...] = ()


class IngestMachine(RuleBasedStateMachine):
    """Configured by `ingest_machine`; one instance per Hypothesis example."""

    hooks: ClassVar[Hooks]
    timeouts: ClassVar[Timeouts]
    portal: ClassVar[TrioPortal]
    exercised: ClassVar[Counter[str]]  # rule -> checks passed, over the whole run
    # (steps, transcript lines) of each failing example run (the bite tests read it).
    failures: ClassVar[list[tuple[str, int, int | None]]]

    @staticmethod
    def targets() -> AbstractContextManager[IngestTarget]:
        """The target of one example (`ingest_machine` sets it)."""
        raise NotImplementedError

    def __init__(self) -> None:
        super().__init__()
        self.choices = ChoiceCount()  # recorded with each failure, for the bite tests
        self.transcript = Transcript()
        self.prefix = secrets.token_hex(4)
        self.counter = 0
        self._target_cm = self.targets()
        self.target = self._target_cm.__enter__()
        self.content = {f"{c.reason}: {c.how}": c for c in content_errors(self.target)}
        self.content_names = st.sampled_from(sorted(self.content))
        self.framing = framing_errors(self.target)
        self.conns: dict[int, IngestConnection] = {}
        self.last_expect: dict[int, Expect] = {}  # per connection: its last frame's
        self.sent: dict[str, dict[str, Any]] = {}  # cid -> record
        self.acked: set[str] = set()
        self.accepted = 0  # payloads answered OK in this example
        self._planned = 0  # payloads of the frames being built that will be accepted
        # The backpressure model: True once the buffer is known to be full.
        self.full: bool | None = None
        if self.target.capacity is not None and self.target.fresh:
            self.full = self.target.capacity == 0

    def fail(self, rule: str, message: str) -> Violation:
        self.transcript.add("", "!", f"[{rule}] {message}")
        violation = Violation(rule, message, self.transcript)
        violation.choices = self.choices()
        self.failures.append((rule, violation.steps, violation.choices))
        return violation

    # -- building frames ---------------------------------------------------------------

    def _records(self, kinds: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        records = []
        for kind, fields in kinds:
            self.counter += 1
            cid = f"{self.prefix}.{self.counter}"
            record = {"t": kind, "cid": cid, **fields}
            self.sent[cid] = record
            records.append(record)
        return records

    def _payload_rule(self) -> str:
        return "ingest-replies-in-order" if self.target.capacity is None else "ingest-backpressure"

    def _frame(self, data: st.DataObject) -> tuple[bytes, Expect]:
        """Draw one frame and the reply it must get."""
        field = token_field(self.target.token)
        kind = data.draw(FRAME_KINDS, label="frame")
        if kind == "ping":
            return encode(PING, field), Expect(OK, self._payload_rule(), "PING")
        if kind == "empty":
            return encode(b"[]", field), Expect(OK, self._payload_rule(), "[]")
        if kind == "content error":
            case = self.content[data.draw(self.content_names, label="content error")]
            return case.data, Expect(ERROR, "ingest-content-error", f"{case.reason}: {case.how}")
        records = self._records(data.draw(RECORDS, label="records"))
        encoder = data.draw(ENCODINGS, label="encoding")
        body = ENCODERS[encoder](records)
        how = f"{len(records)} records, {encoder}"
        level = data.draw(GZIP_LEVELS, label="gzip level")
        if level is not None:
            body = gzip.compress(body, level)
            how += f", gzip {level}"
        if kind == "any token field" and self.target.token is None:
            field = data.draw(TOKEN_FIELDS, label="token-hash field")
            how += f", token-hash field {field!r}"
        return encode(body, field), self._payload_expect(how, records)

    def _payload_expect(self, how: str, records: list[dict[str, Any]]) -> Expect:
        capacity = self.target.capacity
        if capacity is None:
            return Expect(OK, "ingest-replies-in-order", how, tuple(records))
        if self.target.fresh:  # the model knows the fill exactly
            reply = OK if self.accepted + self._planned < capacity else ERROR
            self._planned += reply == OK
            return Expect(reply, "ingest-backpressure", how, tuple(records))
        return Expect(None, "ingest-backpressure", how, tuple(records))

    # -- the rule ------------------------------------------------------------------------

    @rule(data=st.data(), index=st.integers(0, 2))
    def send_frames(self, data: st.DataObject, index: int) -> None:
        """Frames in one write (or cut into pieces); their replies, in order."""
        self._planned = 0
        frames = [self._frame(data) for _ in range(data.draw(st.integers(1, 4), label="count"))]
        stream = b"".join(f for f, _ in frames)
        expects = [e for _, e in frames]
        # Most runs end cleanly; some end in a framing error or end of stream.
        endings: list[Malformed | None] = [None] * 3 + [Malformed("eof", "end of stream", b"")]
        endings += self.framing
        last = endings[data.draw(st.integers(0, len(endings) - 1), label="ending")]
        if last is not None and last.reason != "eof":
            stream += last.data
            expects.append(Expect(ERROR, "ingest-framing-error", f"{last.reason}: {last.how}"))
        # Where to cut, in thousandths of the stream: its length varies from run
        # to run (random ids compress differently), the draws must not.
        per_mille = data.draw(st.lists(st.integers(1, 999), max_size=4), label="cuts (‰)")
        cuts = [len(stream) * p // 1000 for p in per_mille]
        what = ", ".join(e.what for e in expects) + ("" if last is None else f", then {last.how}")
        self.transcript.step(f"send_frames(c{index}: {what})")
        self.portal.run(self._exchange, index, stream, cuts, expects, last)

    async def _exchange(
        self,
        index: int,
        stream: bytes,
        cuts: list[int],
        expects: list[Expect],
        last: Malformed | None,
    ) -> None:
        conn, previous = await self._connection(index)
        await conn.send(stream, cuts=cuts)
        if last is not None and last.reason in ("eof", "truncated"):
            await conn.end_writes()
        got = await conn.replies(len(expects), self.timeouts.reply)
        self._check_replies(conn, got, expects, previous)
        if last is None:
            self.last_expect[index] = expects[-1]
            return
        if not await conn.closed_within(self.timeouts.close):
            rule = "ingest-replies-in-order" if last.reason == "eof" else "ingest-framing-error"
            raise self.fail(rule, f"c{index} still open {self.timeouts.close}s after {last.how}")
        self.exercised["ingest-framing-error"] += last.reason != "eof"
        del self.conns[index]
        await conn.aclose()

    async def _connection(self, index: int) -> tuple[IngestConnection, Expect | None]:
        """The connection in slot ``index``, and the last frame it carried (None: new).

        A connection idle for a good part of the page's idle timeout (10 s)
        may have been closed for that; it is replaced rather than reused.
        """
        conn = self.conns.get(index)
        if conn is not None and time.monotonic() - conn.last_used < 4.0:
            return conn, self.last_expect[index]
        if conn is not None:
            await conn.aclose()
        conn = IngestConnection(self.target, self.transcript, f"c{index}")
        await conn.open()
        self.conns[index] = conn
        return conn, None

    def _check_replies(
        self,
        conn: IngestConnection,
        got: list[bytes],
        expects: list[Expect],
        previous: Expect | None,
    ) -> None:
        for position, expect in enumerate(expects):
            if position >= len(got):
                why = "the server closed" if conn.eof else f"none within {self.timeouts.reply}s"
                message = f"{conn.label}: no reply to frame {position + 1} ({expect.what}): {why}"
                # A close right after an ERROR: that frame's rule said to stay open.
                before = expects[position - 1] if position else previous
                if conn.eof and before is not None and before.reply != OK:
                    message += f", after {before.what}; the connection must stay open"
                    raise self.fail(before.rule, message)
                raise self.fail(expect.rule, message)
            reply = got[position]
            if reply not in (OK, ERROR):
                raise self.fail(
                    expect.rule, f"{conn.label}: reply {reply!r} is neither OK nor ERROR"
                )
            self._take(conn, position, reply, expect)

    def _take(self, conn: IngestConnection, position: int, reply: bytes, expect: Expect) -> None:
        """Compare one reply with the model, and move the model on."""
        wanted = expect.reply
        if wanted is None:  # a payload at unknown fill: OK until the first refusal
            wanted = ERROR if self.full else reply
        if reply != wanted:
            raise self.fail(
                expect.rule,
                f"{conn.label}: frame {position + 1} ({expect.what}) got {reply.decode()}, "
                f"expected {wanted.decode()}",
            )
        self.exercised[expect.rule] += 1
        if not expect.records:
            return
        capacity = self.target.capacity
        if reply == OK:
            self.accepted += 1
            self.acked.update(r["cid"] for r in expect.records)
            if capacity is not None and self.accepted > capacity:
                raise self.fail(
                    "ingest-backpressure",
                    f"{self.accepted} payloads accepted by a buffer that holds {capacity}",
                )
        elif capacity is not None:
            self.full = True

    # -- the end -------------------------------------------------------------------------

    def teardown(self) -> None:
        failing = sys.exception() is not None
        try:
            if not failing and self.target.capacity is None:
                self._check_stored()
        finally:
            try:
                self.portal.run(self._close_all)
            finally:
                self._target_cm.__exit__(None, None, None)

    async def _close_all(self) -> None:
        for conn in self.conns.values():
            await conn.aclose()

    def _check_stored(self) -> None:
        """Every record of a payload answered OK stored once, as sent."""
        if self.hooks.stored_events is None or not self.acked:
            return
        problem = landing_problem(
            self.hooks,
            self.timeouts,
            key="cid",
            prefix=f"{self.prefix}.",
            sent=self.sent,
            acked=self.acked,
        )
        if problem is not None:
            raise self.fail("ingest-acked-land-once", problem)
        self.exercised["ingest-acked-land-once"] += 1


def ingest_machine(
    targets: IngestTarget | Callable[[], AbstractContextManager[IngestTarget]],
    hooks: Hooks,
    portal: TrioPortal,
    timeouts: Timeouts | None = None,
) -> type[IngestMachine]:
    """The machine class for one target, or for a fresh target per example (a factory)."""
    if isinstance(targets, IngestTarget):
        fixed = targets

        def factory() -> AbstractContextManager[IngestTarget]:
            return nullcontext(fixed)

    else:
        factory = targets
    attributes = {
        "targets": staticmethod(factory),
        "hooks": hooks,
        "portal": portal,
        "timeouts": timeouts or Timeouts(),
        "exercised": Counter(),
        "failures": [],
    }
    return type("IngestProtocol", (IngestMachine,), attributes)

"""Agent protocol v2 as a Hypothesis state machine, against a live brain.

The reference model is small: which workers are connected, which batches
each has sent and which acks it has seen, which events were acknowledged,
and where each minted command stands. Rules send what an agent may send
(and much it may not); after every step the model takes in what the brain
sent back, and a difference is a `Violation` of the rule it breaks.

Checks that need the brain to have *finished* something (acks owed,
events stored, commands in a final state) run in `teardown`, which first
drives the example to a quiet end: acks awaited, commands answered.

Timing: the suite waits for a brain to do what it must (an ack, a close),
up to the limits in `Timeouts`; it never needs a brain to be slow.
"""

from __future__ import annotations

import itertools
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import trio
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from .agent_client import AgentConnection
from .agent_violations import ON_HELLO, hello_message, violations_for
from .agent_wire import Signer, iso_now
from .portal import TaskGroup, TrioPortal
from .stored import landing_problem
from .strategies import ChoiceCount, extras
from .target import AgentTarget, Hooks, Timeouts, wait_for
from .transcript import Transcript, Violation

__all__ = ["AgentMachine", "agent_machine"]

# A connection closed this recently may still count toward the worker cap:
# the brain forgets it a moment after the close handshake (a long moment on
# a busy machine; a 4429 is only retried within it, so this costs a correct
# brain nothing).
LINGER_SECONDS = 10.0
# Commands one example mints: each may cost a sweep's wait on brains that
# deliver out-of-band commands late, and two already interleave.
MAX_COMMANDS = 3
# Non-ASCII text in every event and command: signatures are over unescaped
# UTF-8. Fixed, not drawn: unknown fields carry drawn text, and fewer draws
# make failures shrink faster.
NOTE = "événement ✓ 😀"


@attrs.define(eq=False)
class Worker:
    """The model of one connection the brain should hold open."""

    name: str
    conn: AgentConnection
    pending: dict[str, str] = attrs.field(factory=dict)  # frame id -> batch, not acked yet
    acked: set[str] = attrs.field(factory=set)  # frame ids acked on this connection
    seen: int = 0  # frames of conn.received taken into the model
    problems_seen: int = 0
    deliveries: Counter[str] = attrs.field(factory=Counter)  # command id -> times received
    # The rule that a close now would break: what the last frames exercised.
    exercising: str = "batch-acked-once"


@attrs.define(eq=False)
class Command:
    id: str
    action: str
    parameters: dict[str, Any]
    delivered_to: list[Worker] = attrs.field(factory=list)
    claim: Any = None  # the delivery_claim_token to echo
    holder: str | None = None  # the worker that acked it: only it may answer
    acked: bool = False  # our command_ack was sent and the brain has read it
    answered: str | None = None  # the status of our command_result


class AgentMachine(RuleBasedStateMachine):
    """Configured by `agent_machine`; one instance per Hypothesis example."""

    target: ClassVar[AgentTarget]
    hooks: ClassVar[Hooks]
    timeouts: ClassVar[Timeouts]
    portal: ClassVar[TrioPortal]
    exercised: ClassVar[Counter[str]]  # rule -> checks passed, over the whole run
    # (steps, transcript lines) of each failing example run (the bite tests read it).
    failures: ClassVar[list[tuple[str, int, int | None]]]

    def __init__(self) -> None:
        super().__init__()
        self.choices = ChoiceCount()  # recorded with each failure, for the bite tests
        self.transcript = Transcript()
        self.prefix = secrets.token_hex(4)  # ids unique across examples and runs
        self.names = itertools.count()
        self.group: TaskGroup = self.portal.task_group()
        self.workers: dict[str, Worker] = {}
        self.closed_at: list[float] = []  # when connections we held ended (monotonic)
        self.conns: list[AgentConnection] = []  # every connection opened, to close at the end
        self.sessions: set[str] = set()
        self.identity: tuple[Any, Any] | None = None  # (agent_id, project_id)
        self.batches: dict[str, list[dict[str, Any]]] = {}
        self.sent_events: dict[str, dict[str, Any]] = {}
        self.acked_events: set[str] = set()
        self.commands: dict[str, Command] = {}  # in minting order
        self.unawaited = False  # batches sent whose acks no rule has waited for yet
        self.problems: list[tuple[str, str]] = []  # (rule, what): raised in teardown
        self.strangers: list[tuple[Worker, str, Any]] = []  # earlier examples' commands

    # -- helpers -------------------------------------------------------------------------

    def fail(self, rule: str, message: str) -> Violation:
        self.transcript.add("", "!", f"[{rule}] {message}")
        violation = Violation(rule, message, self.transcript)
        violation.choices = self.choices()
        self.failures.append((rule, violation.steps, violation.choices))
        return violation

    def step(self, what: str) -> None:
        self.transcript.step(what)

    def _pool(self) -> int:
        cap = self.target.worker_cap
        return cap + 1 if cap is not None and cap <= 5 else 4

    def _new_name(self, kind: str) -> str:
        return f"{kind}{next(self.names)}"

    async def _until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Take in what arrives until ``predicate()`` holds; False after ``timeout``."""
        with trio.move_on_after(timeout):
            while True:
                self._absorb_all()
                if predicate():
                    return True
                await trio.sleep(0.005)
        self._absorb_all()
        return predicate()

    def _just_closed(self) -> bool:
        return any(time.monotonic() - at < LINGER_SECONDS for at in self.closed_at)

    # -- taking in what the brain sent -----------------------------------------------------
    #
    # When a frame of the brain arrives depends on timing, so a wrong one is
    # noted in `problems` and raised at the end (teardown): the failure then
    # happens at the same step in every run of an example, which shrinking
    # needs. A close is different: every send is followed by a fence, so a
    # connection the brain closes is seen closed in the step that caused it.

    def note(self, rule: str, message: str) -> None:
        self.transcript.add("", "!", f"[{rule}] {message}")
        self.problems.append((rule, message))

    def _absorb_all(self) -> None:
        for worker in list(self.workers.values()):
            self._absorb(worker)
            if worker.conn.closed.is_set():
                code = worker.conn.close_code
                raise self.fail(
                    worker.exercising,
                    f"{worker.name} was closed with {code} although every frame it sent was valid",
                )

    def _absorb(self, worker: Worker) -> None:
        conn = worker.conn
        for broken, what in conn.problems[worker.problems_seen :]:
            self.problems.append((broken, f"{worker.name}: {what}"))
        worker.problems_seen = len(conn.problems)
        while worker.seen < len(conn.received):
            frame = conn.received[worker.seen]
            worker.seen += 1
            self.exercised.update(["brain-frames-signed", "seq-monotonicity"])
            kind = frame.get("type")
            if kind == "event_batch_ack":
                self._on_ack(worker, frame)
            elif kind == "command":
                self._on_command(worker, frame)

    def _on_ack(self, worker: Worker, frame: dict[str, Any]) -> None:
        payload = frame.get("payload")
        payload = payload if isinstance(payload, dict) else {}
        acked_id = payload.get("acked_id")
        if acked_id in worker.pending:
            batch = worker.pending.pop(acked_id)
            worker.acked.add(acked_id)
            n = len(self.batches[batch])
            counts = (payload.get("received"), payload.get("accepted"), payload.get("rejected"))
            if counts != (n, n, 0):
                self.note(
                    "batch-acked-once",
                    f"the ack of {acked_id!r} ({n} events) says received, accepted, rejected = "
                    f"{counts}; expected ({n}, {n}, 0)",
                )
            self.acked_events.update(event["id"] for event in self.batches[batch])
            self.exercised["batch-acked-once"] += 1
        elif acked_id in worker.acked:
            self.note("batch-acked-once", f"a second ack for batch {acked_id!r} on {worker.name}")
        else:
            self.note(
                "batch-acked-once", f"an ack for {acked_id!r}, which {worker.name} never sent"
            )

    def _on_command(self, worker: Worker, frame: dict[str, Any]) -> None:
        command = self.commands.get(frame.get("id"))  # type: ignore[arg-type]
        if command is None:  # left pending by an earlier example that failed
            self.transcript.add(worker.name, "!", "a command this example did not mint: ignored")
            payload = frame.get("payload")
            claim = payload.get("delivery_claim_token") if isinstance(payload, dict) else None
            self.strangers.append((worker, str(frame.get("id")), claim))
            return
        rule = "command-delivered-once"
        worker.deliveries[command.id] += 1
        payload = frame.get("payload")
        payload = payload if isinstance(payload, dict) else {}
        if worker.deliveries[command.id] > 1:
            self.note(rule, f"command {command.id} came twice on {worker.name}")
        elif command.acked:
            self.note(rule, f"command {command.id} came again after the brain read its ack")
        elif command.answered:
            self.note(rule, f"command {command.id} came again after its result")
        elif payload.get("action") != command.action:
            self.note(
                rule,
                f"command {command.id} has action {payload.get('action')!r}, minted "
                f"as {command.action!r}",
            )
        elif payload.get("parameters") != command.parameters:
            self.note(rule, f"command {command.id} lost its parameters: {payload!r}")
        else:
            command.delivered_to.append(worker)
            command.claim = payload.get("delivery_claim_token")
            self.exercised[rule] += 1

    def _retire(self, worker: Worker) -> None:
        """The connection is gone: acks it owed are lost; its commands need a new home."""
        self._absorb(worker)
        del self.workers[worker.name]
        self.closed_at.append(time.monotonic())
        for command in self.commands.values():
            if worker in command.delivered_to:
                command.delivered_to.remove(worker)

    # -- connecting ------------------------------------------------------------------------

    async def _open(
        self, name: str, first: bytes, *, token: str | None = None, keepalive: bool = True
    ) -> AgentConnection:
        conn = AgentConnection(self.target, self.transcript, name, keepalive=keepalive)
        self.conns.append(conn)
        await conn.open(self.group.nursery, first, token=token)
        await conn.wait_hello_ack(self.timeouts.reply)
        return conn

    async def _open_worker(
        self, name: str, extra: dict[str, Any], *, keepalive: bool = True
    ) -> AgentConnection:
        """Open a connection for a worker that fits under the cap.

        The brain forgets a closed connection a moment after the close
        handshake, so just after one closed a 4429 is retried for a while.
        """
        deadline = time.monotonic() + LINGER_SECONDS
        while True:
            conn = await self._open(name, hello_message(name, extra=extra), keepalive=keepalive)
            refused = await conn.wait_closed(0) == 4429 and conn.hello_ack is None
            if not (refused and self._just_closed() and time.monotonic() < deadline):
                return conn
            self.transcript.add(name, "!", "refused 4429 just after a close: trying again")
            await trio.sleep(0.1)

    async def _connect(self, name: str, extra: dict[str, Any]) -> None:
        old = self.workers.get(name)
        cap = self.target.worker_cap
        live = len(self.workers)
        if old is None and cap is not None and live >= cap:
            conn = await self._open(name, hello_message(name, extra=extra))
            if conn.hello_ack is not None:
                raise self.fail(
                    "worker-cap-4429",
                    f"{name} got hello_ack with {live} workers live and a cap of {cap}",
                )
            code = await conn.wait_closed(self.timeouts.close)
            if code != 4429:
                raise self.fail(
                    "worker-cap-4429",
                    f"{name} (one worker over the cap of {cap}) was answered with "
                    f"{_outcome(conn)}; expected close 4429",
                )
            self.exercised["worker-cap-4429"] += 1
            return
        conn = await self._open_worker(name, extra)
        rule = "unknown-fields-ignored" if extra else "handshake"
        if not conn.opened():
            raise self.fail(rule, f"hello from {name} was answered with {_outcome(conn)}")
        self._check_hello_ack(name, conn)
        # The hello proves only the token: a connection takes its worker's
        # slot (replacing an older one, getting commands) with its first
        # signed frame, which agents send at once.
        await conn.prove()
        self.group.nursery.start_soon(conn.keep_alive)
        worker = Worker(name=name, conn=conn)
        if old is not None:
            self._absorb(old)
            code = await old.conn.wait_closed(self.timeouts.close)
            if code != 4002:
                what = "stayed open" if code is None else f"was closed with {code}"
                raise self.fail(
                    "replaced-4002",
                    f"the older connection of {name} {what} when a new one connected",
                )
            self._retire(old)
            self.exercised["replaced-4002"] += 1
        self.workers[name] = worker

    def _check_hello_ack(self, name: str, conn: AgentConnection) -> None:
        ack = conn.hello_ack or {}
        problems = []
        if ack.get("protocol_version") != "2":
            problems.append(f"protocol_version {ack.get('protocol_version')!r}")
        for field in ("agent_id", "project_id", "session_id"):
            value = ack.get(field)
            if not isinstance(value, str) or not 0 < len(value) <= 64:
                problems.append(f"{field} {value!r}")
        for field, least in (("heartbeat_interval_seconds", 1), ("max_frame_size_bytes", 1024)):
            value = ack.get(field)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                problems.append(f"{field} {value!r}")
        session = ack.get("session_id")
        if session in self.sessions:
            problems.append(f"session_id {session!r} was used by an earlier connection")
        identity = (ack.get("agent_id"), ack.get("project_id"))
        if self.identity is not None and identity != self.identity:
            problems.append(f"agent and project {identity} differ from before {self.identity}")
        if problems:
            raise self.fail("handshake", f"hello_ack to {name}: " + "; ".join(problems))
        self.sessions.add(str(session))
        self.identity = identity
        self.exercised["handshake"] += 1

    def _max_frame(self) -> int:
        for worker in self.workers.values():
            if worker.conn.hello_ack:
                return int(worker.conn.hello_ack["max_frame_size_bytes"])
        return 1024 * 1024

    @initialize()
    def first_worker(self) -> None:
        self.step("first_worker()")
        self.portal.run(self._connect, "w0", {})

    @rule(index=st.integers(0, 5), extra=st.just({}) | extras())
    def connect(self, index: int, extra: dict[str, Any]) -> None:
        """A worker connects: a new one, a replacement (4002), or one over the cap (4429)."""
        name = f"w{index % self._pool()}"
        self.step(f"connect({name}{', with unknown hello fields' if extra else ''})")
        self.portal.run(self._connect, name, extra)

    @precondition(lambda self: bool(self.workers))
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        worker = self._pick(data)
        self.step(f"disconnect({worker.name})")

        async def close() -> None:
            await worker.conn.close()
            self._retire(worker)

        self.portal.run(close)

    # -- events ----------------------------------------------------------------------------

    def _new_batch(self, events: list[dict[str, Any]]) -> str:
        name = self._new_name("b")
        self.batches[name] = events
        return name

    def _new_events(self, count: int, fields: dict[str, Any]) -> list[dict[str, Any]]:
        events = []
        for _ in range(count):
            event_id = f"{self.prefix}.{next(self.names)}"
            event = {"id": event_id, "kind": "conformance", "occurred_at": iso_now(), **fields}
            self.sent_events[event_id] = event
            events.append(event)
        return events

    async def _send_batch(
        self,
        worker: Worker,
        batch: str,
        *,
        seq_step: int = 1,
        extra: dict[str, Any] | None = None,
        payload_extra: dict[str, Any] | None = None,
        wait: bool = False,
    ) -> None:
        payload = {"events": self.batches[batch], **(payload_extra or {})}
        worker.pending[batch] = batch
        self.unawaited = self.unawaited or not wait
        await worker.conn.send_signed(
            "event_batch", payload, frame_id=batch, seq_step=seq_step, extra=extra
        )
        if wait:
            await self._await_ack(worker, batch)
        else:
            await self._fence(worker)  # its ack may come later; a close must come now

    async def _await_ack(self, worker: Worker, batch: str) -> None:
        if not await self._until(lambda: batch not in worker.pending, self.timeouts.reply):
            raise self.fail(
                "batch-acked-once",
                f"batch {batch!r} on {worker.name} not acknowledged within {self.timeouts.reply}s",
            )

    async def _fence(self, worker: Worker) -> None:
        """An empty batch, acked once the brain has read every frame before it."""
        await self._send_batch(worker, self._new_batch([]), wait=True)

    def _pick(self, data: st.DataObject) -> Worker:
        return self.workers[data.draw(st.sampled_from(sorted(self.workers)), label="worker")]

    @precondition(lambda self: bool(self.workers))
    @rule(
        data=st.data(),
        size=st.integers(0, 4),
        seq_step=st.integers(1, 3),
        wait=st.booleans(),
    )
    def send_batch(self, data: st.DataObject, size: int, seq_step: int, wait: bool) -> None:
        """A new batch of events; its ack may be awaited now or later (pipelining)."""
        worker = self._pick(data)
        batch = self._new_batch(self._new_events(size, {"data": {"note": NOTE, "size": size}}))
        self.step(f"send_batch({worker.name}, {batch}: {size} events, seq +{seq_step})")
        worker.exercising = "seq-monotonicity" if seq_step > 1 else "batch-acked-once"
        self.portal.run(lambda: self._send_batch(worker, batch, seq_step=seq_step, wait=wait))

    @precondition(lambda self: bool(self.workers) and bool(self.sent_events))
    @rule(data=st.data())
    def resend_events(self, data: st.DataObject) -> None:
        """Events sent before (acked or not, from any connection) go again in a new batch."""
        worker = self._pick(data)
        ids = data.draw(
            st.lists(st.sampled_from(sorted(self.sent_events)), min_size=1, max_size=4),
            label="event ids",
        )
        batch = self._new_batch([self.sent_events[i] for i in ids])
        self.step(f"resend_events({worker.name}, {batch}: {ids})")
        worker.exercising = "batch-acked-once"
        self.portal.run(self._send_batch, worker, batch)

    @precondition(lambda self: self.unawaited and bool(self.workers))
    @rule()
    def await_acks(self) -> None:
        """Every batch sent on an open connection is acknowledged."""
        self.step("await_acks()")
        self.unawaited = False

        async def all_acked() -> None:
            for worker in list(self.workers.values()):
                for batch in list(worker.pending):
                    await self._await_ack(worker, batch)

        self.portal.run(all_acked)

    @precondition(lambda self: bool(self.workers))
    @rule(
        data=st.data(),
        where=st.sampled_from(["envelope", "batch payload", "event", "heartbeat payload"]),
        fields=extras(),
    )
    def send_unknown_fields(self, data: st.DataObject, where: str, fields: dict[str, Any]) -> None:
        """Unknown fields anywhere in a valid frame are ignored (and signed over)."""
        worker = self._pick(data)
        self.step(f"send_unknown_fields({worker.name}, in the {where})")
        worker.exercising = "unknown-fields-ignored"

        async def send() -> None:
            if where == "heartbeat payload":
                payload = {"buffer_size": 0, "dropped_events": 0, **fields}
                await worker.conn.send_signed("heartbeat", payload)
                await self._fence(worker)
            else:
                event_fields = fields if where == "event" else {}
                batch = self._new_batch(self._new_events(1, event_fields))
                await self._send_batch(
                    worker,
                    batch,
                    extra=fields if where == "envelope" else None,
                    payload_extra=fields if where == "batch payload" else None,
                )
            self.exercised["unknown-fields-ignored"] += 1

        self.portal.run(send)

    # -- frames that must close the connection ----------------------------------------------

    # One rule per protocol rule, each drawing one of its variants (in
    # agent_violations.py). A valid empty batch goes right behind the
    # offending frame: a brain that closes never answers it, one that did not
    # close answers it at once, so no example waits out a timeout.

    def _violate(self, data: st.DataObject, rule_name: str) -> None:
        violations = violations_for(self.target)
        variants = sorted(k for k, v in violations.items() if v.rule == rule_name)
        entry = violations[data.draw(st.sampled_from(variants), label="variant")]
        worker = self._pick(data)
        self.step(f"{entry.rule}({worker.name}: {entry.how})")
        limit = self._max_frame()
        probe = self._new_batch([])
        worker.pending[probe] = probe

        def build(signer: Signer) -> list[Any]:
            built = entry.build(signer, limit)
            messages = built if isinstance(built, list) else [built]
            return [*messages, signer.frame("event_batch", {"events": []}, frame_id=probe)]

        # The step line names the violation; the probe's line says what it is for.

        async def send() -> None:
            await worker.conn.send_built(
                build, note="a valid frame behind it: closed, or answered?"
            )
            conn = worker.conn
            await conn.wait(
                lambda: conn.closed.is_set() or _acked(conn, probe), self.timeouts.close
            )
            self._retire(worker)
            expected = " or ".join(map(str, sorted(entry.codes)))
            if _acked(conn, probe):
                what = "stayed open (it answered a batch sent after it)"
            elif conn.close_code is None:
                what = f"stayed open for {self.timeouts.close}s"
            elif conn.close_code not in entry.codes:
                what = f"closed with {conn.close_code}"
            else:
                what = ""
            if what:
                raise self.fail(
                    entry.rule, f"{worker.name} {what} after {entry.how}; expected close {expected}"
                )
            self.exercised[entry.rule] += 1

        self.portal.run(send)

    @precondition(lambda self: bool(self.workers))
    @rule(data=st.data())
    def signature_rejection(self, data: st.DataObject) -> None:
        self._violate(data, "signature-rejection")

    @precondition(lambda self: bool(self.workers))
    @rule(data=st.data())
    def replay_rejection(self, data: st.DataObject) -> None:
        self._violate(data, "replay-rejection")

    @precondition(lambda self: bool(self.workers))
    @rule(data=st.data())
    def oversize(self, data: st.DataObject) -> None:
        self._violate(data, "oversize-1009")

    @precondition(lambda self: bool(self.workers))
    @rule(data=st.data())
    def unexpected_frame(self, data: st.DataObject) -> None:
        self._violate(data, "unexpected-frame-1002")

    @precondition(lambda self: bool(self.workers))
    @rule(data=st.data())
    def bad_frame(self, data: st.DataObject) -> None:
        self._violate(data, "bad-frame-1007")

    @precondition(lambda self: bool(self.workers))
    @rule(data=st.data())
    def signed_frame_v1(self, data: st.DataObject) -> None:
        self._violate(data, "version-4426")

    @precondition(
        lambda self: (
            bool(self.workers)
            and any(v.rule == "rate-limit-4429" for v in violations_for(self.target).values())
        )
    )
    @rule(data=st.data())
    def over_rate(self, data: st.DataObject) -> None:
        self._violate(data, "rate-limit-4429")

    # Connections the brain must not open. Like the rules above, these need a
    # live worker first, so that after a close the machine reconnects.

    def _refused(self, data: st.DataObject, rule_name: str) -> None:
        variants = sorted(k for k, r in ON_HELLO.items() if r.rule == rule_name)
        entry = ON_HELLO[data.draw(st.sampled_from(variants), label="variant")]
        name = self._new_name("x")
        self.step(f"{entry.rule}({name}: {entry.how})")

        async def send() -> None:
            conn = await self._open(name, entry.first(name), token=entry.token)
            if conn.hello_ack is None:
                await conn.wait_closed(self.timeouts.close)
            if conn.hello_ack is not None or not (
                conn.http_status in entry.http or conn.close_code in entry.answers
            ):
                expected = " or ".join(
                    [f"HTTP {s}" for s in sorted(entry.http)]
                    + [f"close {c}" for c in sorted(entry.answers)]
                )
                await conn.abort()
                raise self.fail(
                    entry.rule,
                    f"{entry.how} was answered with {_outcome(conn)}; expected {expected}",
                )
            self.exercised[entry.rule] += 1

        self.portal.run(send)

    @precondition(lambda self: bool(self.workers))
    @rule(data=st.data())
    def bad_token(self, data: st.DataObject) -> None:
        self._refused(data, "bad-token-refused")

    @precondition(lambda self: bool(self.workers))
    @rule(data=st.data())
    def hello_wrong_version(self, data: st.DataObject) -> None:
        self._refused(data, "version-4426")

    @precondition(lambda self: bool(self.workers))
    @rule(data=st.data())
    def first_frame_not_hello(self, data: st.DataObject) -> None:
        self._refused(data, "unexpected-frame-1002")

    # -- commands --------------------------------------------------------------------------

    def _undelivered(self) -> list[Command]:
        """Commands the brain still owes a live worker: not answered, not acked, not held."""
        return [
            c
            for c in self.commands.values()
            if not c.answered and not c.acked and not c.delivered_to
        ]

    async def _await_delivery(self) -> None:
        """Every command owed reaches a live worker; a second copy would come before a fence."""
        if not self.workers:
            return
        owed = self._undelivered()
        if not await self._until(lambda: not self._undelivered(), self.timeouts.delivery):
            missing = ", ".join(c.id for c in self._undelivered())
            raise self.fail(
                "command-delivered-once",
                f"command {missing} not delivered within {self.timeouts.delivery}s "
                f"although {', '.join(sorted(self.workers))} are connected",
            )
        for worker in {w for c in owed for w in c.delivered_to}:
            await self._fence(worker)

    @precondition(
        lambda self: (
            bool(self.workers)
            and self.hooks.mint_command is not None
            and len(self.commands) < MAX_COMMANDS
        )
    )
    @rule(n=st.integers(0, 1000))
    def mint_command(self, n: int) -> None:
        """An operator mints a command; it must reach one of the live workers.

        Delivery is awaited by the rules that need it (and at the end), so
        commands minted out of band, which a brain may pick up only at its
        next sweep, share the wait.
        """
        assert self.hooks.mint_command is not None and self.identity is not None
        parameters = {"n": n, "note": NOTE}
        command_id = self.hooks.mint_command(str(self.identity[0]), "conformance.noop", parameters)
        self.step(f"mint_command({command_id})")
        self.commands[command_id] = Command(
            id=command_id, action="conformance.noop", parameters=parameters
        )

    def _open_commands(self) -> list[Command]:
        """Commands not answered yet, in minting order (our own actions decide this)."""
        return [c for c in self.commands.values() if not c.answered]

    @precondition(lambda self: bool(self.workers) and bool(self._open_commands()))
    @rule(index=st.integers(0, 3))
    def ack_command(self, index: int) -> None:
        """The worker that holds the command acknowledges it: it is never sent again."""
        commands = self._open_commands()
        command = commands[index % len(commands)]

        async def ack() -> None:
            if command.acked:
                self.step(f"ack_command({command.id}): acked already")
                return
            await self._await_delivery()
            worker = command.delivered_to[0]
            self.step(f"ack_command({command.id} on {worker.name})")
            worker.exercising = "command-delivered-once"
            payload = {"delivery_claim_token": command.claim}
            await worker.conn.send_signed("command_ack", payload, frame_id=command.id)
            await self._fence(worker)
            command.acked = True
            command.holder = worker.name

        self.portal.run(ack)

    @precondition(lambda self: bool(self.workers) and bool(self._open_commands()))
    @rule(index=st.integers(0, 3), status=st.sampled_from(["success", "failed"]))
    def answer_command(self, index: int, status: str) -> None:
        """The worker's result ends the command: completed or failed."""
        commands = self._open_commands()
        self.portal.run(self._answer, commands[index % len(commands)], status)

    async def _answer(self, command: Command, status: str) -> None:
        """Send the result from the worker holding the command (any, once it was acked)."""
        if not command.acked:
            await self._await_delivery()
        if command.delivered_to:
            worker = command.delivered_to[0]
        else:  # acked on a connection since closed: only the same worker may answer
            assert command.holder is not None
            if command.holder not in self.workers:
                cap = self.target.worker_cap
                if cap is not None and len(self.workers) >= cap:
                    self.step(f"answer_command({command.id}): {command.holder} gone, cap full")
                    return  # cancelled at the end of the example
                self.step(f"connect({command.holder}) to answer {command.id}")
                await self._connect(command.holder, {})
            worker = self.workers[command.holder]
        self.step(f"answer_command({command.id} on {worker.name}: {status})")
        worker.exercising = "command-final-state"
        payload = {
            "status": status,
            "result": {"ok": True} if status == "success" else None,
            "error": None if status == "success" else "the conformance suite says no",
            "delivery_claim_token": command.claim,
        }
        await worker.conn.send_signed("command_result", payload, frame_id=command.id)
        await self._fence(worker)
        command.answered = status
        state_of = self.hooks.command_state
        if state_of is None:
            return
        expected = "completed" if status == "success" else "failed"
        state = await trio.to_thread.run_sync(
            wait_for, lambda: state_of(command.id) == expected, self.timeouts.state
        )
        if not state:
            now = await trio.to_thread.run_sync(state_of, command.id)
            raise self.fail(
                "command-final-state",
                f"command {command.id} is {now!r} {self.timeouts.state}s after a {status} "
                f"result; expected {expected!r}",
            )
        self.exercised["command-final-state"] += 1

    @precondition(
        lambda self: bool(self.workers) and any(not c.acked for c in self._open_commands())
    )
    @rule()
    def await_commands(self) -> None:
        """Commands whose connection closed before the ack reach another live worker."""
        self.step("await_commands()")
        self.portal.run(self._await_delivery)

    # -- after every step, and at the end -------------------------------------------------

    @invariant()
    def brain_frames_taken_in(self) -> None:
        self.portal.run_sync(self._absorb_all)

    def teardown(self) -> None:
        failing = sys.exception() is not None
        try:
            if not failing:
                if not self.problems:  # a failure found already needs no quiet end
                    self.portal.run(self._finish)
                if self.problems:
                    raise self.fail(*self.problems[0])
                self._check_stored()
        finally:
            self.portal.run(self._close_all)

    async def _finish(self) -> None:
        """A quiet end: every ack in, every command answered, no stray frame after a fence."""
        for worker in list(self.workers.values()):
            for batch in list(worker.pending):
                await self._await_ack(worker, batch)
        open_commands = [c for c in self.commands.values() if not c.answered]
        if open_commands and not self.workers:
            await self._connect("w0", {})
        await self._await_delivery()
        for command in open_commands:
            await self._answer(command, "failed")
        for worker in list(self.workers.values()):
            await self._fence(worker)

    async def _answer_leftovers(self) -> None:
        """End the commands nobody answered (an example that failed, or an earlier one's).

        Left pending, they would be delivered to the next examples' workers:
        they get a result, and are cancelled if the target can.
        """
        leftovers = [
            (c.delivered_to[0], c.id, c.claim)
            for c in self.commands.values()
            if not c.answered and c.delivered_to
        ]
        for worker, command_id, claim in leftovers + self.strangers:
            if worker.conn.opened():
                payload = {"status": "failed", "error": "left over", "delivery_claim_token": claim}
                await worker.conn.send_signed("command_result", payload, frame_id=command_id)
        cancel = self.hooks.cancel_command
        if cancel is not None:
            for command_id in [*self.commands, *(s[1] for s in self.strangers)]:
                await trio.to_thread.run_sync(cancel, command_id)
        self.strangers.clear()

    def _check_stored(self) -> None:
        """Every acknowledged event stored once, as sent; nothing stored twice."""
        if self.hooks.stored_events is None or not self.sent_events:
            return
        problem = landing_problem(
            self.hooks,
            self.timeouts,
            key="id",
            prefix=f"{self.prefix}.",
            sent=self.sent_events,
            acked=self.acked_events,
        )
        if problem is not None:
            raise self.fail("resent-events-land-once", problem)
        self.exercised["resent-events-land-once"] += 1

    async def _close_all(self) -> None:
        await self._answer_leftovers()
        with trio.move_on_after(5):
            async with trio.open_nursery() as nursery:
                for worker in self.workers.values():
                    nursery.start_soon(worker.conn.close)
        for conn in self.conns:
            await conn.abort()
        await self.group.aclose()


def _acked(conn: AgentConnection, batch: str) -> bool:
    """Whether the brain acknowledged ``batch`` on ``conn``."""
    return any(
        frame.get("type") == "event_batch_ack"
        and isinstance(frame.get("payload"), dict)
        and frame["payload"].get("acked_id") == batch
        for frame in conn.received
    )


def _outcome(conn: AgentConnection) -> str:
    if conn.http_status is not None:
        return f"HTTP {conn.http_status}"
    if conn.hello_ack is not None and not conn.closed.is_set():
        return "hello_ack"
    if conn.close_code is not None:
        after = " after hello_ack" if conn.hello_ack is not None else ""
        return f"close {conn.close_code}{after}"
    return "nothing"


def agent_machine(
    target: AgentTarget, hooks: Hooks, portal: TrioPortal, timeouts: Timeouts | None = None
) -> type[AgentMachine]:
    """The machine class bound to one target (Hypothesis builds an instance per example)."""
    attributes = {
        "target": target,
        "hooks": hooks,
        "portal": portal,
        "timeouts": timeouts or Timeouts(),
        "exercised": Counter(),
        "failures": [],
    }
    return type("AgentProtocol", (AgentMachine,), attributes)

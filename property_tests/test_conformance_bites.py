"""Every rule of the conformance suite bites.

Each test breaks one behaviour of our brain, by patching it inside the
test (nothing in the product can switch it), runs the suite against that
brain, and expects the failure to name that behaviour's rule and to carry
the transcript of a shrunk example.

The brain is shared by the module (each test gets a fresh agent). To keep
them quick, the bites run short examples, the same ones every time, give
the suite just the hooks the rule needs, and shrink a few times. Budgets are
counts (examples, successful shrinks), never seconds: a busy machine makes a
bite slower, not different.
"""

from __future__ import annotations

import functools
import gc
import gzip
import types
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
from hypothesis import Phase
from hypothesis.internal.conjecture import engine
from hypothesis.stateful import RuleBasedStateMachine

import z4j.brain.agents
import z4j.brain.http.opamp as opamp_http
import z4j.brain.opamp_fleet as opamp_fleet
import z4j.protocol.agent.connection as connection
import z4j.protocol.agent.signing as signing
import z4j.protocol.opamp.state as opamp_state
import z4j.store.sqlite
from property_tests.conformance.agent_machine import agent_machine
from property_tests.conformance.checks import CHECKS
from property_tests.conformance.ingest_machine import ingest_machine
from property_tests.conformance.opamp_machine import opamp_machine
from property_tests.conformance.portal import TrioPortal
from property_tests.conformance.profiles import machine_settings
from property_tests.conformance.rules import RULES
from property_tests.conformance.runner import all_violations, run_machine
from property_tests.conformance.target import Hooks, Timeouts
from property_tests.conformance.transcript import Transcript, Violation
from property_tests.conformance.z4j_brain import LIMITS, RATE_LIMITS, ServedBrain
from z4j.brain.agents import AgentEndpoint, Session
from z4j.brain.commands import Commands
from z4j.brain.http.opamp import OpampEndpoint
from z4j.brain.ingest import IngestServer
from z4j.brain.links import SessionTable
from z4j.brain.ratelimit import TokenBucket
from z4j.buffer import Buffer
from z4j.protocol import ingest as ingest_protocol
from z4j.protocol.agent import frames
from z4j.protocol.agent.connection import AgentProtocol
from z4j.protocol.agent.replay import ReplayGuard
from z4j.protocol.close import CloseCode
from z4j.protocol.errors import RemoteProtocolError
from z4j.protocol.opamp import Change, ServerFlag, bad_request
from z4j.protocol.opamp import opamp_pb2 as pb
from z4j.store.base import AgentLogin
from z4j.store.sqlite import SqliteStore
from z4j.testing.brain import make_config

# A broken brain may never do what the suite waits for. Closes are probed
# (a brain closes or answers the probe at once, so the bound only matters
# to a hung one: generous), but a command's state is polled: briefly, since
# our brain has stored it before it answers the suite's next frame.
QUICK = Timeouts(reply=10.0, close=10.0, delivery=10.0, state=0.1, stored=20.0, quiet=0.1)
STEPS = 10  # shorter examples than the suite's own: quicker to find and to shrink
# Shrinking stops after this many successful shrinks (Hypothesis' own limits
# are 500, and 5 minutes): with derandomized examples, the same shrunk
# failure on every run, however busy the machine.
SHRINKS = 8
# Commands are cancelled at the end of every example; the timeout only
# keeps one a broken brain left pending from reaching later examples' workers.
COMMAND_TIMEOUT = 30


@pytest.fixture(autouse=True)
def quick_shrinking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "MAX_SHRINKS", SHRINKS)


@pytest.fixture(scope="module")
def portals() -> Iterator[tuple[TrioPortal, TrioPortal]]:
    brain, suite = TrioPortal("brain"), TrioPortal("suite")
    yield brain, suite
    suite.close()
    brain.close()


@pytest.fixture(scope="module")
def shared_brain(
    portals: tuple[TrioPortal, TrioPortal], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedBrain]:
    data = tmp_path_factory.mktemp("bites")
    served = ServedBrain(make_config(data / "data", None, **LIMITS), portals[0])
    yield served
    served.close()


@pytest.fixture
def brain(shared_brain: ServedBrain) -> ServedBrain:
    shared_brain.new_agent()  # nothing one test did to its agent reaches the next
    return shared_brain


@pytest.fixture
def suite(portals: tuple[TrioPortal, TrioPortal]) -> TrioPortal:
    return portals[1]


def expect_bite(machine: type[RuleBasedStateMachine], kind: str, rule: str) -> Violation:
    """Run ``machine`` until it fails; the failure must be ``rule``'s, shrunk."""
    settings = machine_settings(
        kind,
        max_examples=200,  # stops at the first failure
        stateful_step_count=STEPS,
        database=None,
        derandomize=True,  # the same examples every run: a bite that passed keeps passing
        phases=[Phase.generate, Phase.shrink],
        print_blob=False,
    )
    with pytest.raises(Exception) as caught:
        run_machine(machine, settings)
    found = all_violations(caught.value)
    matching = [v for v in found if v.rule == rule]
    assert matching, f"expected {rule} to fail, got {[v.rule for v in found]}: {caught.value!r}"
    violation = matching[0]
    # Shrunk: Hypothesis ran variants that failed too (beyond the first
    # failure and the final replay), and shows one drawn from no more choices
    # than the first it found (choices are what it shrinks; steps may even
    # grow on the way). Examples and shrink budget are counts, so this holds,
    # or not, the same way on every run.
    failures: list[tuple[str, int, int | None]] = machine.failures  # type: ignore[attr-defined]
    ours = [f for f in failures if f[0] == rule]
    assert len(ours) > 2, f"no shrinking: {failures}"
    assert violation.transcript and violation.choices is not None, violation
    assert violation.choices <= (ours[0][2] or 0), f"larger than {ours[0]}:\n{violation}"
    return violation


def only(hooks: Hooks, *names: str) -> Hooks:
    """The suite with just the hooks a rule needs: no other rule's work slows it down."""
    return Hooks(**{name: getattr(hooks, name) for name in names})


STORE = ("stored_events", "drained")
COMMANDS = ("mint_command", "command_state", "cancel_command")


def bite_agent(
    brain: ServedBrain, suite: TrioPortal, rule: str, hooks: tuple[str, ...] = ()
) -> Violation:
    # Commands time out soon: a broken brain may leave them pending, and
    # pending ones would reach every later example's workers.
    available = brain.hooks(command_timeout=COMMAND_TIMEOUT)
    machine = agent_machine(brain.agent_target(), only(available, *hooks), suite, QUICK)
    return expect_bite(machine, "agent", rule)


def bite_ingest(
    brain: ServedBrain, suite: TrioPortal, rule: str, hooks: tuple[str, ...] = ()
) -> Violation:
    machine = ingest_machine(brain.ingest_target(), only(brain.hooks(), *hooks), suite, QUICK)
    return expect_bite(machine, "ingest", rule)


def bite_check(brain: ServedBrain, suite: TrioPortal, check: str) -> Violation:
    run = functools.partial(CHECKS[check], brain.agent_target(), brain.hooks(), QUICK)
    with pytest.raises(Violation) as caught:
        suite.run(run, Transcript())
    assert caught.value.rule == check
    assert caught.value.transcript
    return caught.value


def wrap(
    owner: Any, name: str, make: Callable[[Any], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replace ``owner.name`` by ``make(original)`` for this test only."""
    monkeypatch.setattr(owner, name, make(getattr(owner, name)))


def recode(module: Any, name: str, value: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``module`` send ``value`` where it names ``CloseCode.<name>``, for this test only."""
    codes = types.SimpleNamespace(**{code.name: code for code in CloseCode})
    setattr(codes, name, value)
    monkeypatch.setattr(module, "CloseCode", codes)


# -- agent protocol v2 ---------------------------------------------------------------


def test_handshake_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: every session gets the same session_id."""
    wrap(
        AgentProtocol,
        "accept",
        lambda accept: lambda self, **kw: accept(self, **{**kw, "session_id": "always-this-one"}),
        monkeypatch,
    )
    bite_agent(brain, suite, "handshake")


def test_brain_frames_signed_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: the brain signs its frames with a key of zeros."""
    monkeypatch.setattr(
        connection,
        "sign",
        lambda frame, key, binding, **kw: signing.sign(frame, bytes(32), binding, **kw),
    )
    bite_agent(brain, suite, "brain-frames-signed")


def test_seq_monotonicity_bites_on_the_brains_seq(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: the brain numbers every frame 1."""

    def make(send: Any) -> Any:
        def send_seq_1(self: AgentProtocol, payload: Any, *, frame_id: str | None = None) -> bytes:
            self._send_seq = 0
            return send(self, payload, frame_id=frame_id)  # type: ignore[no-any-return]

        return send_seq_1

    wrap(AgentProtocol, "send", make, monkeypatch)
    bite_agent(brain, suite, "seq-monotonicity")


def test_seq_monotonicity_bites_on_gaps(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: the brain refuses a gap in the agent's seq (gaps are allowed)."""

    def make(check: Any) -> Any:
        def no_gaps(
            self: ReplayGuard, *, seq: object, nonce: object, ts: object, now: float
        ) -> None:
            if isinstance(seq, int) and seq > self.last_seq + 1:
                raise RemoteProtocolError("gap", reason="seq_not_increasing", close_code=4403)
            check(self, seq=seq, nonce=nonce, ts=ts, now=now)

        return no_gaps

    wrap(ReplayGuard, "check", make, monkeypatch)
    bite_agent(brain, suite, "seq-monotonicity")


def test_signature_rejection_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: signatures are not checked."""
    monkeypatch.setattr(connection, "verify", lambda frame, key, binding: None)
    bite_agent(brain, suite, "signature-rejection")


def test_replay_rejection_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: no replay guard."""
    monkeypatch.setattr(ReplayGuard, "check", lambda self, **kw: None)
    bite_agent(brain, suite, "replay-rejection")


def test_batch_acked_once_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: every batch is acknowledged twice."""

    def make(buffer_batches: Any) -> Any:
        async def ack_twice(self: AgentEndpoint, session: Session, batches: Any) -> None:
            await buffer_batches(self, session, batches)
            for batch in batches:
                n = len(batch.payload.events)
                ack = frames.EventBatchAck(acked_id=batch.id, received=n, accepted=n, rejected=0)
                await session.send(ack)

        return ack_twice

    wrap(AgentEndpoint, "_buffer_batches", make, monkeypatch)
    bite_agent(brain, suite, "batch-acked-once")


def test_resent_events_land_once_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: agent events get a random idempotency key, so a re-sent event lands again."""

    def make(event_rows: Any) -> Any:
        def random_keys(buffer_id: uuid.UUID, rows: Any) -> Iterator[Any]:
            for row in event_rows(buffer_id, rows):
                if row.source == "agent":
                    row = row._replace(idempotency_key=uuid.uuid4().bytes)
                yield row

        return random_keys

    wrap(z4j.store.sqlite, "event_rows", make, monkeypatch)
    bite_agent(brain, suite, "resent-events-land-once", STORE)


def test_oversize_1009_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: hello_ack promises a 4 KiB limit the brain does not enforce."""
    wrap(
        AgentProtocol,
        "accept",
        lambda accept: lambda self, **kw: accept(self, **{**kw, "max_frame_size_bytes": 4096}),
        monkeypatch,
    )
    bite_agent(brain, suite, "oversize-1009")


def test_unknown_fields_ignored_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: payloads with a field the brain does not know are refused (1007)."""

    def make(structure: Any) -> Any:
        def strict(frame_type: str, payload: object) -> Any:
            known = {field.name for field in attrs.fields(frames.PAYLOADS[frame_type])}
            if isinstance(payload, dict) and frame_type != "agent_status" and set(payload) - known:
                raise ValueError(f"unknown fields {sorted(set(payload) - known)}")
            return structure(frame_type, payload)

        return strict

    wrap(frames, "structure_payload", make, monkeypatch)
    bite_agent(brain, suite, "unknown-fields-ignored")


@pytest.mark.parametrize(
    ("rule", "name"),
    [
        ("unexpected-frame-1002", "PROTOCOL_ERROR"),
        ("bad-frame-1007", "INVALID_DATA"),
        ("version-4426", "VERSION"),
    ],
)
def test_close_codes_of_the_protocol_core_bite(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch, rule: str, name: str
) -> None:
    """Broken: the core closes with 1011 where the page names another code."""
    recode(connection, name, CloseCode.INTERNAL_ERROR, monkeypatch)
    bite_agent(brain, suite, rule)


def test_bad_token_refused_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: an unknown token opens a session as the agent provisioned."""
    agent_id = brain.agent_id

    def make(agent_login: Any) -> Any:
        async def anyone(self: SqliteStore, token_hash: bytes) -> Any:
            found = await agent_login(self, token_hash)
            if found is not None:
                return found
            agent = await self.find_agent(agent_id)
            project = next(p for p in await self.list_projects() if p.id == agent.project_id)
            return AgentLogin(agent=agent, token_expires_at=None, project=project)

        return anyone

    wrap(SqliteStore, "agent_login", make, monkeypatch)
    bite_agent(brain, suite, "bad-token-refused")


def test_replaced_4002_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: a replaced connection is closed with 1000."""
    recode(z4j.brain.agents, "REPLACED", CloseCode.NORMAL, monkeypatch)
    bite_agent(brain, suite, "replaced-4002")


def test_worker_cap_4429_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: the cap is not enforced (the brain allows 100 workers; it says 3)."""
    # The endpoint is wired inside serve_brain, reachable from nothing public:
    # find the served brain's one instance to break it.
    (endpoint,) = [o for o in gc.get_objects() if isinstance(o, AgentEndpoint)]
    config = attrs.evolve(endpoint._config, ws_per_agent_concurrency_cap=100)
    monkeypatch.setattr(endpoint, "_config", config)
    bite_check(brain, suite, "worker-cap-4429")


def test_rate_limit_4429_bites_on_events(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: rate limits are not enforced (a batch over the events rate passes)."""
    monkeypatch.setattr(TokenBucket, "take", lambda self, count, now: True)
    bite_agent(brain, suite, "rate-limit-4429")


@pytest.fixture(scope="module")
def rate_brain(
    portals: tuple[TrioPortal, TrioPortal], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedBrain]:
    """A brain with a frame rate limit low enough that no load hides a burst."""
    data = tmp_path_factory.mktemp("rate")
    served = ServedBrain(make_config(data / "data", None, **RATE_LIMITS), portals[0])
    served.new_agent()
    yield served
    served.close()


def test_rate_limit_4429_bites_on_frames(
    rate_brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: rate limits are not enforced (a hundred seconds' worth of frames passes)."""
    monkeypatch.setattr(TokenBucket, "take", lambda self, count, now: True)
    bite_check(rate_brain, suite, "rate-limit-4429")


def test_idle_4408_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: an idle connection is closed with 1000."""
    recode(z4j.brain.agents, "IDLE", CloseCode.NORMAL, monkeypatch)
    bite_check(brain, suite, "idle-4408")


def test_revoked_4003_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: live sessions of a revoked agent are left open."""

    async def keep_them(self: SessionTable[Any], is_revoked: object, code: int) -> int:
        return 0

    monkeypatch.setattr(SessionTable, "close_revoked", keep_them)
    bite_check(brain, suite, "revoked-4003")


def test_command_delivered_once_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: every command frame is sent twice."""

    def make(send: Any) -> Any:
        async def twice(self: Session, payload: Any, *, frame_id: str | None = None) -> None:
            await send(self, payload, frame_id=frame_id)
            if isinstance(payload, frames.Command):
                await send(self, payload, frame_id=frame_id)

        return twice

    wrap(Session, "send", make, monkeypatch)
    bite_agent(brain, suite, "command-delivered-once", COMMANDS)


def test_command_final_state_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: command results are dropped, so commands never end."""

    async def drop(self: Commands, command_id: str, worker_id: str, payload: Any) -> None:
        return None

    monkeypatch.setattr(Commands, "answered", drop)
    bite_agent(brain, suite, "command-final-state", COMMANDS)


# -- ingest protocol v1 -------------------------------------------------------------------


def test_ingest_replies_in_order_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: an empty array ``[]`` is refused."""

    def make(next_event: Any) -> Any:
        def refuse_empty(self: ingest_protocol.IngestConnection) -> Any:
            event = next_event(self)
            if isinstance(event, ingest_protocol.Payload) and event.records == 0:
                return ingest_protocol.Rejected(reason="bad_json", detail="broken on purpose")
            return event

        return refuse_empty

    wrap(ingest_protocol.IngestConnection, "next_event", make, monkeypatch)
    bite_ingest(brain, suite, "ingest-replies-in-order")


def test_ingest_content_error_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: a content error is treated as a framing error (the connection closes)."""

    def make(next_event: Any) -> Any:
        def close_on_content_errors(self: ingest_protocol.IngestConnection) -> Any:
            event = next_event(self)
            if isinstance(event, ingest_protocol.Rejected):
                raise RemoteProtocolError("broken on purpose", reason=event.reason)
            return event

        return close_on_content_errors

    wrap(ingest_protocol.IngestConnection, "next_event", make, monkeypatch)
    bite_ingest(brain, suite, "ingest-content-error")


def test_ingest_framing_error_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: a framing error closes the connection without its 5:ERROR."""

    def make(answer: Any) -> Any:
        async def no_last_error(self: IngestServer, conn: Any, *args: Any) -> Any:
            replies, close = await answer(self, conn, *args)
            if close and replies and replies[-1] == ingest_protocol.ERROR:
                replies = replies[:-1]
            return replies, close

        return no_last_error

    wrap(IngestServer, "_answer", make, monkeypatch)
    bite_ingest(brain, suite, "ingest-framing-error")


def test_ingest_acked_land_once_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: the drain loses records of kind ``log``."""

    def make(event_rows: Any) -> Any:
        def lose_logs(buffer_id: uuid.UUID, rows: Any) -> Iterator[Any]:
            return (r for r in event_rows(buffer_id, rows) if (r.source, r.kind) != ("tcp", "log"))

        return lose_logs

    wrap(z4j.store.sqlite, "event_rows", make, monkeypatch)
    bite_ingest(brain, suite, "ingest-acked-land-once", STORE)


def test_ingest_backpressure_bites(
    suite: TrioPortal, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Broken: the buffer admits payloads past its capacity."""
    monkeypatch.setattr(Buffer, "admit", lambda self, n: True)
    portal = TrioPortal("stalled brains")
    try:
        factory = ServedBrain.stalled_factory(portal, tmp_path_factory.mktemp("stalled"))
        machine = ingest_machine(factory, Hooks(), suite, QUICK)
        expect_bite(machine, "backpressure", "ingest-backpressure")
    finally:
        portal.close()


# -- OpAMP -------------------------------------------------------------------------------


def _outcomes(change: Callable[[pb.AgentToServer, Any], Any]) -> Callable[[Any], Any]:
    """A wrapper of the core's `receive` that lets ``change(message, outcome)`` break it."""

    def make(receive: Any) -> Any:
        def broken(stored: Any, message: pb.AgentToServer, **kw: Any) -> Any:
            outcome = receive(stored, message, **kw)
            return change(message, outcome) or outcome

        return broken

    return make


def _no_capabilities(message: pb.AgentToServer, outcome: Any) -> None:
    outcome.reply.ClearField("capabilities")


def _never_full_state(message: pb.AgentToServer, outcome: Any) -> None:
    outcome.reply.flags &= ~ServerFlag.REPORT_FULL_STATE


def _other_uid(message: pb.AgentToServer, outcome: Any) -> None:
    outcome.reply.instance_uid = message.instance_uid[::-1]


def _config_for_all(message: pb.AgentToServer, outcome: Any) -> None:
    outcome.reply.remote_config.config_hash = bytes(32)


def _second_disconnect_refused(message: pb.AgentToServer, outcome: Any) -> Any:
    if message.HasField("agent_disconnect") and Change.CONNECTED not in outcome.changed:
        refused = bad_request("already disconnected", instance_uid=message.instance_uid)
        return attrs.evolve(outcome, reply=refused)
    return None


def bite_opamp(brain: ServedBrain, suite: TrioPortal, rule: str) -> Violation:
    """The OpAMP machine, with z4j's own rules only when ``rule`` is one of them: a
    protocol rule must catch its breakage alone, as against any server."""
    target = brain.opamp_target(z4j_policy=RULES[rule].z4j)
    # Configurations pushed only where the rule is about them (a store write each).
    hooks = brain.opamp_hooks(target) if "remote-config" in rule else Hooks()
    machine = opamp_machine(target, hooks, suite, QUICK)
    return expect_bite(machine, "opamp", rule)


@pytest.mark.parametrize(
    ("rule", "change"),
    [
        ("opamp-echo-uid", _other_uid),
        ("opamp-server-capabilities", _no_capabilities),
        ("opamp-full-state", _never_full_state),
        ("opamp-remote-config-accepted-only", _config_for_all),
        ("opamp-disconnect-idempotent", _second_disconnect_refused),
    ],
)
def test_opamp_replies_bite(
    brain: ServedBrain,
    suite: TrioPortal,
    monkeypatch: pytest.MonkeyPatch,
    rule: str,
    change: Callable[[pb.AgentToServer, Any], Any],
) -> None:
    """Broken, in what the core answers: the reply's instance_uid reversed; no server
    capabilities; ReportFullState never set; a remote configuration offered to every
    agent; a second agent_disconnect answered BAD_REQUEST."""
    wrap(opamp_fleet, "receive", _outcomes(change), monkeypatch)
    bite_opamp(brain, suite, rule)


def test_opamp_new_instance_uid_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: RequestInstanceUid is answered with the instance_uid the agent has."""

    def make(receive: Any) -> Any:
        def same_uid(stored: Any, message: pb.AgentToServer, **kw: Any) -> Any:
            return receive(
                stored, message, **{**kw, "new_instance_uid": lambda: message.instance_uid}
            )

        return same_uid

    wrap(opamp_fleet, "receive", make, monkeypatch)
    bite_opamp(brain, suite, "opamp-new-instance-uid")


def test_opamp_bad_request_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: a malformed message crashes the handler (HTTP 500)."""

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(opamp_fleet, "bad_request", crash)
    bite_opamp(brain, suite, "opamp-bad-request")


def test_opamp_unauthorized_401_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: an unknown token is taken for the last known one's project."""
    known: list[uuid.UUID] = []

    def make(opamp_token_project: Any) -> Any:
        async def anyone(self: SqliteStore, token_hash: bytes) -> Any:
            found = await opamp_token_project(self, token_hash)
            if found is not None:
                known[:] = [found]
            return found or (known[0] if known else None)

        return anyone

    wrap(SqliteStore, "opamp_token_project", make, monkeypatch)
    bite_opamp(brain, suite, "opamp-unauthorized-401")


def test_opamp_content_type_415_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: the Content-Type is not looked at."""

    def make(header: Any) -> Any:
        def any_type(headers: Any, name: bytes) -> Any:
            return opamp_http.PROTOBUF if name == b"content-type" else header(headers, name)

        return any_type

    wrap(opamp_http, "header", make, monkeypatch)
    bite_opamp(brain, suite, "opamp-content-type-415")


def test_opamp_too_large_413_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: the brain reads 64 times what it says its limit is."""
    # Wired inside serve_brain, reachable from nothing public; the module's other
    # brains have one too (broken alike: this test talks to one only).
    endpoints = [o for o in gc.get_objects() if isinstance(o, OpampEndpoint)]
    assert endpoints
    for endpoint in endpoints:
        monkeypatch.setattr(endpoint, "_limit", 64 * endpoint._limit)
    bite_opamp(brain, suite, "opamp-too-large-413")


def test_opamp_z4j_full_state_policy_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: a suspect agent is asked in up to 5 replies in a row, not 3 (a policy
    change the protocol allows: only the z4j rule sees it)."""
    monkeypatch.setattr(opamp_state, "MAX_FULL_STATE_REQUESTS", 5)
    violation = bite_opamp(brain, suite, "opamp-z4j-full-state-policy")
    assert "ask cycle 3" in violation.message, violation


def test_opamp_z4j_remote_config_offered_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: a desired configuration is offered once, and not on the next poll."""
    offered: set[bytes] = set()

    def once(message: pb.AgentToServer, outcome: Any) -> None:
        if outcome.reply.HasField("remote_config"):
            key = message.instance_uid + outcome.reply.remote_config.config_hash
            if key in offered:
                outcome.reply.ClearField("remote_config")
            offered.add(key)

    wrap(opamp_fleet, "receive", _outcomes(once), monkeypatch)
    bite_opamp(brain, suite, "opamp-z4j-remote-config-offered")


def test_opamp_z4j_bad_request_200_bites(
    brain: ServedBrain, suite: TrioPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: BAD_REQUEST comes with HTTP 400 (allowed by the protocol, not by z4j)."""

    def make(handle: Any) -> Any:
        async def status_400(self: OpampEndpoint, scope: Any, receive: Any) -> Any:
            status, headers, body = await handle(self, scope, receive)
            if status == 200 and body:
                data = gzip.decompress(body) if (b"content-encoding", b"gzip") in headers else body
                if pb.ServerToAgent.FromString(data).HasField("error_response"):
                    status = 400
            return status, headers, body

        return status_400

    wrap(OpampEndpoint, "_handle", make, monkeypatch)
    bite_opamp(brain, suite, "opamp-z4j-bad-request-200")

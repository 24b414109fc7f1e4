"""OpAMP as a Hypothesis state machine, against a live server.

The machine plays a few agents (each its own instance_uid, capabilities
and connection) and sends what agents send: status reports, whole or
compressed, in sequence or after a gap; requests for a new instance_uid;
``agent_disconnect``. Between them it sends what a server must refuse:
malformed messages, and over HTTP a missing token, the wrong content type,
a body or a gzip bomb over the size limit. With the `Hooks.opamp_config`
hook it also has the server want agents to run a configuration, and some
agents report it applied. Every reply is checked against
the rules of opamp-spec that hold for any server (`rules.py`), and, for a
target that asks for it (``z4j_policy``), against z4j's exact policy.

The model per agent is what the server can know: the last sequence number
it answered, and whether it holds the agent's full status (``good``): yes
after a full report in sequence, no after a compressed report that follows
a gap, unknown otherwise (after a disconnect, a new instance_uid, or a full
report after a gap, a server may or may not start over). A rule is checked
only where the model knows the answer. z4j's exact policy assumes one
server process that has heard every message of the agent (a z4j brain asks
once more when another process, or itself after a restart, answers).
"""

from __future__ import annotations

import secrets
from collections import Counter
from typing import ClassVar

import attrs
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from z4j.protocol.opamp import opamp_pb2 as pb

from .opamp_client import HttpTransport, OpampReply, OpampTransport, open_transport
from .opamp_wire import (
    ACCEPTS_REMOTE_CONFIG,
    ACCEPTS_STATUS,
    BAD_REQUEST,
    REMOTE_CONFIG_APPLIED,
    REPORT_FULL_STATE,
    REPORTS_EFFECTIVE_CONFIG,
    REPORTS_HEALTH,
    REPORTS_HEARTBEAT,
    REPORTS_REMOTE_CONFIG,
    REPORTS_STATUS,
    REQUEST_INSTANCE_UID,
    UID_BYTES,
    full_parts,
    gzip_bomb,
    show_request,
)
from .portal import TrioPortal
from .strategies import ChoiceCount
from .target import Hooks, OpampTarget, Timeouts
from .transcript import Transcript, Violation

__all__ = ["OpampMachine", "opamp_machine"]

MAX_AGENTS = 3
# z4j asks a suspect agent in at most this many replies in a row, then one
# reply goes without (z4j/protocol/opamp/state.py, rule 5).
Z4J_MAX_ASKS = 3

OPTIONAL_CAPS = [
    ACCEPTS_REMOTE_CONFIG,
    REPORTS_EFFECTIVE_CONFIG,
    REPORTS_HEALTH,
    REPORTS_REMOTE_CONFIG,
    REPORTS_HEARTBEAT,
]
CAPABILITIES = st.lists(st.sampled_from(OPTIONAL_CAPS), unique=True).map(
    lambda bits: REPORTS_STATUS | sum(bits)
)
# How a message's sequence number follows the previous one.
SEQ_STEPS = st.sampled_from(["next", "next", "gap", "repeat"])
MALFORMED = [
    "random bytes",
    "cut short",
    "instance_uid not 16 bytes",
    "invalid UTF-8 in a string",
    "wrong wire type",
]
REFUSALS = [
    ("opamp-unauthorized-401", "no token"),
    ("opamp-unauthorized-401", "unknown token"),
    ("opamp-content-type-415", "application/json"),
    ("opamp-content-type-415", "text/plain"),
    ("opamp-content-type-415", "no Content-Type"),
    ("opamp-too-large-413", "body over the limit"),
    ("opamp-too-large-413", "gzip bomb"),
]


@attrs.define(eq=False)
class Agent:
    """One agent as the server should see it."""

    name: str
    uid: bytes
    capabilities: int
    transport: OpampTransport
    seq: int | None = None  # the last sequence number the server answered
    heard: bool = False  # the server has answered this instance_uid before
    good: bool | None = None  # the server holds our full status (None: unknown)
    version: int = 0  # changes the status we report
    # z4j's policy: 0 when nothing is missing, else the place in its ask cycle.
    z4j_requests: int = 0
    # Remote configuration: whether the server wants this agent to run one
    # (through the hook), its hash once known, and the hash we reported APPLIED.
    desired: bool = False
    desired_hash: bytes | None = None
    applied: bytes | None = None

    @property
    def accepts_config(self) -> bool:
        return bool(self.capabilities & ACCEPTS_REMOTE_CONFIG)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


class OpampMachine(RuleBasedStateMachine):
    """Configured by `opamp_machine`; one instance per Hypothesis example."""

    target: ClassVar[OpampTarget]
    hooks: ClassVar[Hooks]
    timeouts: ClassVar[Timeouts]
    portal: ClassVar[TrioPortal]
    exercised: ClassVar[Counter[str]]  # rule -> checks passed, over the whole run
    # (rule, steps, choices) of each failing example run (the bite tests read it).
    failures: ClassVar[list[tuple[str, int, int | None]]]

    def __init__(self) -> None:
        super().__init__()
        self.choices = ChoiceCount()
        self.transcript = Transcript()
        self.prefix = secrets.token_hex(4)
        self.agents: list[Agent] = []
        self.uids: set[bytes] = set()  # every instance_uid used or given
        self.transports: list[OpampTransport] = []
        self.stranger = self._transport("x")  # for what must be refused
        # The same, for the rules of the plain HTTP transport (None over another).
        self.http = self.stranger if isinstance(self.stranger, HttpTransport) else None

    # -- helpers -------------------------------------------------------------------------

    def fail(self, rule: str, message: str) -> Violation:
        self.transcript.add("", "!", f"[{rule}] {message}")
        violation = Violation(rule, message, self.transcript)
        violation.choices = self.choices()
        self.failures.append((rule, violation.steps, violation.choices))
        return violation

    def _transport(self, label: str) -> OpampTransport:
        transport = open_transport(self.target, self.transcript, label, self.timeouts.reply)
        self.transports.append(transport)
        return transport

    def _new_uid(self) -> bytes:
        uid = secrets.token_bytes(UID_BYTES)
        self.uids.add(uid)
        return uid

    def _pick(self, data: st.DataObject) -> Agent:
        names = [agent.name for agent in self.agents]
        name = data.draw(st.sampled_from(names), label="agent")
        return next(agent for agent in self.agents if agent.name == name)

    def _message(
        self, agent: Agent, seq: int, parts: tuple[str, ...], *, flags: int = 0
    ) -> pb.AgentToServer:
        message = pb.AgentToServer(
            instance_uid=agent.uid, sequence_num=seq, capabilities=agent.capabilities, flags=flags
        )
        agent.version += 1
        version = agent.version
        if "agent_description" in parts:
            description = message.agent_description
            for key, value in (
                ("service.name", f"conformance-{self.prefix}"),
                ("service.instance.id", agent.name),
            ):
                description.identifying_attributes.add(key=key).value.string_value = value
            extra = description.non_identifying_attributes.add(key="conformance.version")
            extra.value.int_value = version
        if "health" in parts:
            message.health.healthy = version % 3 != 0
            message.health.status = f"status {version}"
        if "effective_config" in parts:
            file = message.effective_config.config_map.config_map["conformance.yaml"]
            file.body = f"version: {version}\n".encode()
            file.content_type = "text/yaml"
        if "remote_config_status" in parts:
            message.remote_config_status.SetInParent()
            if agent.applied is not None:
                message.remote_config_status.last_remote_config_hash = agent.applied
                message.remote_config_status.status = REMOTE_CONFIG_APPLIED
        return message

    def _seq(self, agent: Agent, data: st.DataObject) -> int:
        step = data.draw(SEQ_STEPS, label="sequence")
        if agent.seq is None:
            return 0 if step != "gap" else data.draw(st.integers(1, 4), label="first seq")
        if step == "next":
            return agent.seq + 1
        if step == "repeat":
            return agent.seq
        return agent.seq + data.draw(st.integers(2, 5), label="gap")

    def _gzip(self, data: st.DataObject) -> bool:
        if self.http is None:
            return False
        return data.draw(st.booleans(), label="gzip body")

    def _send(self, agent: Agent, message: pb.AgentToServer, *, gzip_body: bool) -> OpampReply:
        reply: OpampReply = self.portal.run(
            lambda: agent.transport.exchange(
                message.SerializeToString(), what=show_request(message), gzip_body=gzip_body
            )
        )
        return reply

    # -- what every answer to a valid message must be -------------------------------------

    def _answered(
        self, agent: Agent, message: pb.AgentToServer, reply: OpampReply
    ) -> pb.ServerToAgent:
        """The ServerToAgent of a valid message, checked against the rules every reply keeps."""
        found = reply.message
        if reply.status != 200 or found is None:
            raise self.fail(
                "opamp-echo-uid", f"{agent.name}: a valid message was answered {reply.describe()}"
            )
        if found.HasField("error_response"):
            raise self.fail(
                "opamp-echo-uid",
                f"{agent.name}: a valid message got error_response "
                f"(type {found.error_response.type}: {found.error_response.error_message!r})",
            )
        if found.instance_uid != message.instance_uid:
            raise self.fail(
                "opamp-echo-uid",
                f"{agent.name}: the reply's instance_uid is {found.instance_uid.hex() or '(empty)'}"
                f", not the message's {message.instance_uid.hex()}",
            )
        self.exercised["opamp-echo-uid"] += 1
        if self.http is not None:
            if not found.capabilities & ACCEPTS_STATUS:
                raise self.fail(
                    "opamp-server-capabilities",
                    f"{agent.name}: an HTTP reply with capabilities {hex(found.capabilities)}: "
                    "AcceptsStatus missing",
                )
            self.exercised["opamp-server-capabilities"] += 1
        if self.target.z4j_policy and self.hooks.opamp_config and self.http is not None:
            self._z4j_offer(agent, message, found)  # (over a WebSocket: once per connection)
        if not agent.accepts_config:
            if found.HasField("remote_config"):
                raise self.fail(
                    "opamp-remote-config-accepted-only",
                    f"{agent.name}: remote_config sent to an agent without AcceptsRemoteConfig",
                )
            self.exercised["opamp-remote-config-accepted-only"] += 1
        self._full_state(agent, message, found)
        return found

    def _z4j_offer(self, agent: Agent, message: pb.AgentToServer, reply: pb.ServerToAgent) -> None:
        """Over HTTP, z4j offers a desired configuration in every reply to an agent that
        accepts one, until the agent reports its hash APPLIED (docs/opamp.md); never to
        one leaving."""
        if not agent.accepts_config:
            return  # the protocol rule, opamp-remote-config-accepted-only
        leaving = message.HasField("agent_disconnect")
        due = agent.desired and not leaving and agent.applied != agent.desired_hash
        offered = reply.HasField("remote_config")
        rule = "opamp-z4j-remote-config-offered"
        if offered != due:
            if not offered:
                why = "desired through the hook, not reported APPLIED"
            else:
                why = (
                    "leaving"
                    if leaving
                    else "reported APPLIED"
                    if agent.desired
                    else "none desired"
                )
            said = "offered" if offered else "not offered"
            raise self.fail(rule, f"{agent.name}: a configuration {said} ({why})")
        if offered:
            got = reply.remote_config.config_hash
            if agent.desired_hash is None:
                agent.desired_hash = got  # the hook did not say: the first offer does
            elif got != agent.desired_hash:
                raise self.fail(
                    rule,
                    f"{agent.name}: offered config_hash {got.hex()}, not the desired "
                    f"{agent.desired_hash.hex()}",
                )
        self.exercised[rule] += 1

    def _full_state(self, agent: Agent, message: pb.AgentToServer, reply: pb.ServerToAgent) -> None:
        """ReportFullState where the model knows it is due or not; the model moves on."""
        asked = bool(reply.flags & REPORT_FULL_STATE)
        seq = message.sequence_num
        leaving = message.HasField("agent_disconnect")
        complete = all(message.HasField(part) for part in full_parts(agent.capabilities))
        in_sequence = seq == 0 if agent.seq is None else seq == agent.seq + 1
        if not leaving:
            must: bool | None = None
            why = ""
            # Not "nor the messages in sequence after it": a server that restarted, or
            # another replica, may ask once more without having missed anything.
            if complete and in_sequence:
                must, why = False, "a full report in sequence"
            elif not complete and not in_sequence and (agent.good or (not agent.heard and seq)):
                previous = "never heard of" if agent.seq is None else f"previous {agent.seq}"
                must, why = True, f"a compressed report after a gap (seq {seq}, {previous})"
            if must is not None:
                if asked != must:
                    said = "set" if asked else "not set"
                    raise self.fail(
                        "opamp-full-state",
                        f"{agent.name}: ReportFullState {said} in the reply to {why}",
                    )
                self.exercised["opamp-full-state"] += 1
            if complete and in_sequence:
                agent.good = True
            elif not in_sequence:
                agent.good = None if complete else False
        if self.target.z4j_policy:
            self._z4j_full_state(agent, message, asked, complete=complete)
        agent.seq = seq
        agent.heard = True

    def _z4j_full_state(
        self, agent: Agent, message: pb.AgentToServer, asked: bool, *, complete: bool
    ) -> None:
        """z4j's exact policy (z4j/protocol/opamp/state.py, rule 5): ask a suspect agent in
        up to three replies in a row, then skip one; a first message with seq 0 relies on
        nothing; a disconnect is never asked anything."""
        seq = message.sequence_num
        requests = agent.z4j_requests
        leaving = message.HasField("agent_disconnect")
        if not leaving:
            in_sequence = agent.seq is not None and seq == agent.seq + 1
            if agent.seq is None:
                requests = 0 if complete or seq == 0 else 1
            elif not requests:
                requests = 0 if complete or in_sequence else 1
            elif complete or (in_sequence and message.HasField("agent_description")):
                requests = 0
            else:
                requests = requests % (Z4J_MAX_ASKS + 1) + 1
        must = not leaving and 0 < requests <= Z4J_MAX_ASKS
        if asked != must:
            said = "set" if asked else "not set"
            raise self.fail(
                "opamp-z4j-full-state-policy",
                f"{agent.name}: ReportFullState {said}; z4j's policy says "
                f"{'ask' if must else 'do not ask'} (ask cycle {agent.z4j_requests} -> {requests})",
            )
        agent.z4j_requests = requests
        self.exercised["opamp-z4j-full-state-policy"] += 1

    # -- rules ---------------------------------------------------------------------------

    @initialize(capabilities=CAPABILITIES)
    def first_agent(self, capabilities: int) -> None:
        self.new_agent(capabilities)

    @precondition(lambda self: len(self.agents) < MAX_AGENTS)
    @rule(capabilities=CAPABILITIES)
    def new_agent(self, capabilities: int) -> None:
        name = f"a{len(self.agents)}"
        agent = Agent(name, self._new_uid(), capabilities, self._transport(name))
        self.agents.append(agent)
        self.transcript.step(f"new_agent({name}, capabilities {hex(capabilities)})")

    @rule(data=st.data())
    def report(self, data: st.DataObject) -> None:
        """A status report: whole, compressed or in part; in sequence or not."""
        agent = self._pick(data)
        full = full_parts(agent.capabilities)
        if data.draw(st.booleans(), label="full report"):
            parts = full
        else:
            chosen = data.draw(st.lists(st.sampled_from(full), unique=True), label="parts")
            parts = tuple(part for part in full if part in chosen)
        seq = self._seq(agent, data)
        gzip_body = self._gzip(data)
        self.transcript.step(f"report({agent.name}: seq {seq}, {len(parts)}/{len(full)} parts)")
        message = self._message(agent, seq, parts)
        self._answered(agent, message, self._send(agent, message, gzip_body=gzip_body))

    @rule(data=st.data(), count=st.integers(2, 6))
    def ignore_full_state(self, data: st.DataObject, count: int) -> None:
        """A client that misses a report, then does not answer ReportFullState: compressed
        reports after a gap, then in sequence. The first reply must ask (if the server held
        its full status); how often after is the server's policy (z4j's is checked)."""
        agent = self._pick(data)
        self.transcript.step(f"ignore_full_state({agent.name}: a gap, then {count} compressed)")
        seq = 1 if agent.seq is None else agent.seq + 2
        for index in range(count):
            message = self._message(agent, seq + index, ())
            self._answered(agent, message, self._send(agent, message, gzip_body=False))

    @precondition(lambda self: self.hooks.opamp_config is not None)
    @rule(data=st.data())
    def desire_config(self, data: st.DataObject) -> None:
        """The server is told (out of band) to have an agent run a new configuration."""
        agent = self._pick(data)
        hook = self.hooks.opamp_config
        assert hook is not None
        self.transcript.step(f"desire_config({agent.name}: through the hook)")
        found = hook(agent.uid.hex())
        self.transcript.add(agent.name, "!", f"the hook says the new config_hash is {found}")
        agent.desired = True
        agent.desired_hash = None if found is None else bytes.fromhex(found)

    @precondition(
        lambda self: any(a.accepts_config and a.desired_hash is not None for a in self.agents)
    )
    @rule(data=st.data())
    def apply_config(self, data: st.DataObject) -> None:
        """An agent reports the configuration offered to it APPLIED (in sequence)."""
        ready = [a.name for a in self.agents if a.accepts_config and a.desired_hash is not None]
        name = data.draw(st.sampled_from(ready), label="agent")
        agent = next(a for a in self.agents if a.name == name)
        agent.applied = agent.desired_hash
        parts = full_parts(agent.capabilities)
        if not data.draw(st.booleans(), label="full report"):
            parts = ("remote_config_status",)
        seq = 0 if agent.seq is None else agent.seq + 1
        self.transcript.step(f"apply_config({agent.name}: APPLIED)")
        message = self._message(agent, seq, parts)
        if "remote_config_status" not in parts:  # not promised, but an agent may say it
            message.remote_config_status.last_remote_config_hash = agent.applied or b""
            message.remote_config_status.status = REMOTE_CONFIG_APPLIED
        self._answered(agent, message, self._send(agent, message, gzip_body=False))

    @rule(data=st.data())
    def request_instance_uid(self, data: st.DataObject) -> None:
        """RequestInstanceUid: a new 16-byte id comes back, and the agent goes on under it."""
        agent = self._pick(data)
        seq = 0 if agent.seq is None else agent.seq + 1
        message = self._message(agent, seq, (), flags=REQUEST_INSTANCE_UID)
        self.transcript.step(f"request_instance_uid({agent.name})")
        reply = self._answered(agent, message, self._send(agent, message, gzip_body=False))
        new = reply.agent_identification.new_instance_uid
        if not reply.HasField("agent_identification") or len(new) != UID_BYTES:
            raise self.fail(
                "opamp-new-instance-uid",
                f"{agent.name}: RequestInstanceUid answered without a 16-byte new_instance_uid "
                f"(got {len(new)} bytes)",
            )
        if new in self.uids:
            raise self.fail(
                "opamp-new-instance-uid",
                f"{agent.name}: the new instance_uid {new.hex()} is not new",
            )
        self.exercised["opamp-new-instance-uid"] += 1
        self.uids.add(new)
        agent.uid = new
        agent.good = None  # the server may keep what it knew, or start over

    @rule(data=st.data())
    def disconnect_twice(self, data: st.DataObject) -> None:
        """agent_disconnect, twice: both answered, neither an error."""
        agent = self._pick(data)
        self.transcript.step(f"disconnect_twice({agent.name})")
        for _ in range(2):
            seq = 0 if agent.seq is None else agent.seq + 1
            message = self._message(agent, seq, ())
            message.agent_disconnect.SetInParent()
            reply = self._send(agent, message, gzip_body=False)
            if reply.status != 200 or reply.message is None:
                raise self.fail(
                    "opamp-disconnect-idempotent",
                    f"{agent.name}: agent_disconnect was answered {reply.describe()}",
                )
            if reply.message.HasField("error_response"):
                raise self.fail(
                    "opamp-disconnect-idempotent",
                    f"{agent.name}: agent_disconnect got error_response "
                    f"({reply.message.error_response.error_message!r})",
                )
            self._answered(agent, message, reply)
        self.exercised["opamp-disconnect-idempotent"] += 1
        agent.good = None  # a server may forget a disconnected agent

    def _malformed(self, data: st.DataObject) -> tuple[bytes, str, bool]:
        """(body, what, gzipped) of a message no server can accept."""
        how = data.draw(st.sampled_from(MALFORMED + ["not gzip"] * (self.http is not None)))
        valid = pb.AgentToServer(instance_uid=secrets.token_bytes(UID_BYTES), sequence_num=1)
        valid.agent_description.identifying_attributes.add(key="k").value.string_value = "v"
        encoded = valid.SerializeToString()
        if how == "random bytes":
            body = data.draw(st.binary(max_size=64), label="bytes")
        elif how == "cut short":
            body = encoded[: data.draw(st.integers(1, len(encoded) - 1), label="cut at")]
        elif how == "instance_uid not 16 bytes":
            size = data.draw(st.sampled_from([0, 1, 15, 17, 32]), label="uid bytes")
            valid.instance_uid = secrets.token_bytes(size)
            body = valid.SerializeToString()
        elif how == "invalid UTF-8 in a string":
            key_value = _field(1, b"\xff\xfe key")  # KeyValue.key
            description = _field(1, key_value)  # identifying_attributes
            body = _field(1, secrets.token_bytes(UID_BYTES)) + _field(3, description)
        elif how == "wrong wire type":
            body = b"\x08\x01" + encoded  # instance_uid as a varint
        else:  # "not gzip": Content-Encoding gzip on plain protobuf
            return encoded, how, True
        return body, how, False

    @rule(data=st.data())
    def malformed(self, data: st.DataObject) -> None:
        """Bytes that are not an AgentToServer: a ServerToAgent with BAD_REQUEST, never 5xx."""
        body, how, gzipped = self._malformed(data)
        if _is_valid(body):  # the bytes drawn happen to make a message
            return
        self.transcript.step(f"malformed({how})")
        shown = body[:24].hex() + ("…" if len(body) > 24 else "")
        what = f"(not an AgentToServer: {shown or 'no bytes'})"
        http = self.http
        if gzipped and http is not None:
            reply = self.portal.run(lambda: http.post(body, what=what, content_encoding="gzip"))
        else:
            reply = self.portal.run(lambda: self.stranger.exchange(body, what=what))
        found = reply.message
        if reply.status is not None and reply.status >= 500:
            raise self.fail("opamp-bad-request", f"{how}: answered {reply.describe()}")
        if found is None or found.error_response.type != BAD_REQUEST:
            got = reply.describe() if found is None else f"error_response {found.error_response}"
            raise self.fail(
                "opamp-bad-request", f"{how}: expected error_response BAD_REQUEST, got {got}"
            )
        if self.target.z4j_policy and reply.status != 200:
            raise self.fail(
                "opamp-z4j-bad-request-200", f"{how}: BAD_REQUEST came with HTTP {reply.status}"
            )
        self.exercised["opamp-bad-request"] += 1
        self.exercised["opamp-z4j-bad-request-200"] += self.target.z4j_policy

    @precondition(lambda self: self.http is not None)
    @rule(refusal=st.sampled_from(REFUSALS))
    def refused(self, refusal: tuple[str, str]) -> None:
        """What an HTTP server must refuse: 401, 415, 413."""
        rule_name, how = refusal
        if rule_name == "opamp-unauthorized-401" and self.target.token is None:
            return  # a server that asks for no token
        self.transcript.step(f"refused({how})")
        limit = self.target.max_message_bytes
        message = pb.AgentToServer(
            instance_uid=self._new_uid(), capabilities=REPORTS_STATUS
        ).SerializeToString()
        assert self.http is not None
        post = self.http.post
        if how == "no token":
            reply = self.portal.run(lambda: post(message, what=how, token=None))
        elif how == "unknown token":
            wrong = f"z4j_opamp_{secrets.token_urlsafe(24)}"
            reply = self.portal.run(lambda: post(message, what=how, token=wrong))
        elif how == "no Content-Type":
            reply = self.portal.run(lambda: post(message, what=how, content_type=None))
        elif rule_name == "opamp-content-type-415":
            reply = self.portal.run(lambda: post(message, what=how, content_type=how))
        elif how == "body over the limit":
            reply = self.portal.run(lambda: post(bytes(limit + 1), what=f"{how} of {limit}"))
        else:
            bomb = gzip_bomb(limit)
            reply = self.portal.run(
                lambda: post(bomb, what=f"inflates to {limit + 1}", content_encoding="gzip")
            )
        wanted = int(rule_name.rsplit("-", 1)[1])
        if reply.status != wanted:
            raise self.fail(rule_name, f"{how}: answered {reply.describe()}, expected {wanted}")
        self.exercised[rule_name] += 1

    # -- the end -------------------------------------------------------------------------

    def teardown(self) -> None:
        async def close_all() -> None:
            for transport in self.transports:
                await transport.aclose()

        self.portal.run(close_all)


def _is_valid(body: bytes) -> bool:
    """Whether ``body`` parses as an AgentToServer with a 16-byte instance_uid."""
    try:
        message = pb.AgentToServer.FromString(body)
    except Exception:  # protobuf's DecodeError, or its C layer's
        return False
    return len(message.instance_uid) == UID_BYTES


def opamp_machine(
    target: OpampTarget, hooks: Hooks, portal: TrioPortal, timeouts: Timeouts | None = None
) -> type[OpampMachine]:
    """The machine class for one target."""
    attributes = {
        "target": target,
        "hooks": hooks,
        "portal": portal,
        "timeouts": timeouts or Timeouts(),
        "exercised": Counter(),
        "failures": [],
    }
    return type("OpampProtocol", (OpampMachine,), attributes)

"""Properties of the OpAMP sans-IO core (`z4j.protocol.opamp`).

- h11's fuzz invariant: arbitrary bytes (and valid messages mangled) decode
  to an `AgentToServer` or raise `OpampDecodeError`, never anything else,
  whichever wrapping (bare, WebSocket, gzip); and the whole answer path
  (decode, `receive`, encode) always gives a reply: ours or BAD_REQUEST.
- Wrappings: gzip and the WebSocket header change nothing but the bytes,
  and the size limit holds exactly, after decompression.
- Convergence: a client compressing its status, over a network that drops,
  duplicates and re-delivers its messages, skipping sequence numbers and
  restarting, always ends with the server holding its full, true status
  once the server's ReportFullState request is answered, in a few messages;
  and the server never asks more than MAX_FULL_STATE_REQUESTS times in a row.
- Remote configuration: offered until, and only until, the agent reports its
  hash APPLIED, and only while its capabilities accept one.

Sync tests: the core does no I/O, so there is nothing to run under Trio.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable

from hypothesis import example, given, note
from hypothesis import strategies as st

from z4j.protocol.opamp import (
    MAX_FULL_STATE_REQUESTS,
    STATUS_PARTS,
    AgentCapability,
    AgentFlag,
    AgentState,
    Change,
    ConfigFile,
    MessageTooLarge,
    OpampDecodeError,
    Outcome,
    RemoteConfig,
    ServerFlag,
    Transport,
    bad_request,
    decode_agent_to_server,
    decode_http_body,
    decode_ws_message,
    encode_server_to_agent,
    inflate_gzip,
    key_values,
    receive,
)
from z4j.protocol.opamp import opamp_pb2 as pb

UID = bytes(range(16))
NEW_UID = bytes(range(16, 32))

# -- strategies ------------------------------------------------------------------------

small = st.integers(min_value=0, max_value=3)  # few values: repeats are likely

capabilities_st = st.builds(
    lambda bits: AgentCapability.REPORTS_STATUS | AgentCapability(bits),
    st.integers(min_value=0, max_value=0xFFFF),
)


def _part_value(part: Change, n: int) -> bytes:
    """A distinct, deterministic encoding of value ``n`` of a status part."""
    message: pb.AgentDescription | pb.ComponentHealth | pb.EffectiveConfig | pb.RemoteConfigStatus
    if part is Change.AGENT_DESCRIPTION:
        message = pb.AgentDescription(identifying_attributes=key_values({"service.name": f"s{n}"}))
    elif part is Change.HEALTH:
        message = pb.ComponentHealth(healthy=n % 2 == 0, status=str(n))
    elif part is Change.EFFECTIVE_CONFIG:
        message = pb.EffectiveConfig()
        message.config_map.config_map[""].body = str(n).encode()
    else:
        message = pb.RemoteConfigStatus(last_remote_config_hash=bytes([n]), status=n % 4)  # type: ignore[arg-type]
    return message.SerializeToString(deterministic=True)


@st.composite
def agent_messages(draw: st.DrawFn) -> pb.AgentToServer:
    """Valid AgentToServer messages, any mix of parts."""
    message = pb.AgentToServer(
        instance_uid=draw(st.binary(min_size=16, max_size=16)),
        sequence_num=draw(st.integers(min_value=0, max_value=2**64 - 1)),
        capabilities=int(draw(capabilities_st)),
        flags=draw(st.sampled_from([0, int(AgentFlag.REQUEST_INSTANCE_UID)])),
    )
    for part in (
        Change.AGENT_DESCRIPTION,
        Change.HEALTH,
        Change.EFFECTIVE_CONFIG,
        Change.REMOTE_CONFIG_STATUS,
    ):
        if draw(st.booleans()):
            getattr(message, part.value).MergeFromString(_part_value(part, draw(small)))
    if draw(st.booleans()):
        message.agent_disconnect.SetInParent()
    return message


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """A valid message's bytes, cut, flipped or spliced: parsers' favourite food."""
    data = bytearray(draw(agent_messages()).SerializeToString())
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        at = draw(st.integers(min_value=0, max_value=len(data)))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and at < len(data):
            data[at] ^= draw(st.integers(min_value=1, max_value=255))
        elif action == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


untrusted = st.binary(max_size=300) | mangled()

# -- decoding never raises anything else ---------------------------------------------

DECODERS: list[Callable[[bytes], pb.AgentToServer]] = [
    decode_agent_to_server,
    decode_ws_message,
    lambda data: decode_http_body(data, content_encoding="gzip"),
    lambda data: decode_http_body(data, content_encoding="identity", limit=64),
]


@given(untrusted)
def test_untrusted_bytes_give_a_message_or_the_one_error(data: bytes) -> None:
    for decode in DECODERS:
        try:
            message = decode(data)
        except OpampDecodeError as error:
            assert error.reason in {
                "too_large",
                "encoding",
                "gzip",
                "header",
                "protobuf",
                "instance_uid",
            }
        else:
            assert isinstance(message, pb.AgentToServer)


def answer(stored: AgentState | None, data: bytes) -> pb.ServerToAgent:
    """What an endpoint does with a body: the reply to send, whatever came in."""
    try:
        message = decode_agent_to_server(data)
    except OpampDecodeError as error:
        return bad_request(error)
    if stored is not None and stored.instance_uid != message.instance_uid:
        stored = None
    return receive(
        stored, message, transport=Transport.HTTP, new_instance_uid=lambda: NEW_UID
    ).reply


@given(untrusted, st.none() | agent_messages())
def test_every_body_gets_a_reply(data: bytes, before: pb.AgentToServer | None) -> None:
    stored = None
    if before is not None:
        before.instance_uid = data[:16].ljust(16, b"\x00")  # often the same agent
        stored = receive(
            None, before, transport=Transport.HTTP, new_instance_uid=lambda: NEW_UID
        ).state
    reply = answer(stored, data)
    encode_server_to_agent(reply)
    if reply.HasField("error_response"):
        assert reply.error_response.type == pb.ServerErrorResponse.TYPE_BAD_REQUEST
        assert not reply.capabilities and not reply.flags


# -- wrappings -----------------------------------------------------------------------


@given(agent_messages())
def test_gzip_and_the_websocket_header_change_only_the_bytes(message: pb.AgentToServer) -> None:
    data = message.SerializeToString()
    assert decode_agent_to_server(data) == message
    assert decode_http_body(gzip.compress(data), content_encoding="gzip") == message
    assert decode_ws_message(b"\x00" + data) == message


@given(agent_messages(), st.integers(min_value=1, max_value=2**63))
def test_a_websocket_header_other_than_zero_is_refused(
    message: pb.AgentToServer, header: int
) -> None:
    varint = bytearray()
    while True:
        byte, header = header & 0x7F, header >> 7
        varint.append(byte | (0x80 if header else 0))
        if not header:
            break
    try:
        decode_ws_message(bytes(varint) + message.SerializeToString())
    except OpampDecodeError as error:
        assert error.reason == "header"
    else:
        raise AssertionError("a non-zero header was accepted")


@given(st.binary(max_size=2000), st.integers(min_value=0, max_value=2100), st.integers(1, 3))
def test_the_gzip_limit_is_exact(data: bytes, limit: int, members: int) -> None:
    cut = len(data) // members
    body = b"".join(
        gzip.compress(data[i * cut : (i + 1) * cut if i < members - 1 else len(data)])
        for i in range(members)
    )
    try:
        assert inflate_gzip(body, limit=limit) == data
        assert len(data) <= limit
    except MessageTooLarge:
        assert len(data) > limit


# -- convergence under lost, repeated and skipped sequence numbers --------------------

TRACKED = (
    Change.AGENT_DESCRIPTION,
    Change.HEALTH,
    Change.EFFECTIVE_CONFIG,
    Change.REMOTE_CONFIG_STATUS,
)
PROMISE = {
    Change.HEALTH: AgentCapability.REPORTS_HEALTH,
    Change.EFFECTIVE_CONFIG: AgentCapability.REPORTS_EFFECTIVE_CONFIG,
    Change.REMOTE_CONFIG_STATUS: AgentCapability.REPORTS_REMOTE_CONFIG,
}


class Client:
    """An OpAMP client as the specification describes it, compressing its status.

    It leaves out every part unchanged since it last *sent* it (it cannot know
    what arrived), numbers its messages, and after a reply with
    ReportFullState sends everything in its next message.
    """

    def __init__(self, capabilities: AgentCapability) -> None:
        self.capabilities = capabilities
        self.truth: dict[Change, bytes] = {
            Change.AGENT_DESCRIPTION: _part_value(Change.AGENT_DESCRIPTION, 0)
        }
        self.sent: dict[Change, bytes] = {}
        self.seq = 0
        self.full_next = False

    def parts(self) -> list[Change]:
        return [
            Change.AGENT_DESCRIPTION,
            *(p for p, bit in PROMISE.items() if bit in self.capabilities),
        ]

    def next_message(self, *, bare: bool = False) -> pb.AgentToServer:
        message = pb.AgentToServer(instance_uid=UID, sequence_num=self.seq)
        self.seq += 1
        due = {
            part: value
            for part, value in self.truth.items()
            if self.full_next or self.sent.get(part) != value
        }
        if not (bare and not due):  # a bare poll only when there is nothing to say
            message.capabilities = int(self.capabilities)
        for part, value in due.items():
            getattr(message, part.value).MergeFromString(value)
        self.sent.update(due)
        self.full_next = False
        return message

    def on_reply(self, reply: pb.ServerToAgent) -> None:
        assert reply.instance_uid == UID
        if reply.flags & ServerFlag.REPORT_FULL_STATE:
            self.full_next = True

    def restart(self) -> None:
        """A new process with the same (persisted) instance_uid: numbers from 0 again,
        and nothing taken as already sent."""
        self.seq = 0
        self.sent = {}
        self.full_next = False


class Server:
    """The core, and a record of the ReportFullState flags in its replies."""

    def __init__(self) -> None:
        self.state: AgentState | None = None
        self.asks_in_a_row = 0
        self.longest_run = 0

    def deliver(self, message: pb.AgentToServer) -> pb.ServerToAgent:
        outcome: Outcome = receive(
            self.state, message, transport=Transport.HTTP, new_instance_uid=lambda: NEW_UID
        )
        self.state = outcome.state
        asked = bool(outcome.reply.flags & ServerFlag.REPORT_FULL_STATE)
        self.asks_in_a_row = self.asks_in_a_row + 1 if asked else 0
        self.longest_run = max(self.longest_run, self.asks_in_a_row)
        return outcome.reply


sends = st.tuples(st.just("send"), st.sampled_from(["deliver", "drop", "duplicate", "bare"]))
events = st.one_of(
    sends,
    sends,  # most of what happens is messages
    st.tuples(st.just("change"), st.sampled_from(TRACKED[1:]), small),
    st.tuples(st.just("describe"), small),
    st.tuples(st.just("redeliver"), st.integers(min_value=0, max_value=50)),
    st.tuples(st.just("skip"), st.integers(min_value=1, max_value=5)),
    st.tuples(st.just("restart")),
)

# A full report lost, then a compressed one that carries a new description:
# not the answer, though it looks like one.
ANSWER_LOST = [
    ("send", "deliver"),
    ("change", Change.HEALTH, 1),
    ("send", "drop"),
    ("send", "deliver"),  # a gap: asked
    ("send", "drop"),  # the full report
    ("describe", 1),
    ("send", "deliver"),
]

SETTLE = 6  # clean messages after the storm: converged within 3, quiet after


@example(AgentCapability.REPORTS_STATUS | AgentCapability.REPORTS_HEALTH, ANSWER_LOST)
@given(capabilities_st, st.lists(events, max_size=40))
def test_the_status_converges_whatever_happened_to_the_numbers(
    capabilities: AgentCapability, history: list[tuple[object, ...]]
) -> None:
    client, server = Client(capabilities), Server()
    in_flight: list[pb.AgentToServer] = []  # this process's messages, for re-delivery

    def deliver(message: pb.AgentToServer) -> None:
        client.on_reply(server.deliver(message))

    for event in history:
        note(repr(event))
        kind = event[0]
        if kind == "change":
            part, value = event[1], event[2]
            assert isinstance(part, Change) and isinstance(value, int)
            if part in client.parts():
                client.truth[part] = _part_value(part, value)
        elif kind == "describe":
            assert isinstance(event[1], int)
            client.truth[Change.AGENT_DESCRIPTION] = _part_value(Change.AGENT_DESCRIPTION, event[1])
        elif kind == "send":
            message = client.next_message(bare=event[1] == "bare")
            in_flight.append(message)
            if event[1] != "drop":
                deliver(message)
            if event[1] == "duplicate":
                deliver(message)
        elif kind == "redeliver" and in_flight:
            assert isinstance(event[1], int)
            deliver(in_flight[event[1] % len(in_flight)])
        elif kind == "skip":
            assert isinstance(event[1], int)
            client.seq += event[1]
        elif kind == "restart":
            # Clients retry their first report until it is answered. Were it
            # lost too, numbers from 0 again could follow on from the old
            # process's and hide the loss: no sequence number can see that.
            client.restart()
            in_flight.clear()
            deliver(client.next_message())

    asked_while_settling = []
    for _ in range(SETTLE):
        reply = server.deliver(client.next_message())
        client.on_reply(reply)
        asked_while_settling.append(bool(reply.flags & ServerFlag.REPORT_FULL_STATE))

    state = server.state
    assert state is not None
    assert state.full_state_requests == 0
    for part in STATUS_PARTS:
        assert state.part(part) == client.truth.get(part), part
    assert state.capabilities == capabilities
    assert not any(asked_while_settling[3:]), asked_while_settling  # converged, then quiet
    assert server.longest_run <= MAX_FULL_STATE_REQUESTS


@given(st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=30))
def test_a_client_that_never_counts_is_never_stormed(numbers: list[int]) -> None:
    """Answers out of sequence never end the asking; each ask gets one at once."""
    client, server = (
        Client(AgentCapability.REPORTS_STATUS | AgentCapability.REPORTS_HEALTH),
        Server(),
    )
    for seq in numbers:
        client.seq = seq
        reply = server.deliver(client.next_message())
        client.on_reply(reply)
        if client.full_next:  # it answers at once, with the same number
            client.seq = seq
            client.on_reply(server.deliver(client.next_message()))
    assert server.longest_run <= MAX_FULL_STATE_REQUESTS


# -- remote configuration ------------------------------------------------------------

CONFIGS = [
    RemoteConfig({"a.yaml": ConfigFile(body=b"a: 1")}),
    RemoteConfig({"a.yaml": ConfigFile(body=b"a: 2")}),
]
HASHES = [config.hash for config in CONFIGS] + [b"unknown"]

status_reports = st.none() | st.builds(
    lambda h, s: pb.RemoteConfigStatus(last_remote_config_hash=h, status=s),
    st.sampled_from(HASHES),
    st.sampled_from(
        [
            pb.RemoteConfigStatus.STATUS_UNSET,
            pb.RemoteConfigStatus.STATUS_APPLYING,
            pb.RemoteConfigStatus.STATUS_APPLIED,
            pb.RemoteConfigStatus.STATUS_FAILED,
        ]
    ),
)
config_steps = st.tuples(
    status_reports,  # what this message reports (None: left out, unchanged)
    st.none() | st.sampled_from(CONFIGS),  # what the agent should run now
    st.booleans(),  # does it accept remote config now?
    st.booleans(),  # is it leaving?
)


@given(st.lists(config_steps, min_size=1, max_size=25))
def test_a_config_is_offered_until_and_only_until_its_hash_is_applied(
    steps: list[tuple[pb.RemoteConfigStatus | None, RemoteConfig | None, bool, bool]],
) -> None:
    state: AgentState | None = None
    last_reported: pb.RemoteConfigStatus | None = None  # the model: the latest report
    for seq, (report, desired, accepts, leaving) in enumerate(steps):
        capabilities = AgentCapability.REPORTS_STATUS | AgentCapability.REPORTS_REMOTE_CONFIG
        if accepts:
            capabilities |= AgentCapability.ACCEPTS_REMOTE_CONFIG
        message = pb.AgentToServer(
            instance_uid=UID, sequence_num=seq, capabilities=int(capabilities)
        )
        if report is not None:
            message.remote_config_status.CopyFrom(report)
            last_reported = report
        if leaving:
            message.agent_disconnect.SetInParent()
        outcome = receive(
            state,
            message,
            transport=Transport.HTTP,
            new_instance_uid=lambda: NEW_UID,
            desired_config=desired,
        )
        state = outcome.state
        applied = (
            desired is not None
            and last_reported is not None
            and last_reported.last_remote_config_hash == desired.hash
            and last_reported.status == pb.RemoteConfigStatus.STATUS_APPLIED
        )
        should_offer = desired is not None and accepts and not leaving and not applied
        assert outcome.reply.HasField("remote_config") == should_offer
        if should_offer:
            assert desired is not None
            assert outcome.reply.remote_config == desired.to_message()

"""The OpAMP sans-IO core (`z4j.protocol.opamp`), rule by rule, with bytes and values only.

- codec: size limit, gzip (bombs refused early), the WebSocket header,
  protobuf and the 16-byte ``instance_uid``; one error type for all of it.
- replies: BAD_REQUEST and UNAVAILABLE carry nothing but the uid and the error.
- remote_config: the hash ignores file order and nothing else; progress.
- state (`receive`): echo, capabilities per transport, status compression,
  ReportFullState, RequestInstanceUid, agent_disconnect, config offers.

The property tests (property_tests/test_opamp_properties.py) run the same
rules over arbitrary inputs; tests/test_opamp_interop.py against a real client.
"""

from __future__ import annotations

import gzip
import itertools
import tracemalloc
import zlib

import pytest

from z4j.protocol.close import CloseCode
from z4j.protocol.errors import LocalProtocolError, RemoteProtocolError
from z4j.protocol.opamp import (
    MAX_FULL_STATE_REQUESTS,
    SERVER_CAPABILITIES,
    AgentCapability,
    AgentFlag,
    AgentState,
    Change,
    ConfigFile,
    ConfigProgress,
    MessageTooLarge,
    OpampDecodeError,
    Outcome,
    RemoteConfig,
    ServerCapability,
    ServerFlag,
    Transport,
    bad_request,
    codec,
    config_hash,
    decode_agent_to_server,
    decode_http_body,
    decode_ws_message,
    encode_server_to_agent,
    encode_ws_message,
    expected_parts,
    inflate_gzip,
    key_values,
    progress,
    push,
    receive,
    retry_after_seconds,
    to_dict,
    unavailable,
)
from z4j.protocol.opamp import opamp_pb2 as pb

UID = bytes(range(16))
NEW_UID = bytes(range(100, 116))
BASIC = AgentCapability.REPORTS_STATUS
CONFIGURABLE = (
    AgentCapability.REPORTS_STATUS
    | AgentCapability.ACCEPTS_REMOTE_CONFIG
    | AgentCapability.REPORTS_REMOTE_CONFIG
    | AgentCapability.REPORTS_EFFECTIVE_CONFIG
)
CONFIG = RemoteConfig(
    {"collector.yaml": ConfigFile(body=b"receivers: {}\n", content_type="text/yaml")}
)


def no_new_uid() -> bytes:
    raise AssertionError("no id was asked for")


def description(**attributes: str) -> pb.AgentDescription:
    return pb.AgentDescription(
        identifying_attributes=key_values(attributes or {"service.name": "checkout"})
    )


def message(
    seq: int,
    *,
    capabilities: AgentCapability = BASIC,
    full: bool = False,
    uid: bytes = UID,
    **fields: object,
) -> pb.AgentToServer:
    """An AgentToServer; ``full`` adds every part ``capabilities`` promise."""
    msg = pb.AgentToServer(instance_uid=uid, sequence_num=seq, capabilities=int(capabilities))
    if full:
        msg.agent_description.CopyFrom(description())
        if AgentCapability.REPORTS_EFFECTIVE_CONFIG in capabilities:
            msg.effective_config.config_map.config_map[""].body = b"effective"
        if AgentCapability.REPORTS_REMOTE_CONFIG in capabilities:
            msg.remote_config_status.status = pb.RemoteConfigStatus.STATUS_UNSET
        if AgentCapability.REPORTS_HEALTH in capabilities:
            msg.health.healthy = True
    for name, value in fields.items():
        if isinstance(value, int):
            setattr(msg, name, value)
        else:
            getattr(msg, name).CopyFrom(value)
    return msg


def step(
    stored: AgentState | None,
    msg: pb.AgentToServer,
    *,
    transport: Transport = Transport.HTTP,
    **kwargs: object,
) -> Outcome:
    return receive(stored, msg, transport=transport, new_instance_uid=no_new_uid, **kwargs)  # type: ignore[arg-type]


def status(config: RemoteConfig, state: int) -> pb.RemoteConfigStatus:
    return pb.RemoteConfigStatus(last_remote_config_hash=config.hash, status=state)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# The generated module and the flags


@pytest.mark.parametrize(
    ("flag", "enum", "prefix"),
    [
        (AgentCapability, pb.AgentCapabilities, "AGENT_CAPABILITIES_"),
        (ServerCapability, pb.ServerCapabilities, "SERVER_CAPABILITIES_"),
        (AgentFlag, pb.AgentToServerFlags, "AGENT_TO_SERVER_FLAGS_"),
        (ServerFlag, pb.ServerToAgentFlags, "SERVER_TO_AGENT_FLAGS_"),
    ],
)
def test_the_python_flags_are_the_proto_values(flag: type, enum: object, prefix: str) -> None:
    from_proto = {
        name.removeprefix(prefix): value
        for name, value in enum.items()  # type: ignore[attr-defined]
        if not name.endswith("_UNSPECIFIED")
    }
    assert {member.name: member.value for member in flag} == from_proto  # type: ignore[attr-defined]


def test_the_wire_numbers_of_the_envelopes() -> None:
    """A few numbers spelled out, in case the .proto and the code drift together."""
    a2s = {f.name: f.number for f in pb.AgentToServer.DESCRIPTOR.fields}
    assert a2s["instance_uid"] == 1 and a2s["sequence_num"] == 2 and a2s["capabilities"] == 4
    assert a2s["remote_config_status"] == 7 and a2s["agent_disconnect"] == 9 and a2s["flags"] == 10
    assert len(a2s) == 15
    s2a = {f.name: f.number for f in pb.ServerToAgent.DESCRIPTOR.fields}
    assert s2a["error_response"] == 2 and s2a["remote_config"] == 3 and s2a["flags"] == 6
    assert s2a["capabilities"] == 7 and s2a["agent_identification"] == 8 and len(s2a) == 11


def test_server_capabilities_claim_only_what_the_core_does() -> None:
    assert SERVER_CAPABILITIES == (
        ServerCapability.ACCEPTS_STATUS
        | ServerCapability.OFFERS_REMOTE_CONFIG
        | ServerCapability.ACCEPTS_EFFECTIVE_CONFIG
    )


def test_attributes_round_trip() -> None:
    values = {
        "s": "x",
        "b": True,
        "i": -3,
        "f": 1.5,
        "raw": b"\x00",
        "l": [1, "a"],
        "m": {"k": None},
    }
    assert to_dict(key_values(values)) == values  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# codec


def test_a_message_decodes() -> None:
    msg = message(3, full=True)
    assert decode_agent_to_server(msg.SerializeToString()) == msg


def test_garbage_is_one_error_type() -> None:
    with pytest.raises(OpampDecodeError) as info:
        decode_agent_to_server(b"\xff\xff\xff")
    assert info.value.reason == "protobuf"
    assert isinstance(info.value, RemoteProtocolError)
    assert info.value.instance_uid == b""


@pytest.mark.parametrize("uid", [b"", b"short", bytes(17)])
def test_an_instance_uid_is_16_bytes(uid: bytes) -> None:
    with pytest.raises(OpampDecodeError) as info:
        decode_agent_to_server(
            pb.AgentToServer(instance_uid=uid, sequence_num=1).SerializeToString()
        )
    assert info.value.reason == "instance_uid"
    assert info.value.instance_uid == uid


def test_a_placeholder_uid_is_allowed_when_asking_for_one() -> None:
    msg = pb.AgentToServer(instance_uid=b"temp", flags=AgentFlag.REQUEST_INSTANCE_UID)
    assert decode_agent_to_server(msg.SerializeToString()).instance_uid == b"temp"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_a_health_tree_nested_too_deep_is_the_one_error() -> None:
    """protobuf stops at 100 levels: a recursion bomb is malformed, not a crash."""
    inner = b""
    for _ in range(5000):
        entry = b"\x12" + _varint(len(inner)) + inner  # map entry, value = ComponentHealth
        inner = b"\x32" + _varint(len(entry)) + entry  # component_health_map
    data = b"\x0a\x10" + UID + b"\x2a" + _varint(len(inner)) + inner  # instance_uid, health
    with pytest.raises(OpampDecodeError) as info:
        decode_agent_to_server(data)
    assert info.value.reason == "protobuf"


def test_unknown_fields_are_ignored() -> None:
    extra = b"\xa8\x06\x01"  # field 101, varint 1: from a newer agent
    assert decode_agent_to_server(message(1).SerializeToString() + extra).sequence_num == 1


def test_the_size_limit_counts_the_message() -> None:
    data = message(1, full=True).SerializeToString()
    assert decode_agent_to_server(data, limit=len(data)).sequence_num == 1
    with pytest.raises(MessageTooLarge) as info:
        decode_agent_to_server(data, limit=len(data) - 1)
    assert info.value.reason == "too_large" and info.value.close_code is CloseCode.TOO_LARGE


def test_a_gzip_body_is_inflated() -> None:
    data = message(2, full=True).SerializeToString()
    body = gzip.compress(data)
    assert decode_http_body(body, content_encoding="gzip").sequence_num == 2
    assert decode_http_body(body, content_encoding=" GZIP ").sequence_num == 2
    assert decode_http_body(data, content_encoding=None).sequence_num == 2
    assert decode_http_body(data, content_encoding="identity").sequence_num == 2


def test_an_unknown_content_encoding_is_refused() -> None:
    with pytest.raises(OpampDecodeError) as info:
        decode_http_body(b"", content_encoding="br")
    assert info.value.reason == "encoding"


def test_the_limit_applies_after_decompression() -> None:
    data = message(2, full=True).SerializeToString()
    body = gzip.compress(data)
    with pytest.raises(MessageTooLarge):
        decode_http_body(body, content_encoding="gzip", limit=len(data) - 1)
    assert decode_http_body(body, content_encoding="gzip", limit=len(data)).sequence_num == 2


def _gzip_bomb(size: int) -> bytes:
    """``size`` zero bytes, gzipped without ever holding them all."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(size >> 20)]
    return b"".join([*parts, packer.flush()])


def test_a_gzip_bomb_is_refused_without_inflating_it() -> None:
    bomb = _gzip_bomb(256 << 20)  # 256 MiB of zeros in ~250 KiB
    limit = 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(MessageTooLarge):
            inflate_gzip(bomb, limit=limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * limit, f"inflating the bomb peaked at {peak} bytes"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not gzip at all",
        gzip.compress(b"abc")[:-3],  # truncated
        gzip.compress(b"abc") + b"trailing",
        gzip.compress(b"abc")[:-8] + b"\x00" * 8,  # bad CRC and length
    ],
    ids=["empty", "not-gzip", "truncated", "trailing-garbage", "bad-crc"],
)
def test_a_bad_gzip_body_is_malformed(body: bytes) -> None:
    with pytest.raises(OpampDecodeError) as info:
        inflate_gzip(body)
    assert info.value.reason == "gzip"


def test_concatenated_gzip_members_are_one_body() -> None:
    assert inflate_gzip(gzip.compress(b"ab") + gzip.compress(b"cd")) == b"abcd"
    with pytest.raises(MessageTooLarge):
        inflate_gzip(gzip.compress(b"ab") + gzip.compress(b"cd"), limit=3)


def test_a_websocket_message_is_header_zero_then_protobuf() -> None:
    msg = message(4, full=True)
    assert decode_ws_message(b"\x00" + msg.SerializeToString()) == msg
    assert decode_ws_message(b"\x80\x00" + msg.SerializeToString()) == msg  # 0, spelled long


@pytest.mark.parametrize(
    "data",
    [b"", b"\x01", b"\x80", b"\x80" * 10 + b"\x00", b"\x81\x00"],
    ids=["empty", "header-1", "cut-varint", "varint-too-long", "header-1-long"],
)
def test_a_websocket_header_other_than_zero_is_refused(data: bytes) -> None:
    with pytest.raises(OpampDecodeError) as info:
        decode_ws_message(data + message(1).SerializeToString())
    assert info.value.reason == "header"


def test_an_empty_websocket_message_is_refused() -> None:
    with pytest.raises(OpampDecodeError) as info:
        decode_ws_message(b"")
    assert info.value.reason == "header"
    with pytest.raises(OpampDecodeError) as info:
        decode_ws_message(b"\x00")  # a valid empty protobuf, but no instance_uid
    assert info.value.reason == "instance_uid"


def test_the_websocket_limit_counts_the_header() -> None:
    data = b"\x00" + message(1).SerializeToString()
    decode_ws_message(data, limit=len(data))
    with pytest.raises(MessageTooLarge):
        decode_ws_message(data, limit=len(data) - 1)


def test_encoding_a_reply() -> None:
    reply = pb.ServerToAgent(instance_uid=UID, capabilities=int(SERVER_CAPABILITIES))
    data = encode_server_to_agent(reply)
    assert pb.ServerToAgent.FromString(data) == reply
    assert encode_ws_message(reply) == b"\x00" + data
    with pytest.raises(LocalProtocolError) as info:
        encode_server_to_agent(reply, limit=len(data) - 1)
    assert info.value.reason == "too_large"
    with pytest.raises(LocalProtocolError):
        encode_ws_message(reply, limit=len(data))


# ---------------------------------------------------------------------------
# replies


def test_bad_request_echoes_the_uid_and_nothing_else() -> None:
    try:
        decode_agent_to_server(pb.AgentToServer(instance_uid=b"abc").SerializeToString())
    except OpampDecodeError as error:
        reply = bad_request(error)
    assert reply.instance_uid == b"abc"
    assert reply.error_response.type == pb.ServerErrorResponse.TYPE_BAD_REQUEST
    assert "instance_uid" in reply.error_response.error_message
    assert reply.capabilities == 0 and reply.flags == 0 and not reply.HasField("remote_config")
    assert bad_request("nope", instance_uid=UID).instance_uid == UID


def test_unavailable_carries_a_retry_hint() -> None:
    reply = unavailable(retry_after=1.5, instance_uid=UID)
    assert reply.instance_uid == UID and reply.capabilities == 0
    assert reply.error_response.type == pb.ServerErrorResponse.TYPE_UNAVAILABLE
    assert reply.error_response.retry_info.retry_after_nanoseconds == 1_500_000_000
    assert not unavailable(retry_after=None).error_response.HasField("retry_info")
    with pytest.raises(ValueError, match="retry_after"):
        unavailable(retry_after=-1)
    assert [retry_after_seconds(s) for s in (0, 0.2, 30, 30.1)] == ["1", "1", "30", "31"]


# ---------------------------------------------------------------------------
# remote_config


def test_the_config_hash_ignores_file_order_and_nothing_else() -> None:
    a, b = ConfigFile(body=b"a: 1"), ConfigFile(body=b"b: 2", content_type="text/yaml")
    assert config_hash({"x": a, "y": b}) == config_hash({"y": b, "x": a})
    assert RemoteConfig({"x": a, "y": b}) == RemoteConfig({"y": b, "x": a})
    variants = [
        {"x": a},
        {"x": a, "y": b},
        {"x": b, "y": a},
        {"x": a, "z": b},
        {"x": ConfigFile(body=b"a: 1", content_type="text/yaml")},
        # Fields run together must not collide: name+body, body+type.
        {"ab": ConfigFile(body=b"c")},
        {"a": ConfigFile(body=b"bc")},
        {"a": ConfigFile(body=b"b", content_type="c")},
        {},
    ]
    hashes = [config_hash(files) for files in variants]
    assert len(set(hashes)) == len(hashes)
    assert all(len(h) == 32 for h in hashes)


def test_the_config_hash_is_pinned() -> None:
    """Agents store our hashes: a change of scheme would re-push every config."""
    files = {"collector.yaml": ConfigFile(body=b"receivers: {}\n", content_type="text/yaml")}
    assert (
        config_hash(files).hex()
        == "df39b515ba81b32ae3fac85aa19380115c57e33661fd36951e2184eef51487d9"
    )


def test_a_config_file_validates_when_built() -> None:
    with pytest.raises(TypeError):
        ConfigFile(body="text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        RemoteConfig({"x": b"raw"})  # type: ignore[dict-item]


def test_remote_config_message() -> None:
    offered = CONFIG.to_message()
    assert offered.config_hash == CONFIG.hash
    entry = offered.config.config_map["collector.yaml"]
    assert (entry.body, entry.content_type) == (b"receivers: {}\n", "text/yaml")


def test_progress_reads_only_the_status_of_that_hash() -> None:
    S = pb.RemoteConfigStatus
    assert progress(None, CONFIG.hash) is ConfigProgress.PENDING
    other = pb.RemoteConfigStatus(last_remote_config_hash=b"other", status=S.STATUS_APPLIED)
    assert progress(other, CONFIG.hash) is ConfigProgress.PENDING
    for state, expected in [
        (S.STATUS_UNSET, ConfigProgress.PENDING),
        (S.STATUS_APPLYING, ConfigProgress.APPLYING),
        (S.STATUS_APPLIED, ConfigProgress.APPLIED),
        (S.STATUS_FAILED, ConfigProgress.FAILED),
    ]:
        assert progress(status(CONFIG, state), CONFIG.hash) is expected


# ---------------------------------------------------------------------------
# state: replies and capabilities


def test_every_reply_echoes_the_instance_uid() -> None:
    out = step(None, message(0, full=True))
    assert out.reply.instance_uid == UID
    assert step(out.state, message(1)).reply.instance_uid == UID


def test_server_capabilities_in_every_http_reply() -> None:
    state = None
    for seq in range(3):
        out = step(state, message(seq, full=seq == 0))
        assert out.reply.capabilities == SERVER_CAPABILITIES
        state = out.state


def test_server_capabilities_in_the_first_websocket_reply_only() -> None:
    first = step(None, message(0, full=True), transport=Transport.WEBSOCKET)
    assert first.reply.capabilities == SERVER_CAPABILITIES
    later = step(first.state, message(1), transport=Transport.WEBSOCKET, capabilities_sent=True)
    assert later.reply.capabilities == 0


def test_zero_capabilities_mean_unchanged() -> None:
    out = step(None, message(0, capabilities=CONFIGURABLE, full=True))
    poll = step(out.state, message(1, capabilities=AgentCapability(0)))
    assert poll.state.capabilities == CONFIGURABLE
    assert Change.CAPABILITIES not in poll.changed


def test_a_capability_change_is_a_change() -> None:
    out = step(None, message(0, full=True))
    more = step(out.state, message(1, capabilities=CONFIGURABLE))
    assert more.state.capabilities == CONFIGURABLE
    assert Change.CAPABILITIES in more.changed


def test_unknown_capability_bits_are_kept_and_ignored() -> None:
    out = step(None, message(0, capabilities=BASIC | AgentCapability(1 << 40), full=True))
    assert out.state.capabilities == BASIC | (1 << 40)
    assert expected_parts(out.state.capabilities) == {Change.AGENT_DESCRIPTION}


# ---------------------------------------------------------------------------
# state: status compression and what changed


def test_a_first_full_report_records_every_part() -> None:
    out = step(None, message(0, capabilities=CONFIGURABLE, full=True))
    assert out.changed == {
        Change.AGENT_DESCRIPTION,
        Change.EFFECTIVE_CONFIG,
        Change.REMOTE_CONFIG_STATUS,
        Change.CAPABILITIES,
        Change.CONNECTED,
    }
    assert out.state.connected and out.state.sequence_num == 0
    assert out.reply.flags == 0
    assert to_dict(out.state.report().agent_description.identifying_attributes) == {
        "service.name": "checkout"
    }


def test_an_absent_part_is_unchanged() -> None:
    first = step(None, message(0, capabilities=CONFIGURABLE, full=True))
    beat = step(first.state, message(1, capabilities=CONFIGURABLE))
    assert beat.changed == frozenset()  # nothing to write but "last seen" and the number
    assert beat.state.sequence_num == 1
    assert beat.state.report().agent_description == first.state.report().agent_description


def test_a_present_part_replaces_the_stored_one() -> None:
    first = step(None, message(0, capabilities=CONFIGURABLE, full=True))
    health = pb.ComponentHealth(healthy=False, last_error="disk full")
    config = pb.EffectiveConfig()
    config.config_map.config_map[""].body = b"new"
    out = step(
        first.state, message(1, capabilities=CONFIGURABLE, health=health, effective_config=config)
    )
    assert out.changed == {Change.HEALTH, Change.EFFECTIVE_CONFIG}
    assert out.state.report().health.last_error == "disk full"
    assert out.state.report().effective_config.config_map.config_map[""].body == b"new"


def test_the_same_report_again_changes_nothing() -> None:
    first = step(None, message(0, capabilities=CONFIGURABLE, full=True))
    again = step(first.state, message(1, capabilities=CONFIGURABLE, full=True))
    assert again.changed == frozenset()


def test_equal_maps_are_equal_bytes_whatever_their_order() -> None:
    one, two = pb.ComponentHealth(), pb.ComponentHealth()
    for name in "abc":
        one.component_health_map[name].healthy = True
    for name in "cba":
        two.component_health_map[name].healthy = True
    first = step(None, message(0, full=True, health=one))
    assert step(first.state, message(1, health=two)).changed == frozenset()


def test_state_of_another_agent_is_a_local_error() -> None:
    out = step(None, message(0, full=True))
    with pytest.raises(LocalProtocolError):
        step(out.state, message(1, uid=NEW_UID))


# ---------------------------------------------------------------------------
# state: sequence numbers and ReportFullState


def asks(out: Outcome) -> bool:
    return bool(out.reply.flags & ServerFlag.REPORT_FULL_STATE)


def test_in_step_messages_are_never_asked_for_more() -> None:
    out = step(None, message(0, capabilities=CONFIGURABLE, full=True))
    for seq in range(1, 5):
        out = step(out.state, message(seq, capabilities=CONFIGURABLE))
        assert not asks(out)


def test_a_stranger_with_a_compressed_report_is_asked_for_everything() -> None:
    """The server lost the agent (or never had it): seq 7 relies on earlier reports."""
    out = step(None, message(7, capabilities=CONFIGURABLE))
    assert asks(out) and out.state.full_state_requests == 1
    assert Change.FULL_STATE_REQUESTS in out.changed


def test_a_stranger_at_zero_has_left_nothing_out() -> None:
    # A new agent that has no remote config status to report yet.
    out = step(None, message(0, capabilities=CONFIGURABLE, agent_description=description()))
    assert not asks(out)


def test_a_gap_with_a_compressed_report_asks_and_the_answer_ends_it() -> None:
    out = step(None, message(0, capabilities=CONFIGURABLE, full=True))
    gap = step(out.state, message(5, capabilities=CONFIGURABLE))
    assert asks(gap)
    answer = step(gap.state, message(6, capabilities=CONFIGURABLE, full=True))
    assert not asks(answer) and answer.state.full_state_requests == 0
    assert Change.FULL_STATE_REQUESTS in answer.changed
    assert not asks(step(answer.state, message(7, capabilities=CONFIGURABLE)))


def test_a_gap_with_a_complete_report_asks_nothing() -> None:
    out = step(None, message(0, capabilities=CONFIGURABLE, full=True))
    assert not asks(step(out.state, message(9, capabilities=CONFIGURABLE, full=True)))


def test_a_repeated_number_is_a_gap() -> None:
    out = step(None, message(0, capabilities=CONFIGURABLE, full=True))
    out = step(out.state, message(1, capabilities=CONFIGURABLE))
    assert asks(step(out.state, message(1, capabilities=CONFIGURABLE)))


def test_an_answer_without_the_parts_the_agent_lacks_still_counts() -> None:
    """The agent has never had a remote config: its full report has no status for it."""
    gap = step(None, message(3, capabilities=CONFIGURABLE))
    answer = step(gap.state, message(4, capabilities=CONFIGURABLE, agent_description=description()))
    assert not asks(answer)


def test_a_heartbeat_crossing_the_request_asks_again() -> None:
    gap = step(None, message(3, capabilities=CONFIGURABLE))
    crossing = step(gap.state, message(4, capabilities=CONFIGURABLE))
    assert asks(crossing) and crossing.state.full_state_requests == 2
    answer = step(crossing.state, message(5, capabilities=CONFIGURABLE, full=True))
    assert not asks(answer)


def test_an_agent_that_never_answers_is_asked_with_a_pause_in_every_cycle() -> None:
    """Each ask makes a client send at once: never more than MAX asks in a row."""
    out = step(None, message(3, capabilities=CONFIGURABLE))
    pattern = [asks(out)]
    for seq in range(3, 3 + 2 * (MAX_FULL_STATE_REQUESTS + 1)):
        out = step(out.state, message(seq, capabilities=CONFIGURABLE))  # repeats 3, no answer
        pattern.append(asks(out))
    cycle = [True] * MAX_FULL_STATE_REQUESTS + [False]
    assert pattern[: 2 * len(cycle)] == cycle * 2
    # The answer still ends it, whenever it comes.
    answer = step(
        out.state, message(out.state.sequence_num + 1, capabilities=CONFIGURABLE, full=True)
    )
    assert not asks(answer) and answer.state.full_state_requests == 0


def test_a_description_out_of_sequence_is_not_the_answer() -> None:
    """A retried old message, or one sent after the answer was lost."""
    out = step(None, message(0, capabilities=CONFIGURABLE, full=True))
    gap = step(out.state, message(5, capabilities=CONFIGURABLE))
    for seq in (5, 8):
        retry = step(
            gap.state, message(seq, capabilities=CONFIGURABLE, agent_description=description())
        )
        assert asks(retry)


# ---------------------------------------------------------------------------
# state: RequestInstanceUid


def test_request_instance_uid_is_answered_with_a_new_id() -> None:
    temp = b"\x00" * 16
    msg = message(0, uid=temp, full=True, flags=int(AgentFlag.REQUEST_INSTANCE_UID))
    out = receive(None, msg, transport=Transport.HTTP, new_instance_uid=lambda: NEW_UID)
    assert out.reply.instance_uid == temp  # addressed to the id the agent used
    assert out.reply.agent_identification.new_instance_uid == NEW_UID
    assert out.state.instance_uid == NEW_UID
    assert Change.INSTANCE_UID in out.changed
    # The agent carries on under its new id.
    after = step(out.state, message(1, uid=NEW_UID))
    assert after.reply.instance_uid == NEW_UID and not after.reply.HasField("agent_identification")


def test_a_new_id_of_the_wrong_length_is_our_bug() -> None:
    msg = message(0, full=True, flags=int(AgentFlag.REQUEST_INSTANCE_UID))
    with pytest.raises(LocalProtocolError):
        receive(None, msg, transport=Transport.HTTP, new_instance_uid=lambda: b"short")


# ---------------------------------------------------------------------------
# state: agent_disconnect


def test_agent_disconnect_is_idempotent() -> None:
    out = step(None, message(0, capabilities=CONFIGURABLE, full=True))
    bye = step(
        out.state, message(1, capabilities=CONFIGURABLE, agent_disconnect=pb.AgentDisconnect())
    )
    assert not bye.state.connected and bye.changed == {Change.CONNECTED}
    assert bye.reply.instance_uid == UID
    again = step(
        bye.state, message(1, capabilities=CONFIGURABLE, agent_disconnect=pb.AgentDisconnect())
    )
    assert not again.state.connected and again.changed == frozenset()
    back = step(again.state, message(0, capabilities=CONFIGURABLE, full=True))
    assert back.state.connected and Change.CONNECTED in back.changed


def test_nothing_is_offered_or_asked_of_a_leaving_agent() -> None:
    gap = message(50, capabilities=CONFIGURABLE, agent_disconnect=pb.AgentDisconnect())
    out = step(None, gap, desired_config=CONFIG)
    assert not asks(out) and not out.reply.HasField("remote_config")
    assert not out.state.connected and Change.CONNECTED not in out.changed


# ---------------------------------------------------------------------------
# state: remote configuration


def offers(out: Outcome) -> bool:
    return out.reply.HasField("remote_config")


def test_a_config_is_offered_until_its_hash_is_applied() -> None:
    out = step(None, message(0, capabilities=CONFIGURABLE, full=True), desired_config=CONFIG)
    assert offers(out) and out.reply.remote_config == CONFIG.to_message()
    S = pb.RemoteConfigStatus
    seq = itertools.count(1)
    for state in (S.STATUS_APPLYING, S.STATUS_FAILED):
        out = step(
            out.state,
            message(
                next(seq), capabilities=CONFIGURABLE, remote_config_status=status(CONFIG, state)
            ),
            desired_config=CONFIG,
        )
        assert offers(out)
    applied = step(
        out.state,
        message(
            next(seq),
            capabilities=CONFIGURABLE,
            remote_config_status=status(CONFIG, S.STATUS_APPLIED),
        ),
        desired_config=CONFIG,
    )
    assert not offers(applied)
    # Compressed: the stored status still says applied.
    assert not offers(
        step(applied.state, message(next(seq), capabilities=CONFIGURABLE), desired_config=CONFIG)
    )
    # A new configuration is offered again.
    newer = RemoteConfig({"collector.yaml": ConfigFile(body=b"receivers: {otlp: {}}\n")})
    assert offers(
        step(applied.state, message(next(seq), capabilities=CONFIGURABLE), desired_config=newer)
    )


def test_a_config_is_never_offered_to_an_agent_that_does_not_accept_one() -> None:
    reports_only = CONFIGURABLE & ~AgentCapability.ACCEPTS_REMOTE_CONFIG
    out = step(None, message(0, capabilities=reports_only, full=True), desired_config=CONFIG)
    assert not offers(out)


def test_no_offer_without_a_desired_config_or_the_server_capability() -> None:
    assert not offers(step(None, message(0, capabilities=CONFIGURABLE, full=True)))
    out = step(
        None,
        message(0, capabilities=CONFIGURABLE, full=True),
        desired_config=CONFIG,
        server_capabilities=ServerCapability.ACCEPTS_STATUS,
    )
    assert not offers(out) and out.reply.capabilities == ServerCapability.ACCEPTS_STATUS


def test_an_offer_goes_with_a_full_state_request() -> None:
    out = step(None, message(4, capabilities=CONFIGURABLE), desired_config=CONFIG)
    assert asks(out) and offers(out)


# -- crowded messages ---------------------------------------------------------------------


def _attributes(n: int) -> bytes:
    message = pb.AgentToServer(instance_uid=bytes(16))
    attribute = pb.KeyValue(key="k", value=pb.AnyValue(string_value="v"))
    message.agent_description.non_identifying_attributes.extend([attribute] * n)
    return message.SerializeToString()


def test_a_crowded_message_is_refused_before_the_parser_sees_it() -> None:
    # Each attribute is 4 fields on the wire: a KeyValue, its key, its AnyValue,
    # its string: one more than MAX_FIELDS / 4 of them is past the field bound.
    crowded = _attributes(codec.MAX_FIELDS // 4 + 1)
    count = codec.FieldCount(crowded)
    with pytest.raises(codec.OpampDecodeError) as refused:
        while not count.advance(100):  # in slices, as the endpoint counts
            pass
    assert refused.value.reason == "too_many_elements"
    with pytest.raises(codec.OpampDecodeError, match="fields"):
        codec.decode_agent_to_server(crowded)
    # Under the field bound but over the element bound: refused after the parse.
    with pytest.raises(codec.OpampDecodeError, match="repeated elements"):
        codec.decode_agent_to_server(_attributes(codec.MAX_ELEMENTS + 1))
    assert (
        len(
            codec.decode_agent_to_server(
                _attributes(100)
            ).agent_description.non_identifying_attributes
        )
        == 100
    )


def test_the_field_count_skips_bytes_and_resumes_where_it_stopped() -> None:
    big = pb.AgentToServer(instance_uid=bytes(16))
    big.effective_config.config_map.config_map["a.yaml"].body = b"{" * 1_000_000
    data = big.SerializeToString()
    count = codec.FieldCount(data)
    steps = 0
    while not count.advance(1):
        steps += 1
    # instance_uid, effective_config, config_map, its map entry, key, value, body:
    # the megabyte of braces is one field.
    assert steps + 1 <= 8
    # Garbage stops the count and is left to the parser.
    assert codec.FieldCount(b"\xff\xff\xff").advance(10)


# ---------------------------------------------------------------------------
# What a WebSocket adds, and a server that cannot vouch for what it stored


def test_on_a_websocket_a_config_goes_once_unless_the_agent_reports_another_hash() -> None:
    first = step(
        None,
        message(0, capabilities=CONFIGURABLE, full=True),
        transport=Transport.WEBSOCKET,
        desired_config=CONFIG,
    )
    assert first.reply.remote_config.config_hash == CONFIG.hash and first.reply.capabilities
    # Sent on this connection: not again, applying or failed alike.
    for state in (pb.RemoteConfigStatus.STATUS_APPLYING, pb.RemoteConfigStatus.STATUS_FAILED):
        again = step(
            first.state,
            message(1, capabilities=CONFIGURABLE, remote_config_status=status(CONFIG, state)),
            transport=Transport.WEBSOCKET,
            desired_config=CONFIG,
            capabilities_sent=True,
            config_sent=CONFIG.hash,
        )
        assert not again.reply.HasField("remote_config") and not again.reply.capabilities
    # Over HTTP the same message is offered it (each poll stands alone).
    polled = step(
        first.state,
        message(
            1,
            capabilities=CONFIGURABLE,
            remote_config_status=status(CONFIG, pb.RemoteConfigStatus.STATUS_FAILED),
        ),
        desired_config=CONFIG,
        config_sent=CONFIG.hash,
    )
    assert polled.reply.remote_config.config_hash == CONFIG.hash
    # The agent reports another hash (it restarted on an old one): offered again.
    old = pb.RemoteConfigStatus(
        last_remote_config_hash=b"\x01" * 32, status=pb.RemoteConfigStatus.STATUS_APPLIED
    )
    rolled_back = step(
        first.state,
        message(1, capabilities=CONFIGURABLE, remote_config_status=old),
        transport=Transport.WEBSOCKET,
        desired_config=CONFIG,
        capabilities_sent=True,
        config_sent=CONFIG.hash,
    )
    assert rolled_back.reply.remote_config.config_hash == CONFIG.hash


def test_push_offers_a_changed_config_to_a_connected_agent_only_when_due() -> None:
    state = step(None, message(0, capabilities=CONFIGURABLE, full=True)).state
    pushed = push(state, CONFIG, capabilities_sent=True, config_sent=None)
    assert pushed is not None and pushed.instance_uid == UID
    assert pushed.remote_config.config_hash == CONFIG.hash and not pushed.capabilities
    assert push(state, CONFIG, capabilities_sent=True, config_sent=CONFIG.hash) is None
    assert push(state, CONFIG, capabilities_sent=False, config_sent=None).capabilities  # type: ignore[union-attr]
    applied = step(
        state,
        message(
            1,
            capabilities=CONFIGURABLE,
            remote_config_status=status(CONFIG, pb.RemoteConfigStatus.STATUS_APPLIED),
        ),
    ).state
    assert push(applied, CONFIG, capabilities_sent=True, config_sent=None) is None
    basic = step(None, message(0, full=True)).state
    assert push(basic, CONFIG, capabilities_sent=True, config_sent=None) is None
    gone = step(
        state, message(1, capabilities=CONFIGURABLE, agent_disconnect=pb.AgentDisconnect())
    ).state
    assert push(gone, CONFIG, capabilities_sent=True, config_sent=None) is None


def test_an_unvouched_state_asks_for_a_full_report_even_in_sequence() -> None:
    stored = step(None, message(0, full=True)).state
    heartbeat = message(1)
    assert not step(stored, heartbeat).reply.flags
    asked = step(stored, heartbeat, vouched=False)
    assert asked.reply.flags & ServerFlag.REPORT_FULL_STATE
    # The answer settles it, as after a gap; a complete message needs no asking.
    assert not step(asked.state, message(2, full=True), vouched=False).reply.flags
    assert not step(stored, message(1, full=True), vouched=False).reply.flags

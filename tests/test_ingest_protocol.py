"""The sans-IO ingest protocol core: framing, content checks, replies.

Every case of docs' PROTOCOL-ingest-v1 page, one by one, against
`IngestConnection` (server side), `encode_frame`, `token_hash` and
`ReplyParser` (client side). The chunking and fuzz properties live in
property_tests/test_ingest_properties.py.
"""

from __future__ import annotations

import gzip

import orjson
import pytest
import xxhash

from z4j.protocol import ingest as ingest_module
from z4j.protocol.errors import LocalProtocolError, RemoteProtocolError
from z4j.protocol.ingest import (
    ERROR,
    NEED_DATA,
    OK,
    REJECT_REASONS,
    ConnectionClosed,
    IngestConnection,
    Payload,
    Ping,
    Rejected,
    ReplyParser,
    encode_frame,
    token_hash,
    token_hash_full,
)

Event = Payload | Ping | Rejected | ConnectionClosed

THREE = b'[{"t":"request","ms":12},{"t":"query","sql":"SELECT 1"},{"t":"log"}]'


def pull(conn: IngestConnection) -> list[Event]:
    """Every event available now, up to NEED_DATA or ConnectionClosed."""
    events: list[Event] = []
    for _ in range(10_000):
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        assert isinstance(event, Payload | Ping | Rejected | ConnectionClosed), event
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events
    raise AssertionError("next_event never returned NEED_DATA")


def events_of(data: bytes, *, eof: bool = True, **kwargs: object) -> list[Event]:
    conn = IngestConnection(**kwargs)  # type: ignore[arg-type]
    if data:
        conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    return pull(conn)


def one_event(payload: bytes, **kwargs: object) -> Event:
    """The single event for one framed ``payload``, checking the stream stays in sync."""
    token = kwargs.get("token")
    assert token is None or isinstance(token, str)
    conn = IngestConnection(**kwargs)  # type: ignore[arg-type]
    conn.receive_data(encode_frame(payload, token=token))
    conn.receive_data(encode_frame(b"PING", token=token))
    conn.receive_data(b"")
    events = pull(conn)
    assert events[1:] == [Ping(), ConnectionClosed()], events
    return events[0]


def has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(has_nul(v) for v in value)
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    return False


def assert_rejected(event: Event, reason: str) -> None:
    assert isinstance(event, Rejected), event
    assert event.reason == reason, event
    assert event.reason in REJECT_REASONS


# -- client side: encode_frame, token_hash, replies ------------------------------------


def test_reply_bytes_are_exact() -> None:
    assert OK == b"2:OK"
    assert ERROR == b"5:ERROR"


def test_encode_frame_matches_a_hand_built_frame() -> None:
    # v1:0000000:[{"t":"log"}] is 3 + 8 + 13 = 24 bytes.
    assert encode_frame(b'[{"t":"log"}]') == b'24:v1:0000000:[{"t":"log"}]'
    assert encode_frame(b"PING") == b"15:v1:0000000:PING"


def test_encode_frame_length_counts_bytes_not_characters() -> None:
    payload = '[{"t":"café ☕"}]'.encode()
    assert len(payload) == 19  # 15 characters
    assert encode_frame(payload) == b"30:v1:0000000:" + payload


def test_encode_frame_length_counts_everything_after_the_first_colon() -> None:
    for payload in (b"", b"PING", THREE, gzip.compress(THREE), bytes(range(256)) * 5):
        frame = encode_frame(payload, token="s3cret")
        prefix, rest = frame.split(b":", 1)
        assert int(prefix) == len(rest)
        assert rest == b"v1:" + token_hash_full("s3cret") + b":" + payload


def test_encode_frame_with_token_carries_its_full_hash_or_the_short_one_on_request() -> None:
    full = xxhash.xxh128_hexdigest(b"s3cret").encode()
    assert len(full) == 32 and token_hash_full("s3cret") == full
    assert encode_frame(b"PING", token="s3cret") == b"40:v1:" + full + b":PING"
    short = encode_frame(b"PING", token="s3cret", short_hash=True)
    assert short == b"15:v1:" + full[:7] + b":PING"


def test_token_hash_is_first_7_hex_of_xxh128() -> None:
    for token in ("s3cret", "x", "naïve-tökén", "a" * 1000):
        th = token_hash(token)
        assert th == xxhash.xxh128_hexdigest(token.encode())[:7].encode()
        assert len(th) == 7
        assert all(c in b"0123456789abcdef" for c in th)
    assert token_hash("a") != token_hash("b")


def test_reply_parser_parses_ok_and_error_in_order() -> None:
    parser = ReplyParser()
    parser.receive_data(OK + ERROR + OK + OK)
    assert parser.replies() == [True, False, True, True]
    assert parser.replies() == []  # each reply is returned once


def test_reply_parser_waits_for_whole_replies() -> None:
    parser = ReplyParser()
    parser.receive_data(b"5:ERR")
    assert parser.replies() == []
    parser.receive_data(b"OR2")
    assert parser.replies() == [False]
    parser.receive_data(b":")
    assert parser.replies() == []
    parser.receive_data(b"OK")
    assert parser.replies() == [True]


@pytest.mark.parametrize(
    "data",
    [b"3:YES", b"2:NO", b"x:OK", b"-2:OK", b"123456789012345", b"OK"],
)
def test_reply_parser_rejects_malformed_replies(data: bytes) -> None:
    parser = ReplyParser()
    parser.receive_data(data + b"2:OK" * 3)
    with pytest.raises(RemoteProtocolError) as info:
        parser.replies()
    assert info.value.reason == "bad_reply"


# -- valid frames ------------------------------------------------------------------------


def test_valid_frame_gives_payload_with_body_and_record_count() -> None:
    assert events_of(encode_frame(THREE)) == [Payload(body=THREE, records=3), ConnectionClosed()]


def test_payload_body_is_the_bytes_as_received() -> None:
    spaced = b' [ {"t" : "job", "b": [1, 2]} ,\n{"t":"log"} ] '
    assert one_event(spaced) == Payload(body=spaced, records=2)


def test_empty_array_is_a_payload_of_zero_records() -> None:
    assert one_event(b"[]") == Payload(body=b"[]", records=0)


def test_ping() -> None:
    assert events_of(encode_frame(b"PING")) == [Ping(), ConnectionClosed()]


def test_ping_is_checked_for_token_like_any_frame() -> None:
    assert one_event(b"PING", token="s3cret") == Ping()
    conn = IngestConnection(token="s3cret")
    conn.receive_data(encode_frame(b"PING", token="wrong"))
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reason == "bad_token"


def test_kind_of_128_characters_is_accepted_129_is_not() -> None:
    for kind in ("a" * 128, "é" * 128, "x"):
        body = orjson.dumps([{"t": kind}])
        assert one_event(body) == Payload(body=body, records=1)
    assert_rejected(one_event(orjson.dumps([{"t": "a" * 129}])), "bad_record")


def test_frame_of_exactly_max_frame_bytes_is_accepted() -> None:
    frame = encode_frame(THREE)
    limit = len(frame.split(b":", 1)[1])
    assert events_of(frame, max_frame_bytes=limit) == [
        Payload(body=THREE, records=3),
        ConnectionClosed(),
    ]


def test_partial_frame_needs_data_until_its_last_byte() -> None:
    frame = encode_frame(THREE)
    conn = IngestConnection()
    for i, byte in enumerate(frame[:-1]):
        conn.receive_data(bytes([byte]))
        assert conn.next_event() is NEED_DATA
        assert conn.buffered == i + 1
    conn.receive_data(frame[-1:])
    assert conn.next_event() == Payload(body=THREE, records=3)
    assert conn.buffered == 0
    assert conn.next_event() is NEED_DATA


def test_pipelined_frames_in_one_chunk_come_out_in_order() -> None:
    one = b'[{"t":"a"}]'
    two = b'[{"t":"b"},{"t":"c"}]'
    data = (
        encode_frame(one)
        + encode_frame(b"PING")
        + encode_frame(b"{}")
        + encode_frame(gzip.compress(two))
        + encode_frame(b"[]")
    )
    conn = IngestConnection()
    conn.receive_data(data)
    events = pull(conn)
    assert events == [
        Payload(body=one, records=1),
        Ping(),
        Rejected(reason="not_array", detail="payload must be a JSON array of records"),
        Payload(body=two, records=2),
        Payload(body=b"[]", records=0),
    ]
    assert conn.buffered == 0


def test_connection_keeps_working_after_a_rejection() -> None:
    conn = IngestConnection(token="s3cret")
    for bad in (b"[", b"{}", b'[{"t":1}]', gzip.compress(b"[]")[:-3]):
        conn.receive_data(encode_frame(bad, token="s3cret"))
        [event] = pull(conn)
        assert isinstance(event, Rejected)
        conn.receive_data(encode_frame(THREE, token="s3cret"))
        assert pull(conn) == [Payload(body=THREE, records=3)]
    conn.receive_data(encode_frame(b"PING", token="s3cret"))
    assert pull(conn) == [Ping()]


# -- gzip --------------------------------------------------------------------------------


def test_gzip_payload_is_inflated() -> None:
    for level in (0, 1, 9):
        assert one_event(gzip.compress(THREE, compresslevel=level)) == Payload(
            body=THREE, records=3
        )


def test_truncated_gzip_is_rejected() -> None:
    packed = gzip.compress(THREE)
    for cut in (2, 10, len(packed) // 2, len(packed) - 1):
        assert_rejected(one_event(packed[:cut]), "bad_gzip")


def test_corrupt_gzip_is_rejected() -> None:
    packed = bytearray(gzip.compress(THREE))
    packed[-8] ^= 0xFF  # CRC32 of the trailer
    assert_rejected(one_event(bytes(packed)), "bad_gzip")
    assert_rejected(one_event(b"\x1f\x8b" + b"not gzip at all"), "bad_gzip")
    packed = bytearray(gzip.compress(THREE))
    packed[2] = 7  # compression method other than deflate
    assert_rejected(one_event(bytes(packed)), "bad_gzip")


def test_gzip_with_data_after_the_stream_is_rejected() -> None:
    # Taking only the first member would answer OK for records never stored.
    first = gzip.compress(b'[{"t":"a"}]')
    second = gzip.compress(b'[{"t":"b"}]')
    assert_rejected(one_event(first + second), "bad_gzip")
    assert_rejected(one_event(first + b"junk"), "bad_gzip")


def test_gzip_inflating_past_the_limit_is_rejected() -> None:
    body = orjson.dumps([{"t": "log", "m": "x" * 5000}])
    packed = gzip.compress(body)
    assert len(packed) < 200
    assert one_event(packed, max_inflated_bytes=len(body)) == Payload(body=body, records=1)
    event = one_event(packed, max_inflated_bytes=len(body) - 1)
    assert_rejected(event, "inflate_too_large")


def test_gzip_bomb_is_stopped_at_the_limit() -> None:
    packed = gzip.compress(b"[" + b" " * (50 * 1024 * 1024) + b"]", compresslevel=9)
    assert len(packed) < 100_000
    assert_rejected(one_event(packed, max_inflated_bytes=1024 * 1024), "inflate_too_large")


def test_gzip_of_bad_content_is_judged_on_the_inflated_bytes() -> None:
    assert_rejected(one_event(gzip.compress(b"[{")), "bad_json")
    assert_rejected(one_event(gzip.compress(b'{"t":"x"}')), "not_array")
    assert_rejected(one_event(gzip.compress(b"[1]")), "bad_record")
    assert_rejected(one_event(gzip.compress(b"PING")), "bad_json")  # PING is never gzip


# -- bad content: Rejected, the stream goes on -----------------------------------------------


@pytest.mark.parametrize(
    ("frame_body", "reason"),
    [
        (b"v2:0000000:[]", "bad_version"),
        (b"V1:0000000:[]", "bad_version"),
        (b"v10:0000000:[]", "bad_version"),
        (b"1:0000000:[]", "bad_version"),
        (b"", "bad_version"),
        (b"v1", "bad_version"),
        (b"v1:0000000", "bad_framing"),  # no ':' after the token hash
        (b"v1:" + b"0" * 65 + b":[]", "bad_framing"),  # token-hash field too long
    ],
)
def test_bad_version_or_header_is_rejected_and_stream_goes_on(
    frame_body: bytes, reason: str
) -> None:
    data = b"%d:%s" % (len(frame_body), frame_body) + encode_frame(b"[]")
    event, *rest = events_of(data)
    assert_rejected(event, reason)
    assert rest == [Payload(body=b"[]", records=0), ConnectionClosed()]


def frame_with_hash(th: bytes, payload: bytes = b"[]") -> bytes:
    data = b"v1:" + th + b":" + payload
    return b"%d:%s" % (len(data), data)


def test_wrong_token_kills_the_connection_so_each_guess_costs_a_connection() -> None:
    right, full = token_hash("s3cret"), token_hash_full("s3cret")
    wrong = (b"0000000", right[:6], right + b"0", right.upper(), b"", full[:31], full + b"0")
    for th in wrong:
        conn = IngestConnection(token="s3cret")
        # A good frame, a guess, then what would be a right guess: the
        # connection answers the first and is dead from the guess on.
        conn.receive_data(encode_frame(b"[]", token="s3cret"))
        conn.receive_data(frame_with_hash(th))
        conn.receive_data(frame_with_hash(right))
        assert conn.next_event() == Payload(body=b"[]", records=0)
        with pytest.raises(RemoteProtocolError) as info:
            conn.next_event()
        assert info.value.reason == "bad_token"
        assert_dead(conn, "bad_token")


def test_either_hash_form_is_accepted_unless_strict() -> None:
    short, full = token_hash("s3cret"), token_hash_full("s3cret")
    for th in (short, full):
        [event, _] = events_of(frame_with_hash(th, THREE), token="s3cret")
        assert event == Payload(body=THREE, records=3)
    [event, _] = events_of(frame_with_hash(full, THREE), token="s3cret", strict_token=True)
    assert event == Payload(body=THREE, records=3)
    conn = IngestConnection(token="s3cret", strict_token=True)
    conn.receive_data(frame_with_hash(short, THREE))
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reason == "bad_token"


def test_any_token_hash_is_accepted_when_none_is_configured() -> None:
    for th in (b"0000000", token_hash("whatever"), b"zzzzzzz", b"", b"x" * 64):
        data = b"v1:" + th + b":" + THREE
        events = events_of(b"%d:%s" % (len(data), data))
        assert events == [Payload(body=THREE, records=3), ConnectionClosed()]


@pytest.mark.parametrize(
    "payload",
    [
        b"[",
        b"[{]",
        b"not json",
        b"[{'t': 'x'}]",
        b'[{"t":"x"},]',
        b'[{"t":"\xff"}]',  # not UTF-8
        b'[{"t":"x\x00"}]',  # raw NUL is not allowed in JSON text
        b'[{"t":"x","n":NaN}]',
        b'[{"t":"x","n":1e999}]',
        b'[{"t":"x","m":"\\ud800"}]',  # lone surrogate
        b"",
        b"PINGPONG",
    ],
)
def test_bad_json_is_rejected(payload: bytes) -> None:
    assert_rejected(one_event(payload), "bad_json")


@pytest.mark.parametrize(
    "payload",
    [
        b'[{"t":"x\\u0000"}]',
        b'[{"t":"log","m":"a\\u0000b"}]',
        b'[{"t":"log","\\u0000":1}]',
        b'[{"t":"log","m":["ok","\\u0000"]}]',
        b'[{"t":"log","m":"\\\\\\u0000"}]',  # escaped backslash, then a NUL
    ],
)
def test_nul_in_a_string_is_rejected_as_bad_json(payload: bytes) -> None:
    # Postgres jsonb cannot store \u0000 in text.
    assert has_nul(orjson.loads(payload))
    assert_rejected(one_event(payload), "bad_json")


def test_escaped_backslash_before_u0000_text_is_not_a_nul() -> None:
    payload = orjson.dumps([{"t": "log", "m": "C:\\u0000\\dir", "\\u0000": "\\\\u0000"}])
    assert b"\\\\u0000" in payload
    assert not has_nul(orjson.loads(payload))
    assert one_event(payload) == Payload(body=payload, records=1)


@pytest.mark.parametrize(
    "payload",
    [b'{"t":"x"}', b'"[]"', b"1", b"null", b"true", b"{}"],
)
def test_payload_that_is_not_an_array_is_rejected(payload: bytes) -> None:
    assert_rejected(one_event(payload), "not_array")


@pytest.mark.parametrize(
    ("payload", "index"),
    [
        (b"[1]", 0),
        (b"[null]", 0),
        (b'["t"]', 0),
        (b"[[]]", 0),
        (b'[[{"t":"x"}]]', 0),
        (b"[{}]", 0),
        (b'[{"kind":"x"}]', 0),
        (b'[{"t":1}]', 0),
        (b'[{"t":null}]', 0),
        (b'[{"t":["x"]}]', 0),
        (b'[{"t":{"x":1}}]', 0),
        (b'[{"t":true}]', 0),
        (b'[{"t":""}]', 0),
        (b'[{"t":"ok"},{"t":"ok"},{"T":"x"}]', 2),
        (b'[{"t":"ok"},5]', 1),
    ],
)
def test_bad_record_is_rejected_naming_its_index(payload: bytes, index: int) -> None:
    event = one_event(payload)
    assert_rejected(event, "bad_record")
    assert isinstance(event, Rejected)
    assert event.detail.startswith(f"record {index} ")


def test_nesting_too_deep_to_store_is_rejected() -> None:
    def nested(depth: int) -> bytes:
        return b'[{"t":"x","d":' + b"[" * depth + b"]" * depth + b"}]"

    assert one_event(nested(200)) == Payload(body=nested(200), records=1)
    assert_rejected(one_event(nested(400)), "bad_json")
    assert_rejected(one_event(nested(5000)), "bad_json")


def test_many_brackets_but_shallow_nesting_is_accepted() -> None:
    body = orjson.dumps([{"t": "x", "a": [[]] * 200} for _ in range(5)])
    assert one_event(body) == Payload(body=body, records=5)


# -- broken framing: RemoteProtocolError, then dead ----------------------------------------


def assert_dead(conn: IngestConnection, reason: str) -> None:
    """Every later call raises again with the same reason, whatever arrives."""
    for _ in range(3):
        with pytest.raises(RemoteProtocolError) as info:
            conn.next_event()
        assert info.value.reason == reason
    conn.receive_data(encode_frame(b"PING"))
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"abc:v1:0000000:[]", "bad_framing"),  # non-numeric length
        (b"-5:v1:0:[]", "bad_framing"),
        (b"+5:v1:0:[]", "bad_framing"),
        (b" 5:v1:0:[]", "bad_framing"),
        (b"5 :v1:0:[]", "bad_framing"),
        (b"0x1:v1:0000000:[]", "bad_framing"),
        (b":v1:0000000:[]", "bad_framing"),  # empty length
        (b"015:v1:0000000:[]", "bad_framing"),  # leading zero
        (b"00:", "bad_framing"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad_framing"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "bad_framing"),  # TLS hello
        (b"123456789:v1:0000000:[]", "too_large"),  # more digits than the limit has
        (b"99999999999999999999999999:", "too_large"),
        (b"10485761:v1:0000000:[]", "too_large"),  # one over 10 MiB
    ],
)
def test_broken_framing_raises_and_kills_the_connection(data: bytes, reason: str) -> None:
    conn = IngestConnection()
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reason == reason
    assert info.value.reason in REJECT_REASONS
    assert_dead(conn, reason)


def test_broken_framing_after_good_frames_keeps_the_good_events() -> None:
    conn = IngestConnection()
    conn.receive_data(encode_frame(THREE) + encode_frame(b"PING") + b"nope:" + encode_frame(b"[]"))
    assert conn.next_event() == Payload(body=THREE, records=3)
    assert conn.next_event() == Ping()
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reason == "bad_framing"
    assert_dead(conn, "bad_framing")


def test_over_size_frame_is_refused_as_soon_as_its_length_arrives() -> None:
    conn = IngestConnection(max_frame_bytes=100)
    conn.receive_data(b"101:v1:")  # no need to wait for (or buffer) the body
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reason == "too_large"
    assert_dead(conn, "too_large")


def test_overlong_length_is_refused_before_its_colon_arrives() -> None:
    conn = IngestConnection(max_frame_bytes=100)
    conn.receive_data(b"100")
    assert conn.next_event() is NEED_DATA  # could still be "100:"
    conn.receive_data(b"0")
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reason == "too_large"
    assert_dead(conn, "too_large")


def test_garbage_without_colon_is_refused_once_longer_than_any_length() -> None:
    conn = IngestConnection(max_frame_bytes=100)
    conn.receive_data(b"abc")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"d")
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reason == "bad_framing"


def test_frame_over_a_small_limit_is_too_large() -> None:
    frame = encode_frame(THREE)
    limit = len(frame.split(b":", 1)[1]) - 1
    conn = IngestConnection(max_frame_bytes=limit)
    conn.receive_data(frame)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reason == "too_large"


# -- end of stream -----------------------------------------------------------------------


def test_eof_at_a_boundary_is_connection_closed() -> None:
    assert events_of(b"") == [ConnectionClosed()]
    conn = IngestConnection()
    conn.receive_data(encode_frame(THREE))
    assert pull(conn) == [Payload(body=THREE, records=3)]
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert conn.next_event() == ConnectionClosed()  # and stays closed


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 14, -1])
def test_eof_inside_a_frame_is_truncated(cut: int) -> None:
    frame = encode_frame(THREE)
    conn = IngestConnection()
    conn.receive_data(encode_frame(b"PING") + frame[:cut])
    assert conn.next_event() == Ping()
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reason == "truncated"
    for _ in range(3):  # dead: every later call raises again
        with pytest.raises(RemoteProtocolError) as again:
            conn.next_event()
        assert again.value.reason == "truncated"


def test_data_after_eof_is_a_local_error() -> None:
    conn = IngestConnection()
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"2:OK")


def test_too_many_records_in_one_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real cap (2**24, what the idempotency key can index) is too big to
    # build here; the check is the same with a small one.
    monkeypatch.setattr(ingest_module, "MAX_RECORDS_PER_PAYLOAD", 3)
    conn = IngestConnection()
    conn.receive_data(encode_frame(b'[{"t":"a"},{"t":"b"},{"t":"c"}]'))
    conn.receive_data(encode_frame(b'[{"t":"a"},{"t":"b"},{"t":"c"},{"t":"d"}]'))
    assert isinstance(conn.next_event(), Payload)
    rejected = conn.next_event()
    assert isinstance(rejected, Rejected) and rejected.reason == "too_many_records"


# -- the record cap and the cost bound -------------------------------------------------


def flat(n: int) -> bytes:
    return orjson.dumps([{"t": "x"}] * n)


def test_record_cap_counts_records_exactly_when_they_are_flat() -> None:
    assert one_event(flat(50), max_records=50) == Payload(body=flat(50), records=50)
    assert_rejected(one_event(flat(51), max_records=50), "too_many_records")
    assert "records" in str(one_event(flat(51), max_records=50))


def test_record_cap_applies_to_gzip_payloads_after_inflating() -> None:
    packed = gzip.compress(flat(51))
    assert_rejected(one_event(packed, max_records=50), "too_many_records")
    assert one_event(gzip.compress(flat(50)), max_records=50) == Payload(body=flat(50), records=50)


def test_nested_containers_count_against_the_cap_before_any_parse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One record, but more objects and arrays than the cap allows: refused
    # without orjson.loads ever running (the parse is what stalls the loop).
    def no_parse(data: bytes) -> object:
        raise AssertionError("parsed a payload the counts rule out")

    one_record_many_lists = b'[{"t":"x","a":[' + b",".join([b"[]"] * 100) + b"]}]"
    many_values = b'[{"t":"x","a":[' + b",".join([b"0"] * 1000) + b"]}]"
    monkeypatch.setattr(orjson, "loads", no_parse)
    assert_rejected(one_event(one_record_many_lists, max_records=50), "too_many_records")
    assert_rejected(one_event(many_values, max_records=50), "too_many_records")
    assert_rejected(one_event(gzip.compress(many_values), max_records=50), "too_many_records")


def test_values_within_the_cost_bound_are_accepted() -> None:
    # 25 records with a nested array each: 50 containers, 9 separators a record.
    body = orjson.dumps([{"t": "x", "a": 1, "b": 2, "c": [1, 2]} for _ in range(25)])
    assert one_event(body, max_records=50) == Payload(body=body, records=25)
    # 50 records of 8 separators each: exactly on the bound.
    body = orjson.dumps([{"t": "x", "a": 1, "b": 2, "c": 3} for _ in range(50)])
    assert body.count(b",") + body.count(b":") == 8 * 50 - 1
    assert one_event(body, max_records=50) == Payload(body=body, records=50)


def test_braces_inside_strings_count_too_as_documented() -> None:
    # The over-estimate the docs warn about: refused although it is one record.
    body = orjson.dumps([{"t": "x", "msg": "{" * 60}])
    assert_rejected(one_event(body, max_records=50), "too_many_records")


def test_next_is_heavy_for_large_or_gzip_frames_only() -> None:
    conn = IngestConnection()
    assert not conn.next_is_heavy()
    small = encode_frame(THREE)
    conn.receive_data(small)
    assert not conn.next_is_heavy()
    assert conn.next_event() == Payload(body=THREE, records=3)
    big = encode_frame(orjson.dumps([{"t": "x", "p": "a" * ingest_module.HEAVY_FRAME_BYTES}]))
    conn.receive_data(big[:-1])
    assert not conn.next_is_heavy()  # not whole yet: nothing to do
    conn.receive_data(big[-1:])
    assert conn.next_is_heavy()
    assert isinstance(conn.next_event(), Payload)
    conn.receive_data(encode_frame(gzip.compress(THREE)))
    assert conn.next_is_heavy()


def test_head_frame_bytes_is_the_announced_size_once_the_prefix_arrives() -> None:
    conn = IngestConnection()
    assert conn.head_frame_bytes == 0
    conn.receive_data(b"100")
    assert conn.head_frame_bytes == 3  # no colon yet: what is buffered
    conn.receive_data(b"0:v1:")
    assert conn.head_frame_bytes == len(b"1000:") + 1000
    frame = encode_frame(THREE)
    conn = IngestConnection()
    conn.receive_data(frame + frame[:5])
    assert conn.head_frame_bytes == len(frame)
    conn.next_event()
    assert conn.head_frame_bytes == len(frame)  # the next one, announced in its first 5 bytes

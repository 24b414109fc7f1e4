"""Properties of the sans-IO ingest protocol core.

- Round trip: records framed by `encode_frame` (plain or gzip, with or
  without a token) come out of `IngestConnection` as the same records.
- Chunking: the events do not depend on how the stream is cut into reads.
- h11's fuzz invariant: arbitrary bytes, cut anyhow, then end of stream,
  give events or `RemoteProtocolError`, never another exception, and the
  `next_event` loop always ends.
- Replies: `ReplyParser` reads back any sequence of OK/ERROR, cut anyhow.

Sync tests: the core does no I/O, so there is nothing to run under Trio.
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Callable
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from z4j.protocol.errors import RemoteProtocolError
from z4j.protocol.ingest import (
    ERROR,
    MAX_KIND_LENGTH,
    NEED_DATA,
    OK,
    REJECT_REASONS,
    SEPARATORS_PER_RECORD,
    ConnectionClosed,
    IngestConnection,
    Payload,
    Ping,
    Rejected,
    ReplyParser,
    encode_frame,
)

Event = Payload | Ping | Rejected | ConnectionClosed
# What a run of a connection gave: its events and, if the stream broke, the
# reason of the RemoteProtocolError that ended it.
Outcome = tuple[list[Event], str | None]

TOKEN = "s3cret"

# -- strategies ------------------------------------------------------------------------

# Any text JSON can carry, except NUL (which the protocol refuses on purpose),
# and a few that look like a NUL escape, or need escaping, once encoded.
text = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20
) | st.sampled_from(["\\u0000", "\\\\u0000", "u0000\\", '"\\', "\u2028", "\U0001f600"])
kinds = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=MAX_KIND_LENGTH
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)
records_st = st.lists(
    st.tuples(kinds, st.dictionaries(text, json_values, max_size=5)).map(
        lambda kind_extra: {**kind_extra[1], "t": kind_extra[0]}
    ),
    max_size=8,
)

Encoder = Callable[[list[dict[str, Any]]], bytes]
ENCODERS: list[Encoder] = [
    orjson.dumps,
    lambda r: json.dumps(r).encode(),  # \uXXXX escapes, surrogate pairs
    lambda r: json.dumps(r, ensure_ascii=False, indent=1).encode(),  # raw UTF-8, whitespace
]

# Whole frames whose content is bad: the stream stays in sync after each.
INVALID_CONTENT_FRAMES = [
    encode_frame(b"[", token=TOKEN),
    encode_frame(b'{"t":"x"}', token=TOKEN),
    encode_frame(b"[1]", token=TOKEN),
    encode_frame(b'[{"t":""}]', token=TOKEN),
    encode_frame(b'[{"t":"x\\u0000"}]', token=TOKEN),
    encode_frame(b"\x1f\x8bnot gzip", token=TOKEN),
    encode_frame(gzip.compress(b'[{"t":"x"}]')[:-4], token=TOKEN),
    b"13:v2:0000000:[]",
    b"10:v1:0000000",
]


@st.composite
def valid_frames(draw: st.DrawFn) -> bytes:
    body = draw(st.sampled_from(ENCODERS))(draw(records_st))
    if draw(st.booleans()):
        body = gzip.compress(body, compresslevel=draw(st.integers(0, 9)))
    return encode_frame(body, token=TOKEN)


frames = st.one_of(
    valid_frames(),
    st.sampled_from(INVALID_CONTENT_FRAMES),
    st.just(encode_frame(b"PING", token=TOKEN)),
)

# Tails that break the framing for good, to check the error is cut-independent too.
broken_tails = st.sampled_from(
    [
        b"",
        b"",
        b"x",
        b"12",
        b"abc:",
        b"0123:",
        b"999999999:",
        b"GET / HTTP/1.1\r\n",
        b"20:v1:",
        encode_frame(b"[]", token="wrong"),  # a wrong token ends the connection
    ]
)


@st.composite
def fuzz_streams(draw: st.DrawFn) -> bytes:
    """Mostly-framed noise: reaches past the framing into the content checks."""
    bodies = st.one_of(
        st.binary(max_size=40),
        st.binary(max_size=40).map(lambda b: b"v1:0000000:" + b),
        st.binary(max_size=40).map(lambda b: b"v1:0000000:\x1f\x8b" + b),
        st.binary(max_size=40).map(lambda b: b"v1:0000000:[" + b),
    )
    pieces = st.one_of(
        st.binary(max_size=20),
        bodies.map(lambda b: b"%d:%s" % (len(b), b)),
        frames,
        frames.flatmap(
            lambda f: st.tuples(st.integers(0, len(f) - 1), st.integers(0, 255)).map(
                lambda at: f[: at[0]] + bytes([at[1]]) + f[at[0] + 1 :]
            )
        ),
    )
    return b"".join(draw(st.lists(pieces, max_size=6)))


def split(data: st.DataObject, stream: bytes) -> list[bytes]:
    """Cut ``stream`` into reads at points Hypothesis picks."""
    if data.draw(st.booleans(), label="byte at a time") and len(stream) <= 2000:
        return [stream[i : i + 1] for i in range(len(stream))]
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12).map(sorted), label="cuts")
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def run(chunks: list[bytes], **kwargs: Any) -> Outcome:
    """Feed ``chunks`` then end of stream, pulling events after each read.

    Asserts the h11 invariant on the way: only events or RemoteProtocolError,
    a dead connection stays dead, and the loop ends (each event consumes at
    least the two bytes of ``0:``, so it cannot take more calls than that).
    """
    conn = IngestConnection(**kwargs)
    events: list[Event] = []
    budget = sum(map(len, chunks)) // 2 + len(chunks) + 2
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while True:
            budget -= 1
            assert budget >= 0, "next_event did not settle"
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                assert exc.reason in REJECT_REASONS
                try:
                    conn.next_event()
                except RemoteProtocolError as again:
                    assert again.reason == exc.reason
                else:
                    raise AssertionError("connection not dead after a RemoteProtocolError")
                return events, exc.reason
            if event is NEED_DATA:
                assert chunk, "NEED_DATA after end of stream"
                break
            assert isinstance(event, Payload | Ping | Rejected | ConnectionClosed), event
            events.append(event)
            if isinstance(event, ConnectionClosed):
                assert not chunk
                return events, None
    raise AssertionError("end of stream gave neither ConnectionClosed nor an error")


# -- properties ---------------------------------------------------------------------------


@given(
    records=records_st,
    encode=st.sampled_from(ENCODERS),
    compress=st.booleans(),
    token=st.none() | st.text(min_size=1, max_size=20),
)
def test_records_round_trip(
    records: list[dict[str, Any]], encode: Encoder, compress: bool, token: str | None
) -> None:
    body = encode(records)
    sent = gzip.compress(body) if compress else body
    events, error = run([encode_frame(sent, token=token)], token=token)
    assert error is None
    [payload, closed] = events
    assert closed == ConnectionClosed()
    assert isinstance(payload, Payload), payload
    assert payload.body == body
    assert payload.records == len(records)
    assert json.loads(payload.body) == records


@given(stream_frames=st.lists(frames, max_size=6), tail=broken_tails, data=st.data())
def test_events_do_not_depend_on_chunking(
    stream_frames: list[bytes], tail: bytes, data: st.DataObject
) -> None:
    stream = b"".join(stream_frames) + tail
    whole = run([stream] if stream else [], token=TOKEN)
    # One event per frame, then ConnectionClosed, or the tail's error.
    events, error = whole
    assert len(events) == len(stream_frames) + (error is None)
    assert (error is None) == (tail == b"")
    assert run(split(data, stream), token=TOKEN) == whole


@given(stream=st.binary(max_size=200) | fuzz_streams(), data=st.data())
def test_arbitrary_bytes_give_events_or_remote_protocol_error(
    stream: bytes, data: st.DataObject
) -> None:
    limit = data.draw(st.sampled_from([10 * 1024 * 1024, 64, 1]), label="max_frame_bytes")
    token = data.draw(st.sampled_from([None, TOKEN]), label="token")
    # run() asserts the invariant; a different exception fails the test.
    outcome = run(split(data, stream), max_frame_bytes=limit, token=token)
    # And the outcome does not depend on the cuts.
    assert outcome == run([stream] if stream else [], max_frame_bytes=limit, token=token)


def json_values_in(value: object) -> int:
    """Values and keys in a parsed document: what its parse costs, roughly."""
    if isinstance(value, list):
        return 1 + sum(json_values_in(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(1 + json_values_in(v) for v in value.values())
    return 1


@given(
    records=records_st,
    encode=st.sampled_from(ENCODERS),
    max_records=st.integers(1, 12),
)
def test_accepted_payloads_are_within_the_cost_bound(
    records: list[dict[str, Any]], encode: Encoder, max_records: int
) -> None:
    # What the drain will parse again is bounded by the record cap: at most
    # max_records containers and SEPARATORS_PER_RECORD times as many values.
    body = encode(records)
    events, error = run([encode_frame(body)], max_records=max_records)
    assert error is None
    if isinstance(events[0], Payload):
        parsed = json.loads(body)
        assert len(parsed) <= max_records
        assert json_values_in(parsed) <= 1 + (2 + SEPARATORS_PER_RECORD) * max_records
    else:
        assert isinstance(events[0], Rejected) and events[0].reason == "too_many_records"
        assert len(records) > max_records or json_values_in(records) > 1 + max_records


@given(replies=st.lists(st.booleans(), max_size=30), data=st.data())
def test_reply_parser_reads_back_any_reply_sequence(
    replies: list[bool], data: st.DataObject
) -> None:
    parser = ReplyParser()
    parsed: list[bool] = []
    for chunk in split(data, b"".join(OK if r else ERROR for r in replies)):
        parser.receive_data(chunk)
        parsed += parser.replies()
    assert parsed == replies

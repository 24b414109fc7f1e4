"""The sans-IO WebSocket fast path (`z4j.protocol.websocket`), with bytes only.

- Examples: each kind of frame gives the event the module docstring
  promises; an oversize data frame fails at its header.
- wsproto agrees: what a wsproto client sends comes out as the messages it
  sent, and our server frames read back in a wsproto client.
- Chunking: the events (and the error, if any) do not depend on how the
  stream is cut into reads.
- h11's fuzz invariant: arbitrary bytes give events or `RemoteProtocolError`
  (1009), never another exception, and the `next_event` loop always ends.

Sync tests: the parser does no I/O, so there is nothing to run under Trio.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, Message, TextMessage

from z4j.protocol.close import CloseCode
from z4j.protocol.errors import RemoteProtocolError
from z4j.protocol.websocket import (
    NEED_DATA,
    BytesReceived,
    Event,
    FrameParser,
    OtherFrame,
    TextReceived,
    encode_frame,
    unmask,
)

LIMIT = 1024
MASK = b"\x01\x80\x7f\xfe"

# What a run gave: its events and the close code of the error that ended it, if any.
Outcome = tuple[list[Event], int | None]


def header(first: int, length: int, *, masked: bool = True) -> bytes:
    bit = 0x80 if masked else 0
    if length < 126:
        return bytes((first, bit | length))
    if length < 65536:
        return struct.pack("!BBH", first, bit | 126, length)
    return struct.pack("!BBQ", first, bit | 127, length)


def frame(first: int, payload: bytes, *, masked: bool = True, mask: bytes = MASK) -> bytes:
    """A client frame: ``first`` is FIN, RSV and opcode; masked unless told."""
    if not masked:
        return header(first, len(payload), masked=False) + payload
    return header(first, len(payload)) + mask + unmask(mask, payload)


def run(chunks: list[bytes], limit: int = LIMIT) -> Outcome:
    """Feed ``chunks`` one by one, draining events after each."""
    parser = FrameParser(limit)
    events: list[Event] = []
    try:
        for chunk in chunks:
            parser.receive_data(chunk)
            while (event := parser.next_event()) is not NEED_DATA:
                assert not isinstance(event, type(NEED_DATA))
                events.append(event)
    except RemoteProtocolError as exc:
        assert exc.close_code == CloseCode.TOO_LARGE and exc.reason == "too_large"
        with pytest.raises(RemoteProtocolError):
            parser.next_event()  # finished: the same error again
        return events, exc.close_code
    return events, None


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


# -- examples --------------------------------------------------------------------------


def test_plain_data_frames_become_messages() -> None:
    data = frame(0x82, b"\x00bin") + frame(0x81, "tëxt".encode()) + frame(0x82, b"")
    assert run([data]) == (
        [BytesReceived(data=b"\x00bin"), TextReceived(data="tëxt"), BytesReceived(data=b"")],
        None,
    )


@pytest.mark.parametrize(
    "raw",
    [
        frame(0x89, b"ping"),  # control frames
        frame(0x88, b"\x03\xe8"),
        frame(0x82, b"x", masked=False),  # unmasked
        frame(0x81, b"\xff\xfe"),  # text that is not UTF-8
        frame(0xC2, b"x"),  # a reserved bit
        frame(0x83, b"x"),  # an unknown opcode
        frame(0x80, b"x"),  # a continuation with nothing to continue
    ],
)
def test_other_frames_pass_on_whole_and_raw(raw: bytes) -> None:
    assert run([raw]) == ([OtherFrame(data=raw)], None)


def test_a_fragmented_message_passes_on_whole_until_it_ends() -> None:
    parts = [frame(0x01, b"he"), frame(0x89, b"p"), frame(0x00, b"ll"), frame(0x80, b"o")]
    after = frame(0x82, b"next")
    assert run([b"".join(parts) + after]) == (
        [*(OtherFrame(data=p) for p in parts), BytesReceived(data=b"next")],
        None,
    )


def test_a_data_frame_inside_a_fragmented_message_passes_on() -> None:
    # Invalid (wsproto refuses it with 1002), so the fast path must not take it.
    opening, inside = frame(0x01, b"a"), frame(0x82, b"b")
    assert run([opening + inside]) == ([OtherFrame(data=opening), OtherFrame(data=inside)], None)


def test_an_over_long_control_frame_passes_on_as_its_header() -> None:
    head = header(0x89, 200)
    assert run([head]) == ([OtherFrame(data=head)], None)


@pytest.mark.parametrize("length", [LIMIT + 1, 70000, 2**63])
@pytest.mark.parametrize("first", [0x82, 0x81, 0x01, 0x00, 0x83, 0xC7])  # any non-control opcode
def test_an_oversize_data_frame_fails_at_its_header(first: int, length: int) -> None:
    assert run([header(first, length)]) == ([], CloseCode.TOO_LARGE)
    assert run([header(first, length, masked=False)]) == ([], CloseCode.TOO_LARGE)


def test_a_frame_at_the_limit_is_a_message() -> None:
    payload = bytes(range(256)) * (LIMIT // 256)
    assert run([frame(0x82, payload)]) == ([BytesReceived(data=payload)], None)


def test_nothing_is_an_event_until_a_whole_frame_is_in() -> None:
    data = frame(0x82, b"x" * 300)
    parser = FrameParser(LIMIT)
    for byte in data[:-1]:
        parser.receive_data(bytes((byte,)))
        assert parser.next_event() is NEED_DATA
    parser.receive_data(data[-1:])
    assert parser.next_event() == BytesReceived(data=b"x" * 300)
    assert parser.next_event() is NEED_DATA


@pytest.mark.parametrize("n", [0, 3, 2047, 2048, 5001])
def test_unmask_is_its_own_inverse(n: int) -> None:
    data = bytes(i * 7 % 256 for i in range(n))
    assert unmask(MASK, unmask(MASK, data)) == data
    assert unmask(MASK, data) == bytes(b ^ MASK[i % 4] for i, b in enumerate(data))


# -- wsproto agrees --------------------------------------------------------------------

messages = st.lists(
    st.binary(max_size=300).map(lambda b: BytesMessage(data=b))
    | st.text(max_size=100).map(lambda t: TextMessage(data=t)),
    max_size=6,
)


@given(messages)
def test_what_a_wsproto_client_sends_comes_out_as_its_messages(sent: list[Message]) -> None:
    client = Connection(ConnectionType.CLIENT)
    data = b"".join(client.send(m) for m in sent)
    expected = [
        BytesReceived(data=bytes(m.data))
        if isinstance(m, BytesMessage)
        else TextReceived(data=m.data)
        for m in sent
    ]
    assert run([data]) == (expected, None)


@pytest.mark.parametrize("n", [0, 125, 126, 65535, 65536])
def test_our_server_frames_read_back_in_a_wsproto_client(n: int) -> None:
    client = Connection(ConnectionType.CLIENT)
    payload = b"z" * n
    client.receive_data(encode_frame(2, payload) + encode_frame(1, b"ok"))
    got = [(type(e), e.data) for e in client.events()]
    assert got == [(BytesMessage, payload), (TextMessage, "ok")]


# -- chunking and fuzzing --------------------------------------------------------------

frames = st.one_of(
    st.binary(max_size=200).map(lambda b: frame(0x82, b)),
    st.text(max_size=60).map(lambda t: frame(0x81, t.encode())),
    st.binary(min_size=1, max_size=8).map(lambda b: frame(0x81, b"\xc3" + b)),  # bad UTF-8, often
    st.binary(max_size=125).map(lambda b: frame(0x89, b)),
    st.binary(max_size=125).map(lambda b: frame(0x8A, b)),
    st.binary(max_size=30).map(lambda b: frame(0x01, b)),  # opens a fragmented message
    st.binary(max_size=30).map(lambda b: frame(0x00, b)),
    st.binary(max_size=30).map(lambda b: frame(0x80, b)),  # ends one
    st.binary(max_size=30).map(lambda b: frame(0x82, b, masked=False)),
    st.sampled_from([0xC1, 0x93, 0x84, 0x8B]).map(lambda first: frame(first, b"r")),
    st.integers(126, 70000).map(lambda n: header(0x88, n)),  # over-long control frame
    st.binary(max_size=20),  # noise: the stream is out of step from here
)
streams = st.lists(frames, max_size=8).map(b"".join)
oversize = st.sampled_from([b"", header(0x82, LIMIT + 1), header(0x01, 1 << 40)])


@given(streams, oversize, st.lists(st.integers(min_value=0), max_size=12))
def test_the_events_do_not_depend_on_the_chunking(
    stream: bytes, tail: bytes, points: list[int]
) -> None:
    data = stream + tail
    assert run(cut(data, points)) == run([data])


@given(st.binary(max_size=600), st.lists(st.integers(min_value=0), max_size=8))
def test_arbitrary_bytes_give_events_or_the_protocol_error(data: bytes, points: list[int]) -> None:
    events, code = run(cut(data, points), limit=64)
    assert code in (None, CloseCode.TOO_LARGE)
    assert all(type(e) in (BytesReceived, TextReceived, OtherFrame) for e in events)

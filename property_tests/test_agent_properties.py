"""Properties of the agent protocol v2 core (sans-IO, no sockets).

- every frame either side may send arrives equal at the other side;
- changing any value of a signed frame gets it refused with 4403;
- a replayed, stale or reordered frame is refused with 4403;
- arbitrary bytes or arbitrary JSON give a frame or a RemoteProtocolError
  (with a close code), never another exception.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st

from z4j.protocol.agent import frames as f
from z4j.protocol.agent.connection import AgentProtocol, Role, State, _now_iso
from z4j.protocol.agent.signing import (
    SessionBinding,
    canonical_json,
    derive_project_secret,
    fast_canonical_json,
    sign,
    verify,
)
from z4j.protocol.errors import RemoteProtocolError

KEY = derive_project_secret(b"k" * 32, uuid.UUID(int=7))
NOW = 1_800_000_000.0

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)
short = st.text(min_size=1, max_size=40)
opt_short = st.none() | st.text(max_size=40)

events = st.builds(
    lambda eid, kind, extra: {**extra, "id": eid, "kind": kind},
    short,
    short,
    json_objects,
)
agent_payloads: st.SearchStrategy[Any] = st.one_of(
    st.builds(
        lambda evs: f.EventBatch(
            events=tuple(f.AgentEvent(id=e["id"], kind=e["kind"], raw=e) for e in evs)
        ),
        st.lists(events, max_size=5),
    ),
    st.builds(
        f.Heartbeat,
        buffer_size=st.integers(0, 10**6),
        last_flush_at=st.none() | st.just("2026-05-01T12:00:00Z"),
        dropped_events=st.integers(0, 10**6),
        adapter_health=st.dictionaries(short, short, max_size=3),
    ),
    st.builds(f.CommandAck, delivery_claim_token=opt_short),
    st.builds(
        f.CommandResult,
        status=st.sampled_from(["success", "failed"]),
        result=st.none() | json_objects,
        error=st.none() | st.text(max_size=200),
        delivery_claim_token=opt_short,
    ),
    st.builds(
        f.RegistryDelta,
        engine=short,
        added=st.lists(json_objects, max_size=3).map(tuple),
        removed=st.lists(short, max_size=3).map(tuple),
        updated=st.lists(json_objects, max_size=3).map(tuple),
    ),
    st.builds(lambda raw: f.AgentStatus(raw=raw), json_objects),
    st.builds(f.Error, code=short, message=st.text(max_size=100), fatal=st.booleans()),
)
brain_payloads: st.SearchStrategy[Any] = st.one_of(
    st.builds(
        f.Command,
        action=short,
        target=json_objects,
        parameters=json_objects,
        timeout_seconds=st.integers(1, 3600),
        issued_by=opt_short,
        delivery_claim_token=opt_short,
    ),
    st.builds(
        f.EventBatchAck,
        acked_id=short,
        received=st.integers(0, 5000),
        accepted=st.integers(0, 5000),
        rejected=st.integers(0, 5000),
    ),
    st.builds(f.Error, code=short, message=st.text(max_size=100), fatal=st.booleans()),
)


def session(clock: float = NOW) -> tuple[AgentProtocol, AgentProtocol]:
    """A brain and an agent after a completed handshake."""
    brain = AgentProtocol(Role.BRAIN, clock=lambda: clock)
    agent = AgentProtocol(Role.AGENT, key=KEY, clock=lambda: clock)
    brain.receive_message(agent.hello_message(f.Hello(protocol_version="2", worker_id="w1")))
    ack = brain.accept(
        key=KEY, agent_id="a1", project_id="p1", session_id="s1", brain_version="0.1"
    )
    agent.receive_message(ack)
    assert brain.state is agent.state is State.OPEN
    return brain, agent


@given(
    st.lists(agent_payloads, min_size=1, max_size=5),
    st.lists(brain_payloads, min_size=1, max_size=5),
)
def test_frames_round_trip_both_ways(up: list[Any], down: list[Any]) -> None:
    brain, agent = session()
    for payload in up:
        frame = brain.receive_message(agent.send(payload))
        assert frame.payload == payload
    for payload in down:
        frame = agent.receive_message(brain.send(payload))
        assert frame.payload == payload


def _leaf_paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(obj, dict) and obj:
        return [p for k, v in obj.items() for p in _leaf_paths(v, (*prefix, k))]
    if isinstance(obj, list) and obj:
        return [p for i, v in enumerate(obj) for p in _leaf_paths(v, (*prefix, i))]
    return [prefix]


@given(agent_payloads, st.data())
def test_any_change_to_a_signed_frame_is_refused(payload: Any, data: st.DataObject) -> None:
    brain, agent = session()
    frame = json.loads(agent.send(payload))
    paths = [p for p in _leaf_paths(frame) if p and p[0] != "hmac"]
    path = data.draw(st.sampled_from(paths))
    new_value = data.draw(json_scalars)
    parent = frame
    for key in path[:-1]:
        parent = parent[key]
    assume(parent[path[-1]] != new_value or type(parent[path[-1]]) is not type(new_value))
    parent[path[-1]] = new_value
    try:
        brain.receive_message(json.dumps(frame).encode())
    except RemoteProtocolError as exc:
        if path in (("type",), ("v",)):
            # A broken type or version is refused before the signature is
            # looked at, with the close code for that.
            assert exc.close_code in (1002, 1007, 4426)
        else:
            assert exc.close_code == 4403
    else:
        raise AssertionError(f"changed {path} and the frame was accepted")


@given(agent_payloads, st.sampled_from(["replay", "stale", "future", "reorder"]))
def test_replays_and_stale_frames_are_refused(payload: Any, attack: str) -> None:
    brain, agent = session()
    first = agent.send(payload)
    second = agent.send(payload)
    if attack == "replay":
        brain.receive_message(first)
        message = first
    elif attack == "reorder":
        brain.receive_message(second)
        message = first
    else:
        skewed = NOW + (-61 if attack == "stale" else 61)
        late = AgentProtocol(Role.BRAIN, clock=lambda: skewed)
        late.receive_message(
            AgentProtocol(Role.AGENT, key=KEY).hello_message(f.Hello(protocol_version="2"))
        )
        late.accept(key=KEY, agent_id="a1", project_id="p1", session_id="s1", brain_version="0.1")
        brain, message = late, first
    try:
        brain.receive_message(message)
    except RemoteProtocolError as exc:
        assert exc.close_code == 4403
    else:
        raise AssertionError(f"{attack} was accepted")


def _only_frames_or_protocol_errors(proto: AgentProtocol, message: bytes) -> None:
    try:
        proto.receive_message(message)
    except RemoteProtocolError as exc:
        assert exc.close_code in (1002, 1007, 1009, 4403, 4426)
        assert proto.state is State.CLOSED


@given(st.binary(max_size=300))
def test_arbitrary_bytes_in_any_state(message: bytes) -> None:
    _only_frames_or_protocol_errors(AgentProtocol(Role.BRAIN), message)
    _only_frames_or_protocol_errors(session()[0], message)
    _only_frames_or_protocol_errors(session()[1], message)


frame_types = st.sampled_from([*f.PAYLOADS, "nope"])


@given(
    st.fixed_dictionaries(
        {"type": frame_types, "payload": json_values},
        optional={
            "v": json_values,
            "id": json_values,
            "seq": json_values,
            "nonce": json_values,
            "ts": json_values,
            "hmac": json_values,
        },
    )
)
def test_arbitrary_json_frames_in_any_state(obj: dict[str, Any]) -> None:
    message = json.dumps(obj).encode()
    _only_frames_or_protocol_errors(AgentProtocol(Role.BRAIN), message)
    _only_frames_or_protocol_errors(session()[0], message)
    _only_frames_or_protocol_errors(session()[1], message)


# -- the fast canonical form ------------------------------------------------------------

float_free_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text()  # any code point but lone surrogates, control characters included
)
float_free_values = st.recursive(
    float_free_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=16,
)


@given(float_free_values)
def test_orjson_writes_the_reference_canonical_form_without_floats(value: Any) -> None:
    """What lets `sign` and `verify` take orjson's path: byte-equal output."""
    assert fast_canonical_json(value) == canonical_json(value)


# Where orjson and the standard library part ways: floats with a one-digit
# negative exponent (1e-07 against 1e-7) and integers beyond 64 bits (which
# orjson writes not at all and reads as floats).
tricky_numbers = st.sampled_from(
    [1e-07, 2.5e-08, 1e-05, 1e16, 1.5e300, 5e-324, 2**64, 2**70, -(2**65), 10**30]
) | st.floats(allow_nan=False, allow_infinity=False)
tricky_payloads = st.builds(
    lambda base, key, number: {**base, key: number},
    json_objects,
    st.text(max_size=4),
    tricky_numbers,
)


@given(tricky_payloads)
def test_sign_always_matches_the_reference_signature(payload: dict[str, Any]) -> None:
    """Floats and integers beyond 64 bits included: a peer checking with the
    standard library's form (as z4j-core does) accepts what we sign."""
    binding = SessionBinding(agent_id="a1", project_id="p1", session_id="s1")
    frame = {"v": 2, "id": "x", "type": "agent_status", "payload": payload}
    body = {**frame, "agent_id": "a1", "project_id": "p1", "session_id": "s1"}
    expected = hmac.new(KEY, canonical_json(body), hashlib.sha256).hexdigest()
    assert sign(frame, KEY, binding) == expected
    verify({**frame, "hmac": expected}, KEY, binding)  # raises if refused


@given(tricky_payloads)
def test_frames_signed_by_the_reference_form_are_received(payload: dict[str, Any]) -> None:
    """A frame serialised and signed the standard library's way (z4j-core's),
    floats and big integers included, is received with the payload it sent."""
    brain, _agent = session()
    frame: dict[str, Any] = {
        "v": 2,
        "id": "st_1",
        "ts": "2027-01-15T08:00:00Z",
        "nonce": "n1",
        "seq": 1,
        "type": "agent_status",
        "payload": payload,
    }
    body = {**frame, "agent_id": "a1", "project_id": "p1", "session_id": "s1"}
    frame["hmac"] = hmac.new(KEY, canonical_json(body), hashlib.sha256).hexdigest()
    wire = json.dumps(frame, ensure_ascii=False, allow_nan=False).encode()
    received = brain.receive_message(wire)
    assert isinstance(received.payload, f.AgentStatus)
    assert received.payload.raw == payload


@given(st.floats(min_value=0, max_value=4e9))
def test_frame_timestamps_read_as_the_standard_library_writes_them(now: float) -> None:
    """`_now_iso` caches the whole second's text; the result must not change."""
    expected = (
        datetime.fromtimestamp(now, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    )
    assert _now_iso(now) == expected

"""Agent protocol v2 core: examples, and interoperation with the real z4j-core.

z4j-core 1.13.0 (Apache-2.0) is what real agents sign and verify with; our
frames must pass its verifier and its frames must pass ours.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from z4j_core.transport import frames as zf
from z4j_core.transport.framing import FrameSigner, FrameVerifier

from z4j.protocol.agent import frames as f
from z4j.protocol.agent.connection import AgentProtocol, Role, State
from z4j.protocol.agent.signing import (
    SessionBinding,
    decode_secret,
    derive_project_secret,
    encode_secret,
    verify,
)
from z4j.protocol.errors import LocalProtocolError, RemoteProtocolError

MASTER = b"0123456789abcdef0123456789abcdef"
PROJECT = uuid.UUID("11111111-2222-3333-4444-555555555555")
KEY = derive_project_secret(MASTER, PROJECT)
AGENT_ID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
BINDING = SessionBinding(agent_id=AGENT_ID, project_id=str(PROJECT), session_id="sess-0001")

HELLO = {
    "v": 2,
    "id": "hello_6a75929b98628e62",
    "ts": None,
    "type": "hello",
    "payload": {
        "protocol_version": "2",
        "agent_version": "1.13.0",
        "framework": "bare",
        "engines": ["fake"],
        "schedulers": [],
        "capabilities": {"fake": ["submit_task"]},
        "host": {"name": "it-agent"},
        "worker_id": "bare-16944-1795428841131",
        "worker_role": None,
        "worker_pid": 16944,
        "worker_started_at": "2026-11-23T10:14:01.131891Z",
        "runtime_features": ["retry_by_reference"],
        "some_future_field": {"ignored": True},
    },
}


def test_key_derivation_and_secret_encoding_match_the_reference() -> None:
    # Values computed with z4j-core's own functions.
    assert KEY.hex() == "22db067e987dbace112fba8fcf1d1a33834eb6df26c40aa2c90705468a18e4b9"
    assert encode_secret(KEY) == "ItsGfph9us4RL7qPzx0aM4NOtt8mxAqiyQcFRooY5Lk="
    assert decode_secret("ItsGfph9us4RL7qPzx0aM4NOtt8mxAqiyQcFRooY5Lk") == KEY  # unpadded
    with pytest.raises(ValueError):
        decode_secret("ItsGfph9us4RL7qPzx0aM4NOtt8mxAqiyQcFRooY5Lk+")  # standard alphabet
    with pytest.raises(ValueError):
        decode_secret(encode_secret(b"short"))


def test_a_signed_reference_frame_verifies() -> None:
    wire = (
        '{"v":2,"id":"9b2f7c1e-0000-4000-8000-000000000001","ts":"2026-05-01T12:00:00Z",'
        '"nonce":"nonceAAAAAAAAAAAAAAAAA","seq":1,'
        '"hmac":"54e8918af53cfcf98feb7f6b5aad04d062187ea420f580fcdd6599f881cd716e",'
        '"type":"command","payload":{"action":"schedule.resync","target":{},"parameters":{},'
        '"timeout_seconds":60,"issued_by":null,"delivery_claim_token":"claim-123"}}'
    )
    verify(json.loads(wire), KEY, BINDING)
    tampered = json.loads(wire)
    tampered["payload"]["action"] = "schedule.fire"
    with pytest.raises(RemoteProtocolError) as info:
        verify(tampered, KEY, BINDING)
    assert info.value.close_code == 4403
    other_session = SessionBinding(agent_id=AGENT_ID, project_id=str(PROJECT), session_id="sess-2")
    with pytest.raises(RemoteProtocolError):
        verify(json.loads(wire), KEY, other_session)


def open_brain() -> AgentProtocol:
    brain = AgentProtocol(Role.BRAIN)
    frame = brain.receive_message(json.dumps(HELLO).encode())
    assert isinstance(frame.payload, f.Hello)
    assert frame.payload.worker_id == "bare-16944-1795428841131"
    assert brain.state is State.HELLO_RECEIVED
    brain.accept(
        key=KEY,
        agent_id=AGENT_ID,
        project_id=str(PROJECT),
        session_id="sess-0001",
        brain_version="1.13.0",
    )
    assert brain.state is State.OPEN
    return brain


def reference_signer() -> FrameSigner:
    return FrameSigner(
        secret=KEY, agent_id=AGENT_ID, project_id=str(PROJECT), session_id="sess-0001"
    )


def test_hello_ack_parses_with_the_reference_model() -> None:
    brain = AgentProtocol(Role.BRAIN)
    brain.receive_message(json.dumps(HELLO))
    ack = brain.accept(
        key=KEY, agent_id=AGENT_ID, project_id=str(PROJECT), session_id="s1", brain_version="1.13.0"
    )
    parsed = zf.parse_frame(ack)
    assert isinstance(parsed, zf.HelloAckFrame)
    assert parsed.payload.session_id == "s1"
    assert parsed.payload.heartbeat_interval_seconds == 10
    assert parsed.payload.max_frame_size_bytes == 1024 * 1024


def test_reference_agent_frames_pass_our_brain() -> None:
    brain = open_brain()
    signer = reference_signer()
    event = {
        "id": str(uuid.uuid4()),
        "kind": "task.succeeded",
        "engine": "fake",
        "task_id": "t-1",
        "occurred_at": datetime.now(UTC).isoformat(),
        "data": {"name": "demo.add", "note": "héllo"},
    }
    batch = zf.EventBatchFrame(
        id="ev_" + "0" * 32,
        nonce="",
        seq=0,
        hmac="",
        payload=zf.EventBatchPayload(events=[event]),
    )
    got = brain.receive_message(signer.sign_and_serialize(batch))
    assert isinstance(got.payload, f.EventBatch)
    assert got.id == "ev_" + "0" * 32
    assert got.payload.events[0].raw == event

    ack = zf.CommandAckFrame(
        id="cmd-1", nonce="", seq=0, hmac="", payload=zf.CommandAckPayload(delivery_claim_token="c")
    )
    assert brain.receive_message(signer.sign_and_serialize(ack)).payload == f.CommandAck(
        delivery_claim_token="c"
    )
    result = zf.CommandResultFrame(
        id="cmd-1",
        nonce="",
        seq=0,
        hmac="",
        payload=zf.CommandResultPayload(
            status="success", result={"ok": 1}, delivery_claim_token="c"
        ),
    )
    got_result = brain.receive_message(signer.sign_and_serialize(result)).payload
    assert got_result == f.CommandResult(
        status="success", result={"ok": 1}, delivery_claim_token="c"
    )


def test_our_brain_frames_pass_the_reference_agent() -> None:
    brain = open_brain()
    verifier = FrameVerifier(
        secret=KEY,
        agent_id=AGENT_ID,
        project_id=str(PROJECT),
        session_id="sess-0001",
        direction="brain->agent",
    )
    command = f.Command(
        action="schedule.resync",
        target={},
        parameters={"x": [1, 2.5, "é"]},
        delivery_claim_token="c1",
    )
    cmd_id = str(uuid.uuid4())
    parsed = verifier.parse_and_verify(brain.send(command, frame_id=cmd_id))
    assert isinstance(parsed, zf.CommandFrame)
    assert parsed.id == cmd_id
    assert parsed.payload.action == "schedule.resync"
    assert parsed.payload.parameters == {"x": [1, 2.5, "é"]}
    ack = verifier.parse_and_verify(
        brain.send(f.EventBatchAck(acked_id="ev_1", received=1, accepted=1, rejected=0))
    )
    assert isinstance(ack, zf.EventBatchAckFrame) and ack.payload.acked_id == "ev_1"
    err = verifier.parse_and_verify(brain.send(f.Error(code="slow_down", message="m", fatal=False)))
    assert isinstance(err, zf.ErrorFrame)


@pytest.mark.parametrize(
    ("message", "close_code", "reason"),
    [
        (b"{", 1007, "bad_json"),
        (b"[1]", 1007, "bad_frame"),
        (b'{"type": 5}', 1007, "bad_frame"),
        (json.dumps({**HELLO, "type": "heartbeat"}).encode(), 1002, "unexpected_frame"),
        (
            json.dumps(
                {**HELLO, "payload": {**HELLO["payload"], "protocol_version": "1"}}
            ).encode(),  # type: ignore[dict-item]
            4426,
            "bad_version",
        ),
        (
            json.dumps({**HELLO, "payload": {**HELLO["payload"], "worker_pid": "12"}}).encode(),  # type: ignore[dict-item]
            1007,
            "bad_payload",
        ),
        (b"x" * (1024 * 1024 + 1), 1009, "too_large"),
    ],
)
def test_handshake_errors_carry_their_close_code(
    message: bytes, close_code: int, reason: str
) -> None:
    brain = AgentProtocol(Role.BRAIN)
    with pytest.raises(RemoteProtocolError) as info:
        brain.receive_message(message)
    assert (info.value.close_code, info.value.reason) == (close_code, reason)
    assert brain.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        brain.receive_message(json.dumps(HELLO))


def test_frames_of_the_wrong_direction_or_unknown_type_are_refused() -> None:
    brain = open_brain()
    signer = reference_signer()
    command = zf.CommandFrame(
        id="c", nonce="", seq=0, hmac="", payload=zf.CommandPayload(action="x")
    )
    with pytest.raises(RemoteProtocolError) as info:
        brain.receive_message(signer.sign_and_serialize(command))
    assert info.value.close_code == 1002
    with pytest.raises(LocalProtocolError):
        open_brain().send(f.Heartbeat())  # a brain never sends heartbeats


def test_wrong_state_calls_are_local_errors() -> None:
    brain = AgentProtocol(Role.BRAIN)
    with pytest.raises(LocalProtocolError):
        brain.send(f.EventBatchAck(acked_id="x", received=0, accepted=0, rejected=0))
    with pytest.raises(LocalProtocolError):
        brain.accept(key=KEY, agent_id="a", project_id="p", brain_version="1")
    agent = AgentProtocol(Role.AGENT, key=KEY)
    agent.hello_message(f.Hello(protocol_version="2"))
    with pytest.raises(LocalProtocolError):
        agent.hello_message(f.Hello(protocol_version="2"))

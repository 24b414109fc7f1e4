"""Signing-secret rotation in the sans-IO agent protocol, against z4j-core's signer.

A rotated project key is of a later generation (generation 0 is the key
of before, unchanged); during a grace the brain accepts with the current
and the previous key, the first signed frame settles which, and the
session then keeps that key both ways (an agent on the previous secret
verifies the brain's frames). A key of neither is refused 4403.
"""

from __future__ import annotations

import json

import pytest
from test_agent_protocol import AGENT_ID, HELLO, KEY, MASTER, PROJECT
from z4j_core.transport import frames as zf
from z4j_core.transport.framing import FrameSigner, FrameVerifier

from z4j.protocol.agent import frames as f
from z4j.protocol.agent.connection import AgentProtocol, Role
from z4j.protocol.agent.signing import derive_project_secret
from z4j.protocol.close import CloseCode
from z4j.protocol.errors import RemoteProtocolError

SESSION = "sess-rot"
CURRENT, PREVIOUS = (derive_project_secret(MASTER, PROJECT, g) for g in (2, 1))


def test_generation_zero_is_the_key_of_before_and_later_ones_differ() -> None:
    assert derive_project_secret(MASTER, PROJECT, 0) == KEY
    keys = {derive_project_secret(MASTER, PROJECT, g) for g in range(4)}
    assert len(keys) == 4
    with pytest.raises(ValueError):
        derive_project_secret(MASTER, PROJECT, -1)
    with pytest.raises(ValueError):
        derive_project_secret(MASTER, PROJECT, 2**31)


def brain_in_rotation() -> AgentProtocol:
    brain = AgentProtocol(Role.BRAIN)
    brain.receive_message(json.dumps(HELLO))
    brain.accept(
        key=CURRENT,
        other_keys=(PREVIOUS,),
        agent_id=AGENT_ID,
        project_id=str(PROJECT),
        session_id=SESSION,
        brain_version="1.13.0",
    )
    return brain


def signer(key: bytes) -> FrameSigner:
    return FrameSigner(secret=key, agent_id=AGENT_ID, project_id=str(PROJECT), session_id=SESSION)


def heartbeat() -> zf.HeartbeatFrame:
    return zf.HeartbeatFrame(id="hb-1", nonce="", seq=0, hmac="", payload=zf.HeartbeatPayload())


@pytest.mark.parametrize(
    ("key", "index"), [(CURRENT, 0), (PREVIOUS, 1)], ids=["current", "previous"]
)
def test_the_first_signed_frame_settles_the_key_for_the_session(key: bytes, index: int) -> None:
    brain = brain_in_rotation()
    agent = signer(key)
    assert isinstance(
        brain.receive_message(agent.sign_and_serialize(heartbeat())).payload, f.Heartbeat
    )
    assert brain.key_index == index and brain.peer_proven
    # The brain signs with that key: the agent's own verifier takes its frames.
    sent = brain.send(f.Command(action="schedule.resync", delivery_claim_token="c"))
    verifier = FrameVerifier(
        secret=key,
        agent_id=AGENT_ID,
        project_id=str(PROJECT),
        session_id=SESSION,
        direction="brain->agent",
    )
    assert isinstance(verifier.parse_and_verify(sent), zf.CommandFrame)
    # ...and holds the agent to it: the other key is refused from now on.
    other = signer(PREVIOUS if key == CURRENT else CURRENT)
    with pytest.raises(RemoteProtocolError) as info:
        brain.receive_message(other.sign_and_serialize(heartbeat()))
    assert info.value.close_code == CloseCode.FORBIDDEN


def test_a_key_of_neither_generation_is_refused_with_4403() -> None:
    brain = brain_in_rotation()
    with pytest.raises(RemoteProtocolError) as info:
        brain.receive_message(signer(KEY).sign_and_serialize(heartbeat()))
    assert info.value.close_code == CloseCode.FORBIDDEN
    assert info.value.reason == "bad_signature"

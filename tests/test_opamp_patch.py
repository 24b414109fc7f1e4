"""An acknowledgement's narrow row write (store/opamp.py `AgentPatch`), on both stores.

A known agent whose message moved only its remote configuration status is
written by an UPDATE of the columns that moved rather than the whole row
with its derived summary. What is read back must be exactly what the whole
write (`record_of`) would have left, the history row must carry the new
status, and a row that has gone meanwhile is written whole from the patch.
"""

from __future__ import annotations

import attrs
import trio

from z4j.config import Config
from z4j.protocol.opamp import AgentCapability, Change
from z4j.protocol.opamp import opamp_pb2 as pb
from z4j.protocol.opamp.state import AgentState
from z4j.store import store_for
from z4j.store.opamp import AgentPatch, StateWrite, patch_of, record_of

UID = bytes(range(16))
OTHER = bytes(range(16, 32))
NOW = 1_000_000.0


def _state(status: int, seq: int, requests: int = 0) -> AgentState:
    description = pb.AgentDescription()
    kv = description.identifying_attributes.add()
    kv.key, kv.value.string_value = "service.name", "checkout"
    kv = description.non_identifying_attributes.add()
    kv.key, kv.value.string_value = "host.name", "web-1"
    health = pb.ComponentHealth(healthy=True, status="ok")
    reported = pb.RemoteConfigStatus(last_remote_config_hash=b"\x01" * 32, status=status)
    return AgentState(
        instance_uid=UID,
        sequence_num=seq,
        capabilities=AgentCapability.REPORTS_STATUS | AgentCapability.ACCEPTS_REMOTE_CONFIG,
        connected=True,
        full_state_requests=requests,
        agent_description=description.SerializeToString(deterministic=True),
        health=health.SerializeToString(deterministic=True),
        remote_config_status=reported.SerializeToString(deterministic=True),
    )


async def test_a_patch_leaves_what_a_whole_write_would(config: Config) -> None:
    store = store_for(config)
    try:
        await store.migrate()
        project = await store.create_project("patch")
        first = record_of(
            project.id,
            _state(pb.RemoteConfigStatus.STATUS_APPLYING, 3),
            transport="websocket",
            first_seen=NOW,
            last_seen=NOW,
            disconnected_at=None,
        )
        await store.write_opamp_states([StateWrite(first, None, None, ("connected",))])

        acked = _state(pb.RemoteConfigStatus.STATUS_APPLIED, 4, requests=1)
        times = {"transport": "websocket", "first_seen": NOW, "disconnected_at": None}
        patch = patch_of(project.id, acked, last_seen=NOW + 5, **times)  # type: ignore[arg-type]
        assert isinstance(patch, AgentPatch)
        await store.write_opamp_states(
            [StateWrite(patch, None, None, (Change.REMOTE_CONFIG_STATUS.value,))]
        )
        whole = record_of(project.id, acked, last_seen=NOW + 5, **times)  # type: ignore[arg-type]
        row, _ = await store.load_opamp_agent(project.id, UID)
        assert row == whole
        assert row is not None and row.remote_config_status is not None
        assert row.remote_config_status["status"] == "applied"
        assert row.identifying == {"service.name": "checkout"}  # kept, not rewritten
        history = await store.list_opamp_history(project.id, UID, limit=10)
        assert [e.changes for e in history[:1]] == [["remote_config_status"]]
        assert history[0].details["remote_config_status"] == whole.remote_config_status

        # The row gone meanwhile (another replica gave the agent a new id and
        # moved its row there): the patch writes the row whole again.
        moved = record_of(
            project.id,
            attrs.evolve(acked, instance_uid=OTHER),
            last_seen=NOW + 6,
            **times,  # type: ignore[arg-type]
        )
        await store.write_opamp_states([StateWrite(moved, UID, None, ("instance_uid",))])
        assert (await store.load_opamp_agent(project.id, UID))[0] is None
        later = attrs.evolve(acked, sequence_num=5)
        patch = patch_of(project.id, later, last_seen=NOW + 9, **times)  # type: ignore[arg-type]
        await store.write_opamp_states([StateWrite(patch, None, None, ())])
        row, _ = await store.load_opamp_agent(project.id, UID)
        assert row == record_of(project.id, later, last_seen=NOW + 9, **times)  # type: ignore[arg-type]
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()

"""The agent side of OpAMP, as the specification writes it: bits, parts, messages.

The messages are the protobuf of opamp-spec's ``opamp.proto`` (the module
generated from it, `z4j.protocol.opamp.opamp_pb2`: the wire format, not the
server's rules). The bits and which capability promises which part of a
full report are written here from the specification, not imported from the
brain, so that the suite and the server cannot share a mistake.
"""

from __future__ import annotations

import functools
import gzip
from typing import Final

from z4j.protocol.opamp import opamp_pb2 as pb

__all__ = [
    "ACCEPTS_REMOTE_CONFIG",
    "ACCEPTS_STATUS",
    "BAD_REQUEST",
    "REMOTE_CONFIG_APPLIED",
    "REPORTS_EFFECTIVE_CONFIG",
    "REPORTS_HEALTH",
    "REPORTS_HEARTBEAT",
    "REPORTS_REMOTE_CONFIG",
    "REPORTS_STATUS",
    "REPORT_FULL_STATE",
    "REQUEST_INSTANCE_UID",
    "UID_BYTES",
    "full_parts",
    "gzip_bomb",
    "show_reply",
    "show_request",
]

UID_BYTES: Final = 16  # "MUST be 16 bytes long"

# AgentCapabilities
REPORTS_STATUS: Final = 0x1  # every Agent sets it
ACCEPTS_REMOTE_CONFIG: Final = 0x2
REPORTS_EFFECTIVE_CONFIG: Final = 0x4
REPORTS_HEALTH: Final = 0x800
REPORTS_REMOTE_CONFIG: Final = 0x1000
REPORTS_HEARTBEAT: Final = 0x2000
# ServerCapabilities
ACCEPTS_STATUS: Final = 0x1  # "MUST be set, since all Servers MUST be able to accept status"
# AgentToServerFlags, ServerToAgentFlags
REQUEST_INSTANCE_UID: Final = 0x1
REPORT_FULL_STATE: Final = 0x1
# ServerErrorResponseType
BAD_REQUEST: Final = 1
# RemoteConfigStatuses
REMOTE_CONFIG_APPLIED: Final = pb.RemoteConfigStatus.STATUS_APPLIED  # 1

# The status parts a full report carries, and the capability that promises
# each (the description is always part of it).
PROMISED: Final = {
    "health": REPORTS_HEALTH,
    "effective_config": REPORTS_EFFECTIVE_CONFIG,
    "remote_config_status": REPORTS_REMOTE_CONFIG,
}
PARTS: Final = ("agent_description", *PROMISED)


def full_parts(capabilities: int) -> tuple[str, ...]:
    """The parts of a full report from an agent with ``capabilities``."""
    return ("agent_description", *(p for p, bit in PROMISED.items() if capabilities & bit))


@functools.cache
def gzip_bomb(limit: int) -> bytes:
    """A small gzip body that inflates to one byte more than ``limit``."""
    return gzip.compress(bytes(limit + 1), 9)


def _names(value: int, names: dict[int, str]) -> str:
    found = [name for bit, name in names.items() if value & bit]
    rest = value & ~sum(names)
    if rest:
        found.append(hex(rest))
    return "|".join(found) or "0"


_AGENT_CAPS = {
    REPORTS_STATUS: "ReportsStatus",
    ACCEPTS_REMOTE_CONFIG: "AcceptsRemoteConfig",
    REPORTS_EFFECTIVE_CONFIG: "ReportsEffectiveConfig",
    REPORTS_HEALTH: "ReportsHealth",
    REPORTS_REMOTE_CONFIG: "ReportsRemoteConfig",
    REPORTS_HEARTBEAT: "ReportsHeartbeat",
}


def show_request(message: pb.AgentToServer) -> str:
    """One transcript line for a message we send."""
    parts = [p for p in PARTS if message.HasField(p)]
    text = (
        f"AgentToServer uid={message.instance_uid.hex()[:8]}… seq={message.sequence_num} "
        f"caps={_names(message.capabilities, _AGENT_CAPS)} parts=[{','.join(parts)}]"
    )
    if message.flags:
        text += f" flags={_names(message.flags, {REQUEST_INSTANCE_UID: 'RequestInstanceUid'})}"
    if message.HasField("agent_disconnect"):
        text += " agent_disconnect"
    return text


def show_reply(reply: pb.ServerToAgent) -> str:
    """One transcript line for a ServerToAgent."""
    text = f"ServerToAgent uid={reply.instance_uid.hex()[:8] or '(empty)'}"
    if len(reply.instance_uid) > 4:
        text += "…"
    if reply.HasField("error_response"):
        error = reply.error_response
        text += f" error_response(type={error.type}, {error.error_message[:80]!r})"
    text += f" caps={hex(reply.capabilities)}"
    if reply.flags:
        text += f" flags={_names(reply.flags, {REPORT_FULL_STATE: 'ReportFullState'})}"
    if reply.HasField("agent_identification"):
        new = reply.agent_identification.new_instance_uid
        text += f" new_instance_uid={new.hex()[:8]}… ({len(new)} bytes)"
    if reply.HasField("remote_config"):
        text += f" remote_config(hash={reply.remote_config.config_hash.hex()[:8]}…)"
    return text

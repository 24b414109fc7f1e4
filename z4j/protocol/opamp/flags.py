"""The OpAMP bit masks as Python flags: capabilities both ways, and message flags.

The generated module has the same values as plain ints (``opamp_pb2``);
these `enum.IntFlag` twins let the rules read as ``ACCEPTS_REMOTE_CONFIG in
caps`` and print as names. tests/test_opamp_core.py pins every member to the
value the .proto gives it, so the two cannot drift.

Bits a peer sets that we do not know survive in the int (``IntFlag`` keeps
them) and simply match no member: the specification reserves them for
capabilities a newer peer may have, which we ignore.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "SERVER_CAPABILITIES",
    "AgentCapability",
    "AgentFlag",
    "ServerCapability",
    "ServerFlag",
]


class AgentCapability(enum.IntFlag):
    """What an Agent says it can do (``AgentToServer.capabilities``)."""

    REPORTS_STATUS = 0x1
    ACCEPTS_REMOTE_CONFIG = 0x2
    REPORTS_EFFECTIVE_CONFIG = 0x4
    ACCEPTS_PACKAGES = 0x8
    REPORTS_PACKAGE_STATUSES = 0x10
    REPORTS_OWN_TRACES = 0x20
    REPORTS_OWN_METRICS = 0x40
    REPORTS_OWN_LOGS = 0x80
    ACCEPTS_OPAMP_CONNECTION_SETTINGS = 0x100
    ACCEPTS_OTHER_CONNECTION_SETTINGS = 0x200
    ACCEPTS_RESTART_COMMAND = 0x400
    REPORTS_HEALTH = 0x800
    REPORTS_REMOTE_CONFIG = 0x1000
    REPORTS_HEARTBEAT = 0x2000
    REPORTS_AVAILABLE_COMPONENTS = 0x4000
    REPORTS_CONNECTION_SETTINGS_STATUS = 0x8000


class ServerCapability(enum.IntFlag):
    """What a Server says it can do (``ServerToAgent.capabilities``)."""

    ACCEPTS_STATUS = 0x1
    OFFERS_REMOTE_CONFIG = 0x2
    ACCEPTS_EFFECTIVE_CONFIG = 0x4
    OFFERS_PACKAGES = 0x8
    ACCEPTS_PACKAGES_STATUS = 0x10
    OFFERS_CONNECTION_SETTINGS = 0x20
    ACCEPTS_CONNECTION_SETTINGS_REQUEST = 0x40


class AgentFlag(enum.IntFlag):
    """``AgentToServer.flags``."""

    REQUEST_INSTANCE_UID = 0x1


class ServerFlag(enum.IntFlag):
    """``ServerToAgent.flags``."""

    REPORT_FULL_STATE = 0x1
    REPORT_AVAILABLE_COMPONENTS = 0x2


SERVER_CAPABILITIES: Final = (
    ServerCapability.ACCEPTS_STATUS
    | ServerCapability.OFFERS_REMOTE_CONFIG
    | ServerCapability.ACCEPTS_EFFECTIVE_CONFIG
)
"""What z4j's OpAMP server does: status (with health, description and
effective configuration) in, remote configuration out. No packages and no
connection settings: we never claim what we would not honour."""

"""WebSocket close codes: every value z4j sends or reads, and what each means.

The agent socket (``/ws/agent``), the dashboard socket and the WebSocket
layer under both speak one wire, so their codes live in one `CloseCode`.
Beside each member, `CLOSINGS` says what the code means, how a z4j agent
reconnects after it (`Retry`) and whose fault it is (`Fault`), so that the
brain that sends a code and the agent that reads it cannot drift apart.
docs/agent-protocol.md ("Close codes") and docs/agents.md (the backoff
table) are the same table for readers; tests/test_close_codes.py pins it.

Values are the wire: never renumber a member. The conformance suite spells
the numbers out on its own, on purpose.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

import attrs

__all__ = ["CLOSINGS", "CloseCode", "Closing", "Fault", "Retry", "retry_after"]


class CloseCode(enum.IntEnum):
    """A WebSocket close code z4j sends or acts on (see `CLOSINGS`)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    ABNORMAL = 1006
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    TOO_LARGE = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    REPLACED = 4002
    REVOKED = 4003
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403
    IDLE = 4408
    VERSION = 4426
    VERSION_UNSUPPORTED = 4427
    RATE_LIMITED = 4429


class Retry(enum.Enum):
    """How a z4j agent reconnects after a close (docs/agents.md, "Backoff")."""

    TRANSIENT = "transient"  # `backoff`: 0.5 s .. 30 s
    AUTH = "auth"  # credentials: `auth_backoff`, 10 s .. 600 s, logged as an error
    INCOMPATIBLE = "incompatible"  # `incompatible_backoff`, 120 s .. 3600 s, logged


class Fault(enum.Enum):
    """Whose doing the close is, as the side that sends it sees it."""

    NONE = "none"  # nobody's: a normal end, a shutdown, a newer connection
    PEER = "peer"  # the peer broke the protocol, a limit, or lacks credentials
    LOCAL = "local"  # the closing side's own trouble (a bug, the store away)


@attrs.frozen(kw_only=True)
class Closing:
    """What one close code means and how it is classified.

    ``retry`` is the agent's class for the code; ``retry_in_handshake``,
    where it differs, the class when the code comes before ``hello_ack``.
    """

    meaning: str
    retry: Retry
    fault: Fault
    retry_in_handshake: Retry | None = None


_C = CloseCode
_T, _A, _I = Retry.TRANSIENT, Retry.AUTH, Retry.INCOMPATIBLE

# The table: one row per member, in code order.
CLOSINGS: Final[Mapping[CloseCode, Closing]] = MappingProxyType(
    {
        _C.NORMAL: Closing(meaning="normal end (an agent's stop)", retry=_T, fault=Fault.NONE),
        _C.GOING_AWAY: Closing(
            meaning="the brain is stopping: reconnect, perhaps elsewhere",
            retry=_T,
            fault=Fault.NONE,
        ),
        _C.PROTOCOL_ERROR: Closing(
            meaning="a frame out of order, of an unknown type, or a malformed WebSocket frame",
            retry=_T,
            fault=Fault.PEER,
        ),
        _C.UNSUPPORTED_DATA: Closing(
            meaning="a text message where only binary is spoken (OpAMP)",
            retry=_T,
            fault=Fault.PEER,
        ),
        _C.ABNORMAL: Closing(
            meaning="never sent: the connection ended without a close frame",
            retry=_T,
            fault=Fault.NONE,
        ),
        _C.INVALID_DATA: Closing(
            meaning="not UTF-8 or not JSON, or a frame or payload that does not fit",
            retry=_T,
            fault=Fault.PEER,
        ),
        _C.POLICY_VIOLATION: Closing(
            meaning="dashboard socket too slow to keep up, or an upgrade on a reused connection",
            retry=_T,
            fault=Fault.PEER,
        ),
        _C.TOO_LARGE: Closing(
            meaning="a message over the size limit (Z4J_WS_MAX_FRAME_BYTES; OpAMP: Z4J_OPAMP_MAX_MESSAGE_BYTES)",
            retry=_T,
            fault=Fault.PEER,
        ),
        _C.INTERNAL_ERROR: Closing(
            meaning="an error inside the closing side: reconnect",
            retry=_T,
            fault=Fault.LOCAL,
        ),
        _C.TRY_AGAIN_LATER: Closing(
            meaning="the store is not reachable: try again later",
            retry=_T,
            fault=Fault.LOCAL,
        ),
        _C.REPLACED: Closing(
            meaning="replaced by a newer connection of the same worker",
            retry=_T,
            fault=Fault.NONE,
        ),
        _C.REVOKED: Closing(
            meaning="the agent was revoked while connected",
            retry=_A,
            fault=Fault.PEER,
        ),
        _C.UNAUTHORIZED: Closing(
            meaning="no or a wrong bearer token (agent or dashboard)",
            retry=_A,
            fault=Fault.PEER,
        ),
        _C.FORBIDDEN: Closing(
            meaning="a frame unsigned, wrongly signed or replayed; the dashboard's origin refused",
            retry=_T,
            retry_in_handshake=_A,
            fault=Fault.PEER,
        ),
        _C.IDLE: Closing(
            meaning="no frame for 3 heartbeat intervals, or no hello within 10 s",
            retry=_T,
            fault=Fault.PEER,
        ),
        _C.VERSION: Closing(
            meaning="a protocol version other than 2",
            retry=_I,
            fault=Fault.PEER,
        ),
        _C.VERSION_UNSUPPORTED: Closing(
            meaning="the peer's version is no longer supported (never sent by a z4j brain)",
            retry=_I,
            fault=Fault.PEER,
        ),
        _C.RATE_LIMITED: Closing(
            meaning="over a rate limit, or the agent's worker cap is full",
            retry=_T,
            fault=Fault.PEER,
        ),
    }
)


def retry_after(code: int, *, handshake: bool) -> Retry:
    """The agent's backoff class after a close with ``code``.

    ``handshake``: the close came before ``hello_ack``. A code not in the
    table (another brain's, a proxy's) is transient.
    """
    try:
        closing = CLOSINGS[CloseCode(code)]
    except ValueError:
        return Retry.TRANSIENT
    if handshake and closing.retry_in_handshake is not None:
        return closing.retry_in_handshake
    return closing.retry

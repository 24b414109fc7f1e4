"""The two error answers: a malformed message, and a server too busy to read one.

With ``error_response`` set, OpAMP wants every later field of the
`ServerToAgent` unset (capabilities included), so these replies carry the
agent's ``instance_uid`` and the error only. An agent must not retry a
BAD_REQUEST; after UNAVAILABLE it waits ``retry_info`` (or backs off) and
comes back. Over plain HTTP the transport may answer overload with 503 and
``Retry-After`` instead; `retry_after_seconds` gives the header's value.
"""

from __future__ import annotations

import math

from . import opamp_pb2 as pb
from .codec import OpampDecodeError

__all__ = ["bad_request", "retry_after_seconds", "unavailable"]

_NANOS = 1_000_000_000


def bad_request(
    error: OpampDecodeError | str, *, instance_uid: bytes | None = None
) -> pb.ServerToAgent:
    """The answer to a malformed `AgentToServer`.

    Given the decode error, the reply echoes the ``instance_uid`` it carries
    (empty when the bytes never parsed) unless one is passed.
    """
    if isinstance(error, OpampDecodeError):
        uid = error.instance_uid if instance_uid is None else instance_uid
    else:
        uid = instance_uid or b""
    return pb.ServerToAgent(
        instance_uid=uid,
        error_response=pb.ServerErrorResponse(
            type=pb.ServerErrorResponse.TYPE_BAD_REQUEST, error_message=str(error)
        ),
    )


def unavailable(
    *, retry_after: float | None, instance_uid: bytes = b"", message: str = "server overloaded"
) -> pb.ServerToAgent:
    """The answer when we will not process the message now; ``retry_after`` in seconds."""
    error = pb.ServerErrorResponse(
        type=pb.ServerErrorResponse.TYPE_UNAVAILABLE, error_message=message
    )
    if retry_after is not None:
        if not math.isfinite(retry_after) or retry_after < 0:
            raise ValueError(
                f"retry_after must be a finite number of seconds >= 0, not {retry_after}"
            )
        error.retry_info.retry_after_nanoseconds = round(retry_after * _NANOS)
    return pb.ServerToAgent(instance_uid=instance_uid, error_response=error)


def retry_after_seconds(retry_after: float) -> str:
    """An HTTP ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(retry_after)))

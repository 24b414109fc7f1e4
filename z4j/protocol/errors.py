"""Protocol errors shared by every z4j wire protocol.

As in h11 and wsproto, an error says whose fault it is: `RemoteProtocolError`
when the peer broke the protocol (answer it and count it), and
`LocalProtocolError` when our own code tried something the protocol forbids
(a bug: let it crash loudly). Each carries the hint for the reply: a reason
label for the ingest protocol, a WebSocket close code for the agent protocol.
"""

from __future__ import annotations

from .close import CloseCode

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Base of all protocol errors.

    ``reason`` is a short, stable label fit for a metrics counter;
    ``close_code`` is the WebSocket close code to send, where one applies.
    """

    def __init__(self, message: str, *, reason: str, close_code: CloseCode | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.close_code = close_code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r}, reason={self.reason!r})"


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""

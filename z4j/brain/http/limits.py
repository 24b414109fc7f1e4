"""The bounds the REST API puts on its inputs, in one place.

The route modules check these and openapi.py publishes them, so the
document cannot allow what the server refuses (a 200-character action the
agent protocol would never carry was once both "valid" and refused).
tests/test_api_limits.py reads each bound back from the document and sends
the server one past it.
"""

from __future__ import annotations

from typing import Final

from ...protocol.agent.frames import ACTION_MAX_CHARS, COMMAND_TIMEOUT_MAX_SECONDS

__all__ = [
    "ACCOUNT_NAME_CHARS",
    "COMMAND_ACTION_CHARS",
    "COMMAND_TIMEOUT_SECONDS",
    "FILTER_TEXT_CHARS",
    "PAGE_LIMIT",
    "PASSWORD_CHARS",
]

#: A command's action: the agent protocol's own bound (frames.Command).
COMMAND_ACTION_CHARS: Final = ACTION_MAX_CHARS
#: A command's timeout_seconds, lowest and highest.
COMMAND_TIMEOUT_SECONDS: Final = (1, COMMAND_TIMEOUT_MAX_SECONDS)
#: ``limit`` of every paged listing.
PAGE_LIMIT: Final = 500
#: A text filter of the event and audit listings (name, queue, actor, ...).
FILTER_TEXT_CHARS: Final = 200
#: A user's (or a personal token's) name.
ACCOUNT_NAME_CHARS: Final = 100
#: A new password, shortest and longest (the longest bounds the hashing work
#: an anonymous caller can ask for).
PASSWORD_CHARS: Final = (10, 1024)

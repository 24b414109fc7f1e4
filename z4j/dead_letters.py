"""Dead letters as operators see them: the same shape from the API and the CLI.

A dead letter is a buffered payload the store refused as data (the drain
found it by bisecting its batch, see brain/drain.py). It stays in the
``dead_letter`` table of the buffer file of the brain process that drained
it, so each one is named with that buffer's id. Bodies and errors are cut to
a bound here, so neither a listing nor an inspection can be made to build a
response as big as the largest payload.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import orjson

from .buffer import DeadLetter

__all__ = [
    "DETAIL_BODY_BYTES",
    "ERROR_CHARS",
    "LIST_BODY_BYTES",
    "MAX_IDS",
    "dead_letter_json",
]

LIST_BODY_BYTES = 256  # a listing's preview of each body
DETAIL_BODY_BYTES = 64 * 1024  # an inspection's body, at most
ERROR_CHARS = 2000  # the store's refusal, at most
MAX_IDS = 500  # ids per bulk re-queue or discard


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()  # as the API writes times


def dead_letter_json(letter: DeadLetter, *, buffer_id: str) -> dict[str, Any]:
    """``letter`` for JSON: the body as text when it is UTF-8, else base64.

    ``body_truncated`` says the body shown is the first part only; ``origin``
    (an agent payload's project, agent and worker) is parsed when it is JSON.
    """
    body = letter.body
    truncated = len(body) < letter.body_bytes
    try:
        text: str | None = body.decode("utf-8")
    except UnicodeDecodeError:
        # A cut may split a character: decode the whole characters we have.
        text = body.decode("utf-8", errors="ignore") if truncated else None
        if text is not None and len(text.encode()) < len(body) - 3:
            text = None
    origin: Any = None
    if letter.origin is not None:
        try:
            origin = orjson.loads(letter.origin)
        except orjson.JSONDecodeError:
            origin = base64.b64encode(letter.origin).decode()
    return {
        "id": letter.id,
        "buffer_id": buffer_id,
        "source": letter.source,
        "origin": origin,
        "received_at": _iso(letter.received_at),
        "failed_at": _iso(letter.failed_at),
        "error": letter.error[:ERROR_CHARS],
        "body": text if text is not None else base64.b64encode(body).decode(),
        "body_encoding": "utf-8" if text is not None else "base64",
        "body_bytes": letter.body_bytes,
        "body_truncated": truncated,
    }

"""What every API route shares: the parsed request, refusals, and parameters.

`ApiError` carries a refusal as a status, a stable code and a message, so
bad input gets a 4xx and never a 500; the ``*_param`` helpers turn query
parameters into values or such a refusal.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
import orjson

from ..._decimal import parse_decimal
from .limits import PAGE_LIMIT
from .principal import Principal

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_LIMIT",
    "ApiError",
    "Handler",
    "Receive",
    "Request",
    "Response",
    "Scope",
    "Send",
    "check_text",
    "epoch",
    "id_cursor_param",
    "limit_param",
    "page",
    "parse_query",
    "read_body",
    "time_param",
    "uuid_param",
]

MAX_BODY_BYTES = 1024 * 1024
MAX_LIMIT = PAGE_LIMIT
MAX_EPOCH = 253_402_300_799.0  # 9999-12-31T23:59:59Z

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        detail: dict[str, Any] | None = None,
    ) -> None:
        """``detail``: more fields of the error body, beside error and message."""
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers
        self.detail = detail or {}


@attrs.frozen
class Request:
    method: str
    query: dict[str, str]
    params: dict[str, str]
    body: bytes
    headers: list[tuple[bytes, bytes]]
    source: str = "unknown"  # the peer's address
    # Who is asking, as audit rows and commands name them (Principal.actor;
    # "anonymous" on a public route).
    actor: str = "api"
    principal: Principal | None = None

    def json_object(self) -> dict[str, Any]:
        try:
            value = orjson.loads(self.body or b"null")
        except orjson.JSONDecodeError:
            raise ApiError(400, "bad_json", "the body is not valid JSON") from None
        if not isinstance(value, dict):
            raise ApiError(400, "bad_request", "the body must be a JSON object")
        check_text(value)
        return value


Response = tuple[int, Any]
Handler = Callable[[Request], Awaitable[Response]]


async def read_body(receive: Receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, "too_large", f"bodies are limited to {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def parse_query(raw: bytes) -> dict[str, str]:
    from urllib.parse import parse_qsl

    try:
        query = dict(parse_qsl(raw.decode("utf-8"), errors="strict"))
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "bad_request", "the query string is not valid UTF-8") from None
    return query  # unknown parameters are ignored; known ones are checked where used


def check_text(value: Any) -> None:
    """Refuse text the stores cannot keep: NUL characters and lone surrogates."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ApiError(400, "bad_request", "text must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "bad_request", "text must be valid Unicode") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key)
            check_text(item)
    elif isinstance(value, list):
        for item in value:
            check_text(item)


def limit_param(query: Mapping[str, str], *, most: int = MAX_LIMIT, default: int = 50) -> int:
    """``limit``: a page's size, 1 to ``most``."""
    number = parse_decimal(query.get("limit", str(default)))
    if number is None or not 1 <= number <= most:
        raise ApiError(400, "bad_request", f"limit: an integer from 1 to {most}")
    return number


def id_cursor_param(raw: str) -> int:
    """A page cursor that is a row id: a bigint, as both stores hold them."""
    number = parse_decimal(raw)
    if number is None or number >= 2**63:
        raise ApiError(400, "bad_request", "cursor: as given by the last page")
    return number


def uuid_param(raw: str, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(400, "bad_request", f"{name}: not a UUID") from None


def time_param(raw: str, name: str) -> float:
    """ISO-8601 (naive means UTC) or epoch seconds."""
    try:
        value = float(raw) if re.fullmatch(r"\d+(\.\d+)?", raw) else _parse_iso(raw)
    except (ValueError, OverflowError):
        raise ApiError(400, "bad_request", f"{name}: ISO-8601 or epoch seconds") from None
    return epoch(value, name)


def epoch(value: float, name: str) -> float:
    """``value`` if it is a time both stores can hold (1970 to 9999), else a 400."""
    if not (math.isfinite(value) and 0 <= value <= MAX_EPOCH):
        raise ApiError(400, "bad_request", f"{name}: a time from 1970 to 9999")
    return value


def _parse_iso(raw: str) -> float:
    when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def page(items: list[Any], cursor: str | None) -> dict[str, Any]:
    return {"items": items, "next_cursor": cursor}

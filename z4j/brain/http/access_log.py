"""Each HTTP request's id, and the optional access log (Z4J_HTTP_ACCESS_LOG).

Every request gets a request id: the client's ``X-Request-ID`` when it is a
short token (a proxy's, so one id follows the request through both logs),
else a fresh one. It is bound to the log context for the request's task, so
every line logged while serving it carries ``request_id``, and it goes back
in the response's ``x-request-id`` header.

With the access log on, one line per answered request goes to logger
``z4j.http.access`` at INFO, its fields structured in JSON logs: method,
path, route (the template that served it, when the router names one in
``scope["route"]``), status, duration_ms, bytes (of the response body),
peer and request_id. WebSocket sessions are not requests: the agent
endpoint logs their opening and closing itself.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from ...logs import log_context

__all__ = ["REQUEST_ID_HEADER", "with_request_context"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = b"x-request-id"
# What a client-given id may look like: a log line must not carry junk.
_GOOD_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")

access = logging.getLogger("z4j.http.access")


def request_id_of(scope: Scope) -> str:
    """The client's ``X-Request-ID`` if it is a short token, else a new id."""
    for name, value in scope.get("headers", ()):
        if name.lower() == REQUEST_ID_HEADER:
            if _GOOD_ID.fullmatch(value):
                return str(value.decode("ascii"))
            break
    return uuid.uuid4().hex


def with_request_context(app: Asgi, *, access_log: bool) -> Asgi:
    """``app`` with a request id per HTTP request, and an access log line if asked."""

    async def app_with_context(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        started = time.perf_counter()
        status = 0
        sent = 0

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", ()))
                headers.append((REQUEST_ID_HEADER, request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        with log_context(request_id=request_id):
            try:
                await app(scope, receive, send_with_id)
            except Exception:
                status = status or 500  # hypercorn answers 500 for an app that raised
                raise
            finally:
                if access_log and status:  # none: cancelled before any answer
                    _log_request(scope, status, sent, time.perf_counter() - started)

    return app_with_context


def _log_request(scope: Scope, status: int, sent: int, seconds: float) -> None:
    method, path = str(scope["method"]), str(scope["path"])
    route = scope.get("route")
    duration_ms = round(seconds * 1000, 3)
    fields: dict[str, object] = {
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": duration_ms,
        "bytes": sent,
    }
    if isinstance(route, str):
        fields["route"] = route
    access.info(
        "%s %s %d %.1fms %dB", method, path, status, duration_ms, sent, extra={"fields": fields}
    )

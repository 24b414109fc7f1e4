"""Request counts and durations of the brain's ASGI app, by route template.

A label per path asked for would let any client grow /metrics without
bound (``/api/v1/commands/<uuid>``, or junk paths), so a request is counted
under the template of the route that served it: the API's router names it
in the scope (``scope["route"]``, the ASGI habit), the few fixed paths are
their own template, the dashboard's files share ``/{file}``, and the rest
count as ``unmatched``. Methods outside the usual few count as ``other``.
WebSockets are not requests here: their sessions have metrics of their own.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from ...stats import HttpStats
from .dashboard_page import resolve

__all__ = ["FIXED_ROUTES", "measured", "route_of"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

FIXED_ROUTES = frozenset({"/metrics", "/health/live", "/health/ready", "/v1/opamp"})
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_of(scope: Scope) -> str:
    """The route template ``scope`` was served by (set by the router, or known here)."""
    route = scope.get("route")
    if isinstance(route, str):
        return route
    path = scope["path"]
    if path in FIXED_ROUTES:
        return str(path)
    if not path.startswith("/api/") and resolve(path) is not None:
        return "/{file}"
    return "unmatched"


def measured(app: Asgi, stats: HttpStats) -> Asgi:
    """``app``, with each HTTP request counted in ``stats`` once it is answered."""

    async def measured_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await app(scope, receive, send_status)
        except Exception:
            status = status or 500  # hypercorn answers 500 for an app that raised
            raise
        finally:
            if status:  # not counted: a request cancelled before any answer
                method = scope["method"] if scope["method"] in _METHODS else "other"
                stats.observe_request(
                    route_of(scope), method, status, time.perf_counter() - started
                )

    return measured_app

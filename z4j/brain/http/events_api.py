"""``/api/v1/events``: event search, its time histogram, and streamed exports.

One filter serves all three: project, agent, worker, kind, the agent
events' task fields, a time range and ``q``, a text inside the body (the
store reads a bounded number of rows per page for it: a page may be short,
even empty, and still have a ``next_cursor``). Every answer is bounded:
a page by ``limit`` and a byte budget, the histogram by its bucket count
and the rows the store counts, an export by one page in memory at a time
(it streams: streaming.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import attrs
import orjson
import trio

from ..._decimal import parse_decimal
from ...store.base import EventFilter, EventRecord, ExportFormat, ExportPage, Store
from ...store.event_export import CSV_HEADER, EXPORT_COLUMNS
from ...store.event_search import bucket_width
from ._request import (
    ApiError,
    Handler,
    Request,
    Response,
    check_text,
    epoch,
    limit_param,
    page,
    time_param,
    uuid_param,
)
from .limits import FILTER_TEXT_CHARS
from .narrowing import check_agent, narrowed
from .resources import iso, to_json
from .streaming import Spawn, Streamed

__all__ = ["EXPORT_COLUMNS", "EventRoutes", "event_json"]

# Event listings: a body larger than this (as JSON) is left out of its item
# unless the caller asks for more, up to the second figure; and a page stops
# growing past the byte budget (with a cursor for the rest), so no listing
# builds hundreds of MiB however large the stored records are.
EVENT_BODY_BYTES = 64 * 1024
MAX_EVENT_BODY_BYTES = 16 * 1024 * 1024
EVENTS_PAGE_BYTES = 4 * 1024 * 1024
MAX_TEXT = FILTER_TEXT_CHARS
# A histogram has at most this many buckets; its default range is the last day.
HISTOGRAM_BUCKETS = 120
HISTOGRAM_DEFAULT_SECONDS = 86400.0
# An export reads pages of at most EXPORT_PAGE_ROWS, fewer when the lines
# are long (about EXPORT_PAGE_BYTES a page, sized from the last page's
# bytes a line), starting small; it reads the next page while the last is
# sent, so it holds two at most. The store writes the lines
# (store/event_export.py): a page is one bytes object here.
EXPORT_PAGE_ROWS = 5000
EXPORT_FIRST_ROWS = 200
EXPORT_PAGE_BYTES = 4 * 1024 * 1024
FORMATS: dict[str, tuple[bytes, ExportFormat]] = {
    "ndjson": (b"application/x-ndjson", "ndjson"),
    "csv": (b"text/csv; charset=utf-8", "csv"),
}


class EventRoutes:
    """The event routes of `Api`."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/events", self.search),
            ("GET", "/events/histogram", self.histogram),
            ("GET", "/events/export", self.export),
        ]

    async def _filter(self, request: Request, *, paged: bool = True) -> EventFilter:
        """The query's filter, kept to the caller's projects (narrowing.py)."""
        query = narrowed(request, event_filter(request.query, paged=paged))
        if query.agent_id is not None and query.projects is not None:
            await check_agent(self._store, request, query.agent_id)
        return query

    async def search(self, request: Request) -> Response:
        q = request.query
        body_max = body_max_param(q)
        query = await self._filter(request)
        found = await self._store.search_events(query)
        events = found.events
        items, full = within_page_bytes(event_json(e, body_max_bytes=body_max) for e in events)
        if full:  # the cursor continues after the last item kept
            last = events[len(items) - 1]
            return 200, page(items, _cursor_out((last.received_at, last.id)))
        return 200, page(items, None if found.next is None else _cursor_out(found.next))

    async def histogram(self, request: Request) -> Response:
        query = await self._filter(request, paged=False)
        until = query.until if query.until is not None else time.time()
        since = query.since if query.since is not None else until - HISTOGRAM_DEFAULT_SECONDS
        if since >= until:
            raise ApiError(400, "bad_request", "since must be before until")
        width = bucket_width(until - since, HISTOGRAM_BUCKETS)
        start = math.floor(since / width) * width
        buckets = math.ceil((until - start) / width)
        found = await self._store.event_histogram(
            attrs.evolve(query, since=since, until=until),
            start=start,
            bucket_seconds=width,
            buckets=buckets,
        )
        return 200, {
            "since": iso(since),
            "until": iso(until),
            "bucket_seconds": width,
            "buckets": [
                {"start": iso(start + i * width), "count": n} for i, n in enumerate(found.counts)
            ],
            "complete": found.complete,
            "counted_since": iso(found.counted_since),
        }

    async def export(self, request: Request) -> Response:
        q = request.query
        name = q.get("format", "ndjson")
        if name not in FORMATS:
            raise ApiError(400, "bad_request", "format: ndjson or csv")
        most: int | None = None
        if "max" in q:
            raw = q["max"]
            if (number := parse_decimal(raw)) is None or not 1 <= number < 2**63:
                raise ApiError(400, "bad_request", "max: a positive integer")
            most = number
        query = await self._filter(request, paged=False)
        content_type, fmt = FORMATS[name]
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        disposition = f'attachment; filename="z4j-events-{stamp}.{fmt}"'.encode()

        def read(query: EventFilter) -> Awaitable[ExportPage]:
            return self._store.export_events(query, fmt)

        async def chunks(spawn: Spawn) -> AsyncGenerator[bytes, None]:
            # One chunk a page, even an empty one (a text page may match
            # nothing): the first goes out with the status, so a refusal
            # found by the first read is still a proper error response.
            # The next page is read while this one is sent: two pages in
            # memory at most.
            header = CSV_HEADER if fmt == "csv" else b""
            rows_left = most
            first = attrs.evolve(query, limit=min(EXPORT_FIRST_ROWS, most or EXPORT_FIRST_ROWS))
            ahead: _Ahead[ExportPage] | None = _Ahead(spawn, read, first)
            limit = EXPORT_PAGE_ROWS
            while ahead is not None:
                found = await ahead.result()
                if rows_left is not None:
                    rows_left -= found.rows  # a page holds at most the rows asked
                if found.next is not None and rows_left != 0:
                    if found.rows:  # the next page's size, from this one's bytes a line
                        per_row = max(1, len(found.data) // found.rows)
                        limit = max(1, min(EXPORT_PAGE_ROWS, EXPORT_PAGE_BYTES // per_row))
                    following = attrs.evolve(
                        first,
                        before=found.next,
                        limit=limit if rows_left is None else min(limit, rows_left),
                    )
                    ahead = _Ahead(spawn, read, following)
                else:
                    ahead = None
                yield header + found.data if header else found.data
                header = b""

        return 200, Streamed(content_type, chunks, headers=((b"content-disposition", disposition),))


T = TypeVar("T")


class _Ahead(Generic[T]):
    """``read(arg)``, started now in a task of ``spawn``, its result awaited later."""

    def __init__(
        self, spawn: Spawn, read: Callable[[EventFilter], Awaitable[T]], arg: EventFilter
    ) -> None:
        self._done = trio.Event()
        self._value: T | None = None
        self._error: Exception | None = None

        async def run() -> None:
            try:
                self._value = await read(arg)
            except Exception as exc:  # raised where the result is awaited
                self._error = exc
            finally:
                self._done.set()

        spawn(run)

    async def result(self) -> T:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


# -- input ---------------------------------------------------------------------------------


def event_filter(q: dict[str, str], *, paged: bool = True) -> EventFilter:
    """The filter of the query's parameters (with ``paged``, its cursor and limit too)."""
    # An empty value is no condition (as a form sends an empty field).
    q = {name: value for name, value in q.items() if value or name in ("limit", "cursor")}
    text: dict[str, str] = {}
    for name in ("kind", "worker_id", "task_id", "engine", "task_name", "q"):
        if q.get(name):
            check_text(q[name])
            if len(q[name]) > MAX_TEXT:
                raise ApiError(400, "bad_request", f"{name}: at most {MAX_TEXT} characters")
            text[name] = q[name]
    return EventFilter(
        kind=text.get("kind"),
        project_id=uuid_param(q["project_id"], "project_id") if "project_id" in q else None,
        agent_id=uuid_param(q["agent_id"], "agent_id") if "agent_id" in q else None,
        worker_id=text.get("worker_id"),
        task_id=text.get("task_id"),
        engine=text.get("engine"),
        task_name=text.get("task_name"),
        since=time_param(q["since"], "since") if "since" in q else None,
        until=time_param(q["until"], "until") if "until" in q else None,
        text=text.get("q"),
        before=_cursor_in(q["cursor"]) if paged and "cursor" in q else None,
        limit=limit_param(q) if paged else 1,
    )


def _cursor_in(raw: str) -> tuple[float, int]:
    at, _, last = raw.partition("_")
    try:
        when, event_id = float(at), int(last)
    except ValueError:
        raise ApiError(400, "bad_request", "cursor: as given by the last page") from None
    if not 0 <= event_id < 2**63:  # a bigint, in both stores
        raise ApiError(400, "bad_request", "cursor: as given by the last page")
    return epoch(when, "cursor"), event_id


def _cursor_out(key: tuple[float, int]) -> str:
    return f"{key[0]!r}_{key[1]}"


# -- output --------------------------------------------------------------------------------


def event_json(e: EventRecord, *, body_max_bytes: int | None = None) -> dict[str, Any]:
    """An event as the API shows it; a body over ``body_max_bytes`` (as JSON)
    is left out (``body`` null, ``body_truncated`` true, its size in ``body_bytes``)."""
    item = to_json(e)
    if body_max_bytes is not None and item["body_bytes"] > body_max_bytes:
        item["body"] = None
        item["body_truncated"] = True
    return item


def within_page_bytes(items: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """The leading ``items`` (made as they are taken) that fit `EVENTS_PAGE_BYTES`
    as JSON, at least one; and whether some were left out (the page is full:
    the next one starts after the last kept). Here and in a region's pages to
    a hub."""
    kept: list[dict[str, Any]] = []
    size = 0
    for item in items:
        size += len(orjson.dumps(item))
        if kept and size > EVENTS_PAGE_BYTES:
            return kept, True
        kept.append(item)
    return kept, False


def body_max_param(q: Mapping[str, str]) -> int:
    """``body_max_bytes``: the largest event body a listing shows (here and to peers)."""
    if "body_max_bytes" not in q:
        return EVENT_BODY_BYTES
    raw = q["body_max_bytes"]
    if (number := parse_decimal(raw)) is None or number > MAX_EVENT_BODY_BYTES:
        raise ApiError(
            400, "bad_request", f"body_max_bytes: an integer from 0 to {MAX_EVENT_BODY_BYTES}"
        )
    return number

"""Event search pages and the histogram, once for both stores (export pages: event_export.py).

Every filter but the text is served by an index in newest-first keyset
order (received_at, id): project, agent, worker and kind each have one
(migration 16), the time range and the cursor bound the same index. So a
page of an indexed filter reads about as many rows as it returns.

The text match (any string value inside the body, case-insensitive) has
no index: a trigram index over every body would cost the drain more than
search is worth. Instead a page reads at most `SCAN_ROWS` rows of what the
other filters select and tests those; when it found fewer than a page, its
cursor is the oldest row it read, so the next page goes on from there. The
work per request stays bounded however rare the text is, and a client
(the dashboard's "more", an export) walks the whole range page by page.

Postgres tests the text with a jsonpath (``like_regex`` with the
literal-quote flag, so the text is never a pattern); SQLite walks the body
with ``json_tree``. SQLite's LIKE folds ASCII case only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import orjson

from . import _rows
from ._filters import Where, events_where
from ._rows import EVENT_COLUMNS, Conn, Dialect
from .base import EventFilter, EventHistogram, EventPage, EventRecord

__all__ = [
    "HISTOGRAM_ROWS",
    "HISTOGRAM_TEXT_ROWS",
    "SCAN_ROWS",
    "bucket_width",
    "event_histogram",
    "frontier",
    "next_key",
    "page_rows",
    "page_sql",
    "search_page",
    "text_match",
]

# Rows a text search reads per page (its filters' newest first).
SCAN_ROWS = 10_000
# Rows a histogram counts at most: the newest of the filter (fewer with a text).
HISTOGRAM_ROWS = 1_000_000
HISTOGRAM_TEXT_ROWS = 100_000

_ORDER = " ORDER BY received_at DESC, id DESC"
_SCANNED = "id, idempotency_key, received_at, source, kind, project_id, agent_id, worker_id, body"

R = TypeVar("R")


def _postgres(d: Dialect) -> bool:
    return d.param == "%s"


def text_match(d: Dialect, text: str, column: str = "body") -> tuple[str, list[Any]]:
    """SQL (with ``?``) true when a string value inside ``column`` contains ``text``."""
    if _postgres(d):
        # orjson writes a JSON string literal, which is a jsonpath one too.
        literal = orjson.dumps(text).decode()
        path = f'strict $.** ? (@.type() == "string" && @ like_regex {literal} flag "iq")'
        return f"jsonb_path_exists({column}, ?::jsonpath)", [path]
    pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return (
        f"EXISTS (SELECT 1 FROM json_tree({column}) AS t"
        " WHERE t.type = 'text' AND t.value LIKE ? ESCAPE '\\')",
        [pattern],
    )


def page_sql(d: Dialect, query: EventFilter, columns: str) -> tuple[str, list[Any], Where]:
    """A page of ``query``: its SQL (this dialect's placeholders) selecting
    ``columns`` newest first, its parameters, and its WHERE (for `frontier`)."""
    where = events_where(d, query)
    if not query.text:
        sql = d.sql(f"SELECT {columns} FROM events{where}{_ORDER} LIMIT ?")
        return sql, [*where.params, query.limit], where
    match, match_params = text_match(d, query.text)
    sql = d.sql(
        f"SELECT {columns} FROM (SELECT {_SCANNED} FROM events{where}{_ORDER} LIMIT ?) AS s"
        f" WHERE {match}{_ORDER} LIMIT ?"
    )
    return sql, [*where.params, SCAN_ROWS, *match_params, query.limit], where


def next_key(
    d: Dialect,
    conn: Conn,
    query: EventFilter,
    found: int,
    last: tuple[float, int] | None,
    where: Where,
) -> tuple[float, int] | None:
    """The cursor after a page of ``query`` that found ``found`` rows, the last
    at ``last``: a full page goes on after it; a short text page goes on from
    the oldest row it read (`frontier`); any other short page is the end."""
    if found == query.limit:
        return last
    return frontier(d, conn, where) if query.text else None


def frontier(d: Dialect, conn: Conn, where: Where) -> tuple[float, int] | None:
    """The oldest row a text page read, if it read all it may (else None: no more rows)."""
    sql = d.sql(f"SELECT received_at, id FROM events{where}{_ORDER} LIMIT 1 OFFSET ?")
    last = conn.execute(sql, [*where.params, SCAN_ROWS - 1]).fetchone()
    return None if last is None else (d.ts_out(last[0]), int(last[1]))


def page_rows(
    d: Dialect,
    conn: Conn,
    query: EventFilter,
    columns: str,
    row: Callable[[Any], R] | None,
    key: Callable[[R], tuple[float, int]],
) -> tuple[list[R], tuple[float, int] | None]:
    """Rows of ``columns`` (each made by ``row``; None: as fetched) and the next cursor."""
    sql, params, where = page_sql(d, query, columns)
    rows = conn.execute(sql, params).fetchall()
    found = list(rows) if row is None else [row(r) for r in rows]
    last = key(found[-1]) if found else None
    return found, next_key(d, conn, query, len(found), last, where)


def search_page(d: Dialect, conn: Conn, query: EventFilter) -> EventPage:
    """One page of events matching ``query``, after its cursor."""

    def key(e: EventRecord) -> tuple[float, int]:
        return e.received_at, e.id

    events, following = page_rows(d, conn, query, EVENT_COLUMNS, lambda r: _rows.event(d, r), key)
    return EventPage(events=events, next=following)


def event_histogram(
    d: Dialect, conn: Conn, query: EventFilter, *, start: float, bucket_seconds: float, buckets: int
) -> EventHistogram:
    """Matching events per bucket, over at most `HISTOGRAM_ROWS` (with a
    text, `HISTOGRAM_TEXT_ROWS`) of the filter's newest rows."""
    if query.since is None or query.since < start:
        query = attrs.evolve(query, since=start)
    where = events_where(d, query)
    cap = HISTOGRAM_TEXT_ROWS if query.text else HISTOGRAM_ROWS
    if query.text:
        match, match_params = text_match(d, query.text)
        hit = f"CASE WHEN {match} THEN 1 ELSE 0 END"
    else:
        hit, match_params = "1", []
    # Rows are at or after ``start`` (the caller's since), so truncation is floor.
    bucket = (
        "floor((extract(epoch FROM received_at) - ?) / ?)::bigint"
        if _postgres(d)
        else "CAST((received_at - ?) / ? AS INTEGER)"
    )
    inner = "received_at, body" if query.text else "received_at"
    sql = d.sql(
        f"SELECT {bucket} AS b, sum({hit}), count(*), min(received_at)"
        f" FROM (SELECT {inner} FROM events{where}{_ORDER} LIMIT ?) AS s GROUP BY b"
    )
    # In the text's order: the bucket, the text, then the inner WHERE and LIMIT.
    params = [start, bucket_seconds, *match_params, *where.params, cap]
    counts = [0] * buckets
    scanned = 0
    oldest: float | None = None
    for b, hits, n, first in conn.execute(sql, params).fetchall():
        scanned += n
        first_at = d.ts_out(first)
        oldest = first_at if oldest is None else min(oldest, first_at)
        if 0 <= b < buckets:
            counts[b] += int(hits)
    complete = scanned < cap
    return EventHistogram(
        start=start,
        bucket_seconds=bucket_seconds,
        counts=counts,
        complete=complete,
        counted_since=None if complete else oldest,
    )


def bucket_width(span: float, most: int) -> float:
    """The smallest of the usual widths that cuts ``span`` seconds into at most ``most`` buckets."""
    for width in _WIDTHS:
        if span / width <= most:
            return width
    return math.ceil(span / most / 86400) * 86400.0


_WIDTHS = (
    1.0, 2.0, 5.0, 10.0, 15.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 900.0, 1800.0,
    3600.0, 7200.0, 10800.0, 21600.0, 43200.0,
    86400.0, 2 * 86400.0, 7 * 86400.0,
)  # fmt: skip

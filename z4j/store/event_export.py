"""Export pages: the events' lines, encoded where the rows are read.

An export (GET /api/v1/events/export) writes each event as one NDJSON line
or one CSV record (RFC 4180, as the csv module writes it). On Postgres the
query builds every line itself and hands back the page as one value
(``string_agg`` over the page's rows, in their order): the brain then
handles one bytes object a page, not nine values a row, and the export
runs at the database's pace. Measured on 1,000,000 events (benchmarks/
search.py, 2 shared cores, load average about 2): the brain decoding nine
columns a row and encoding them in Python made 57k events/s as NDJSON;
the lines built by Postgres make 144k (CSV 137k), Postgres spending
~5.5 us of CPU an event and the brain ~1.2. SQLite reads the rows and
encodes them here, in Python, in its store thread; nothing on the Trio
loop walks rows either way.

Both must write the same bytes for the same row: tests/test_event_export.py
checks the Postgres lines against the Python encoders over awkward rows
(escapes, line breaks, quotes, commas, non-ASCII, nulls, times with and
without microseconds, a large body). The shared rules:

- ``received_at`` as the API writes times (`z4j.brain.http.resources.iso`):
  ISO 8601 in UTC, ``+00:00``, microseconds only when not zero.
- NDJSON: the fields in `EXPORT_COLUMNS` order, no spaces, strings escaped
  as orjson and Postgres's ``to_json`` both do (``\\"``, ``\\\\``, ``\\b``,
  ``\\f``, ``\\n``, ``\\r``, ``\\t``, other controls as ``\\u00xx``, the rest
  as UTF-8); the body spliced in as the store gives its JSON text (never
  parsed). One ``\\n`` after each line.
- CSV: a field with a comma, quote or line break is quoted, its quotes
  doubled; a missing value is an empty field; ``\\r\\n`` after each record.
"""

from __future__ import annotations

import math
import re
import sqlite3
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from psycopg.types.string import ByteaBinaryLoader

from . import event_search
from ._rows import Dialect
from .base import EventFilter, ExportFormat, ExportPage, ExportRow

__all__ = [
    "CSV_HEADER",
    "EXPORT_COLUMNS",
    "csv_lines",
    "ndjson_lines",
    "postgres_page",
    "sqlite_page",
]

EXPORT_COLUMNS = (
    "id",
    "key",
    "received_at",
    "source",
    "kind",
    "project_id",
    "agent_id",
    "worker_id",
    "body",
)
CSV_HEADER = (",".join(EXPORT_COLUMNS) + "\r\n").encode()


# -- Postgres: the lines built by the query --------------------------------------------------

# The page's rows, as the line expressions read them: text, the body's
# JSON text made once however often a line names it.
_PG_PAGE = (
    "id, received_at, id::text AS id_text, encode(uuid_send(idempotency_key), 'hex') AS key,"
    " source, kind, project_id::text AS project_id, agent_id::text AS agent_id, worker_id,"
    " body::text AS body"
)
# to_char's US is always six digits; the time has one dot, before them.
_PG_TIME = (
    "(replace(to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US'),"
    " '.000000', '') || '+00:00')"
)


def _lit(text: str) -> str:
    """``text`` as an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _pg_cat(*parts: str) -> str:
    """The text of ``parts`` one after the other, each of them text (``||``
    costs less than concat(), which looks up each argument's type a row)."""
    return "(" + " || ".join(parts) + ")"


def _pg_json(column: str) -> str:
    """A text column as a JSON string, null as null."""
    return f"coalesce(to_json({column})::text, 'null')"


def _pg_json_uuid(column: str) -> str:
    """A uuid's text (nothing to escape) as a JSON string, null as null."""
    return f"coalesce('\"' || {column} || '\"', 'null')"


def _pg_csv(column: str) -> str:
    """A text column as a CSV field, null as empty."""
    quote, doubled = _lit('"'), _lit('""')
    special = " OR ".join(
        f"strpos({column}, {char}) > 0" for char in (quote, _lit(","), "E'\\n'", "E'\\r'")
    )
    quoted = f"{quote} || replace({column}, {quote}, {doubled}) || {quote}"
    return f"coalesce(CASE WHEN {special} THEN {quoted} ELSE {column} END, '')"


_PG_LINES: dict[ExportFormat, str] = {
    "ndjson": _pg_cat(
        _lit('{"id":'),
        "id_text",
        _lit(',"key":"'),
        "key",
        _lit('","received_at":"'),
        _PG_TIME,
        _lit('","source":'),
        _pg_json("source"),
        _lit(',"kind":'),
        _pg_json("kind"),
        _lit(',"project_id":'),
        _pg_json_uuid("project_id"),
        _lit(',"agent_id":'),
        _pg_json_uuid("agent_id"),
        _lit(',"worker_id":'),
        _pg_json("worker_id"),
        _lit(',"body":'),
        "body",
        "E'}\\n'",
    ),
    "csv": _pg_cat(
        "id_text",
        "','",
        "key",
        "','",
        _PG_TIME,
        "','",
        _pg_csv("source"),
        "','",
        _pg_csv("kind"),
        "','",
        "coalesce(project_id, '')",
        "','",
        "coalesce(agent_id, '')",
        "','",
        _pg_csv("worker_id"),
        "','",
        _pg_csv("body"),
        "E'\\r\\n'",
    ),
}


def postgres_page(
    d: Dialect, conn: psycopg.Connection[Any], query: EventFilter, fmt: ExportFormat
) -> ExportPage:
    """A page of ``query``'s lines in ``fmt``, built by Postgres in one value.

    The aggregate reads the page's rows in the order the page's subquery
    gives them (its ORDER BY and LIMIT keep it a subquery, fed to a plain
    aggregate as it scans): the lines, and the last row's id, come out
    newest first. The text comes back as its bytes, not decoded: on a
    UTF-8 connection as sent; on any other, made UTF-8 by ``convert_to``
    first (a copy of the page that costs Postgres ~10% more a row).
    """
    page, params, where = event_search.page_sql(d, query, _PG_PAGE)
    lines = f"coalesce(string_agg({_PG_LINES[fmt]}, ''), '')"
    with conn.cursor(binary=True) as cursor:
        if conn.info.encoding == "utf-8":
            cursor.adapters.register_loader("text", ByteaBinaryLoader)
        else:
            lines = f"convert_to({lines}, 'UTF8')"  # bytea: bytes in binary
        sql = (
            f"SELECT count(*), {lines}, extract(epoch FROM min(received_at))::float8,"
            f" (array_agg(id))[count(*)] FROM ({page}) AS p"
        )
        row = cursor.execute(sql, params).fetchone()
    assert row is not None
    found, data, at, last_id = row
    last = None if not found else (float(at), int(last_id))
    following = event_search.next_key(d, conn, query, found, last, where)
    return ExportPage(data=bytes(data), rows=found, next=following)


# -- SQLite: the rows encoded here -----------------------------------------------------------

_SQ_PAGE = (
    "id, lower(hex(idempotency_key)), received_at, source, kind,"
    " project_id, agent_id, worker_id, body"
)


def sqlite_page(
    d: Dialect, db: sqlite3.Connection, query: EventFilter, fmt: ExportFormat
) -> ExportPage:
    """A page of ``query``'s lines in ``fmt``: SQLite's rows (epoch seconds and
    JSON text already), encoded in Python."""

    def key(r: ExportRow) -> tuple[float, int]:
        return r[2], r[0]

    rows, following = event_search.page_rows(d, db, query, _SQ_PAGE, None, key)
    data = ndjson_lines(rows) if fmt == "ndjson" else csv_lines(rows)
    return ExportPage(data=data, rows=len(rows), next=following)


def ndjson_lines(rows: list[ExportRow]) -> bytes:
    """One JSON object a line, the body spliced in as stored (never parsed)."""
    dumps, stamp = orjson.dumps, _Iso()
    out = bytearray()
    for id_, key, at, source, kind, project, agent, worker, body in rows:
        head = dumps(
            {
                "id": id_,
                "key": key,
                "received_at": stamp(at),
                "source": source,
                "kind": kind,
                "project_id": project,
                "agent_id": agent,
                "worker_id": worker,
            }
        )
        out += head[:-1]
        out += b',"body":'
        out += body.encode()
        out += b"}\n"
    return bytes(out)


def csv_lines(rows: list[ExportRow]) -> bytes:
    """RFC 4180 records, as the csv module writes them; the body column holds
    its JSON. Written by hand: the csv module takes several times as long."""
    stamp = _Iso()
    lines = []
    for id_, key, at, source, kind, project, agent, worker, body in rows:
        lines.append(
            f"{id_},{key},{stamp(at)},{_field(source)},{_field(kind)},{project or ''},"
            f"{agent or ''},{_field(worker or '')},{_field(body)}\r\n"
        )
    return "".join(lines).encode()


_NEEDS_QUOTES = re.compile(r'[",\r\n]')


def _field(text: str) -> str:
    if _NEEDS_QUOTES.search(text) is None:
        return text
    return '"' + text.replace('"', '""') + '"'


class _Iso:
    """Epoch seconds as the API writes times (`resources.iso`), the date and
    time of the last second kept: an export's rows come in time order."""

    def __init__(self) -> None:
        self._second: float | None = None
        self._text = ""

    def __call__(self, at: float) -> str:
        # As datetime.fromtimestamp rounds: to the microsecond, half to even.
        frac, whole = math.modf(at)
        micro = round(frac * 1e6)
        if micro >= 1_000_000:
            whole, micro = whole + 1, micro - 1_000_000
        elif micro < 0:
            whole, micro = whole - 1, micro + 1_000_000
        if whole != self._second:
            self._second = whole
            self._text = datetime.fromtimestamp(whole, UTC).isoformat()[:-6]
        if micro:
            return f"{self._text}.{micro:06d}+00:00"
        return f"{self._text}+00:00"

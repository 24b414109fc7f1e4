"""Export lines: Postgres builds them in SQL, SQLite encodes them in Python, to the same bytes.

The Postgres lines (store/event_export.py) are checked byte for byte
against the Python encoders run over the same rows read with plain SQL
(the columns the export read before it built its lines in SQL), for rows
made to be awkward: escapes and control characters, quotes, commas and
line breaks, non-ASCII, missing values, times with and without
microseconds, nested and scalar bodies, a large body. The Python encoders
are checked against the standard library's csv module, the API's times
and orjson.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import attrs
import orjson
import psycopg
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from z4j.brain.http.resources import iso
from z4j.store import event_export
from z4j.store.base import EventFilter, ExportFormat, ExportRow
from z4j.store.postgres import PG, PostgresStore

DAYS = [date(2027, 3, 1) + timedelta(days=n) for n in range(3)]
FORMATS: list[ExportFormat] = ["ndjson", "csv"]
# The rows as the export read them before Postgres built its lines: the
# Python encoders' input (SQLite's rows have the same shape).
ROWS_SQL = (
    "SELECT id, replace(idempotency_key::text, '-', ''), extract(epoch FROM received_at)::float8,"
    " source, kind, project_id::text, agent_id::text, worker_id, body::text"
    " FROM events ORDER BY received_at DESC, id DESC"
)
AWKWARD = [
    "",
    "plain",
    "comma, here",
    'a "quoted" word',
    '"',
    ",",
    "line\nbreak",
    "carriage\rreturn",
    "crlf\r\nend",
    "tab\there",
    "controls \x01\x07\x08\x0b\x0c\x1b\x1f and DEL \x7f",
    "back\\slash \\n not a break",
    "Żółw 日本語 😀 e\u0301",
    "separators \u2028\u2029",
    "\\.",
    "'single'",
    " padded ",
]


@attrs.frozen
class Row:
    """An events row to insert."""

    received_at: datetime
    source: str
    kind: str
    project_id: uuid.UUID | None
    agent_id: uuid.UUID | None
    worker_id: str | None
    body: Any


@pytest.fixture
def pg_events(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection to a migrated database with partitions for `DAYS`."""

    async def prepare() -> None:
        store = PostgresStore.from_url(pg_url, pool_size=1, statement_timeout_ms=10_000)
        try:
            await store.migrate()
            await store.ensure_partitions(set(DAYS))
        finally:
            await store.aclose()

    trio.run(prepare)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        yield conn


def _insert(conn: psycopg.Connection[Any], rows: list[Row]) -> None:
    conn.execute("DELETE FROM events")
    with conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO events (received_at, idempotency_key, source, kind, project_id,"
            " agent_id, worker_id, body) VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb)",
            [
                (
                    r.received_at,
                    uuid.uuid4(),
                    r.source,
                    r.kind,
                    r.project_id,
                    r.agent_id,
                    r.worker_id,
                    orjson.dumps(r.body).decode(),
                )
                for r in rows
            ],
        )


def _rows(conn: psycopg.Connection[Any]) -> list[ExportRow]:
    """Every row, newest first, as the Python encoders take them."""
    return conn.execute(ROWS_SQL).fetchall()


def _encode(rows: list[ExportRow], fmt: ExportFormat) -> bytes:
    encode = event_export.ndjson_lines if fmt == "ndjson" else event_export.csv_lines
    return encode(rows)


def _python_lines(conn: psycopg.Connection[Any], fmt: ExportFormat) -> bytes:
    return _encode(_rows(conn), fmt)


def _postgres_lines(
    conn: psycopg.Connection[Any], fmt: ExportFormat, limit: int, text: str | None = None
) -> bytes:
    """Every page of an export, built by Postgres."""
    query = EventFilter(limit=limit, text=text)
    data = b""
    for _ in range(10_000):
        page = event_export.postgres_page(PG, conn, query, fmt)
        data += page.data
        if page.next is None:
            return data
        query = attrs.evolve(query, before=page.next)
    raise AssertionError("no end of pages")


def _at(day: int, second: int, micro: int) -> datetime:
    return datetime.combine(DAYS[day], datetime.min.time(), UTC) + timedelta(
        seconds=second, microseconds=micro
    )


def _awkward_rows() -> list[Row]:
    project, agent = uuid.UUID(int=7), uuid.UUID(int=2**128 - 1)
    rows = []
    for i, text in enumerate(AWKWARD):
        other = AWKWARD[(i + 5) % len(AWKWARD)]
        body: Any = {
            "text": text,
            text: [other, i, -1.5e300, 0.1, True, None, {"nested": {"deeper": [text, {}]}}],
            "empty": {"o": {}, "a": []},
        }
        rows.append(
            Row(
                received_at=_at(i % 3, 3600 + i, [0, 1, 500_000, 999_999, 123_450][i % 5]),
                source=text or "agent",
                kind=other,
                project_id=project if i % 2 else None,
                agent_id=agent if i % 3 else None,
                worker_id=None if i % 4 == 0 else text,
                body=body,
            )
        )
    # Scalar bodies, and one large body (2 MiB) in its own page.
    rows += [
        Row(_at(0, 10, 0), "tcp", "scalar", None, None, None, value)
        for value in ['a string, with "quotes"\n', 42, 1.25, None, True, [], {}]
    ]
    large = {"blob": 'x,"y"\n' * (2**21 // 6), "tail": "Żółw"}
    rows.append(Row(_at(2, 86_399, 999_999), "tcp", "large", None, None, "w", large))
    return rows


@pytest.mark.parametrize("fmt", FORMATS)
def test_postgres_builds_the_bytes_python_writes(
    pg_events: psycopg.Connection[Any], fmt: ExportFormat
) -> None:
    _insert(pg_events, _awkward_rows())
    expected = _python_lines(pg_events, fmt)
    assert expected.count(b"\n") >= len(_awkward_rows())
    for limit in (1, 4, 5000):
        assert _postgres_lines(pg_events, fmt, limit) == expected
    # A text filter's pages (the lines built over the subquery of the rows
    # it reads): the lines of the rows with a string value that holds it.
    matching = [r for r in _rows(pg_events) if any("żółw" in t.lower() for t in _strings(r[8]))]
    assert len(matching) == 3
    assert _postgres_lines(pg_events, fmt, 2, text="Żółw") == _encode(matching, fmt)


def _strings(body: str) -> list[str]:
    """The string values inside a JSON text (not its keys)."""

    def walk(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            for item in value:
                yield from walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                yield from walk(item)

    return list(walk(orjson.loads(body)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_connection_that_is_not_utf8_gets_the_same_bytes(
    pg_events: psycopg.Connection[Any], pg_url: str, fmt: ExportFormat
) -> None:
    """On a LATIN1 connection the lines come back through convert_to: still
    UTF-8, characters LATIN1 has no room for included."""
    _insert(pg_events, _awkward_rows())
    expected = _postgres_lines(pg_events, fmt, 7)
    with psycopg.connect(pg_url, client_encoding="LATIN1") as latin:
        assert latin.info.encoding != "utf-8"
        assert _postgres_lines(latin, fmt, 7) == expected


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
STRINGS = st.sampled_from(AWKWARD) | TEXT
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | STRINGS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(STRINGS, inner, max_size=4),
    max_leaves=10,
)
ROWS = st.lists(
    st.builds(
        Row,
        received_at=st.builds(
            _at,
            st.integers(0, len(DAYS) - 1),
            st.integers(0, 86_399),
            st.sampled_from([0, 1, 10, 500_000, 999_999]) | st.integers(0, 999_999),
        ),
        source=STRINGS,
        kind=STRINGS,
        project_id=st.none() | st.uuids(),
        agent_id=st.none() | st.uuids(),
        worker_id=st.none() | STRINGS,
        body=JSON,
    ),
    min_size=1,
    max_size=12,
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rows=ROWS, limit=st.integers(1, 5))
def test_postgres_builds_the_bytes_python_writes_for_any_row(
    pg_events: psycopg.Connection[Any], rows: list[Row], limit: int
) -> None:
    _insert(pg_events, rows)
    for fmt in FORMATS:
        assert _postgres_lines(pg_events, fmt, limit) == _python_lines(pg_events, fmt)


# -- the Python encoders, against the standard library ---------------------------------------

EXPORT_ROWS = st.lists(
    st.tuples(
        st.integers(0, 2**63 - 1),
        st.text("0123456789abcdef", min_size=32, max_size=32),
        st.floats(0, 253_402_300_798, allow_nan=False),
        TEXT,
        TEXT,
        st.none() | st.uuids().map(str),
        st.none() | st.uuids().map(str),
        st.none() | TEXT,
        TEXT.map(lambda t: orjson.dumps({"m": t}).decode()),
    ),
    max_size=20,
)


@given(EXPORT_ROWS)
def test_export_encoders_write_what_the_standard_library_would(rows: list[Any]) -> None:
    expected = io.StringIO()
    csv.writer(expected).writerows(
        (i, k, iso(at), src, kind, p or "", a or "", w or "", body)
        for i, k, at, src, kind, p, a, w, body in rows
    )
    assert event_export.csv_lines(rows) == expected.getvalue().encode()
    lines = event_export.ndjson_lines(rows).splitlines()
    assert [orjson.loads(line) for line in lines] == [
        dict(
            zip(
                event_export.EXPORT_COLUMNS,
                (*row[:2], iso(row[2]), *row[3:8], orjson.loads(row[8])),
                strict=True,
            )
        )
        for row in rows
    ]


@given(st.lists(st.floats(0, 253_402_300_798, allow_nan=False), max_size=50))
def test_export_times_are_the_apis_times(times: list[float]) -> None:
    stamp = event_export._Iso()
    assert [stamp(at) for at in sorted(times)] == [iso(at) for at in sorted(times)]

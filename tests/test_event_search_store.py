"""Event search on both stores: each filter, the text match, keyset pages, export pages, the histogram.

Events go in through the drain's own write (``write_events``), from two
agents of two projects and from TCP ingest, several to a receipt time (so
the id breaks ties). Every answer is checked against the same filter
applied in Python to what was written.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import orjson
import pytest

from z4j.brain.http.resources import iso
from z4j.buffer import ClaimedRow
from z4j.config import Config
from z4j.store import event_search
from z4j.store.base import EventFilter, EventRecord, ExportFormat, Store
from z4j.store.event_export import EXPORT_COLUMNS
from z4j.testing.store import open_store

T0 = 1_800_000_000.0
P1, P2 = uuid.UUID(int=1), uuid.UUID(int=2)
A1, A2 = uuid.UUID(int=11), uuid.UUID(int=12)


async def _seed(store: Store) -> list[EventRecord]:
    """30 receipts over 30 s: agent A1 (project P1, worker w-1), agent A2 (P2,
    w-2) and TCP records, two or three events each; every event as stored."""
    rows = []
    for i in range(30):
        at = T0 + i
        if i % 3 == 0:
            records = [
                {"t": "log", "msg": f"Disk FULL on host-{i}", "n": i},
                {"t": "metric", "name": "cpu", "value": i, "tags": {"host": f"h{i}"}},
            ]
            rows.append(
                ClaimedRow(
                    id=i + 1, received_at=at, source="tcp", body=orjson.dumps(records), origin=None
                )
            )
            continue
        agent, project, worker = (A1, P1, "w-1") if i % 3 == 1 else (A2, P2, "w-2")
        events = [
            {
                "id": f"e-{i}-{n}",
                "kind": "custom.note" if n else "custom.ping",
                "data": {
                    "text": f'note {i}/{n}: 100% done_ok "quoted" a.b',
                    "deep": [{"x": "Żółw"}],
                },
            }
            for n in range(3)
        ]
        origin = {"project_id": str(project), "agent_id": str(agent), "worker_id": worker}
        rows.append(
            ClaimedRow(
                id=i + 1,
                received_at=at,
                source="agent",
                body=orjson.dumps(events),
                origin=orjson.dumps(origin),
            )
        )
    await store.write_events(uuid.uuid4(), rows)
    every: list[EventRecord] = []
    query = EventFilter(limit=500)
    while True:
        page = await store.search_events(query)
        every += page.events
        if page.next is None:
            break
        query = attrs.evolve(query, before=page.next)
    assert len(every) == 10 * 2 + 20 * 3
    return every


def _newest_first(events: list[EventRecord]) -> list[EventRecord]:
    return sorted(events, key=lambda e: (e.received_at, e.id), reverse=True)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _contains(text: str) -> Callable[[EventRecord], bool]:
    return lambda e: any(text.lower() in s.lower() for s in _strings(e.body))


async def _walk(store: Store, query: EventFilter) -> tuple[list[EventRecord], int]:
    """Every page of ``query``: the events, and how many pages it took."""
    found: list[EventRecord] = []
    pages = 0
    while True:
        page = await store.search_events(query)
        pages += 1
        assert len(page.events) <= query.limit
        found += page.events
        if page.next is None:
            return found, pages
        assert pages < 1000
        query = attrs.evolve(query, before=page.next)


@pytest.mark.parametrize(
    ("filter_", "expected"),
    [
        ({"project_id": P1}, lambda e: e.project_id == P1),
        ({"agent_id": A2}, lambda e: e.agent_id == A2),
        ({"worker_id": "w-1"}, lambda e: e.worker_id == "w-1"),
        ({"kind": "metric"}, lambda e: e.kind == "metric"),
        ({"since": T0 + 5, "until": T0 + 12}, lambda e: T0 + 5 <= e.received_at < T0 + 12),
        (
            {"project_id": P2, "kind": "custom.note", "since": T0 + 10},
            lambda e: e.project_id == P2 and e.kind == "custom.note" and e.received_at >= T0 + 10,
        ),
        ({"agent_id": A1, "worker_id": "w-2"}, lambda e: False),
    ],
)
async def test_each_filter_pages_through_exactly_its_events(
    config: Config, filter_: dict[str, Any], expected: Callable[[EventRecord], bool]
) -> None:
    async with open_store(config) as store:
        every = await _seed(store)
        for limit in (1, 4, 500):
            found, _ = await _walk(store, EventFilter(limit=limit, **filter_))
            assert found == _newest_first([e for e in every if expected(e)])


@pytest.mark.parametrize(
    "text",
    [
        "disk full",  # case folded
        "Żółw",  # non-ASCII, inside a list inside an object
        "100% done_ok",  # LIKE's wildcards are literal
        '"quoted"',  # a JSON-escaped character
        "a.b",  # a regex's wildcard is literal
        "h2",  # a nested object's value
        "note 4/2",
    ],
)
async def test_text_matches_string_values_anywhere_in_the_body(config: Config, text: str) -> None:
    async with open_store(config) as store:
        every = await _seed(store)
        expected = _newest_first([e for e in every if _contains(text)(e)])
        assert expected, text
        found, _ = await _walk(store, EventFilter(text=text, limit=7))
        assert found == expected


async def test_text_does_not_match_keys_or_numbers_or_wildcards(config: Config) -> None:
    async with open_store(config) as store:
        await _seed(store)
        for text in ("deep", "tags", "value", "%", "_", ".*x", "17"):
            if text in ("%", "_"):
                continue  # these are in the notes ("100% done_ok"): checked above
            found, _ = await _walk(store, EventFilter(text=text, limit=50))
            assert found == [] or all(_contains(text)(e) for e in found), text
        found, _ = await _walk(store, EventFilter(text="value", limit=50))
        assert found == []  # a key, never a string value


async def test_a_text_page_reads_a_bounded_number_of_rows_and_says_where_to_go_on(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(event_search, "SCAN_ROWS", 4)
    async with open_store(config) as store:
        every = await _seed(store)
        expected = _newest_first([e for e in every if _contains("disk full")(e)])
        first = await store.search_events(EventFilter(text="disk full", limit=50))
        # The newest 4 rows hold at most one TCP log: a short page, with a cursor.
        assert len(first.events) <= 1 and first.next is not None
        found, pages = await _walk(store, EventFilter(text="disk full", limit=50))
        assert found == expected
        assert pages >= len(every) // 4
        # Combined with an indexed filter, the scan reads that filter's rows only.
        found, _ = await _walk(store, EventFilter(text="note", kind="custom.ping", limit=3))
        assert found == _newest_first(
            [e for e in every if e.kind == "custom.ping" and _contains("note")(e)]
        )


async def test_keyset_boundaries(config: Config) -> None:
    async with open_store(config) as store:
        every = _newest_first(await _seed(store))
        # A cursor inside a receipt time (three events share it): the id decides.
        tied = [e for e in every if e.received_at == T0 + 4]
        assert len(tied) == 3
        page = await store.search_events(
            EventFilter(before=(tied[0].received_at, tied[0].id), limit=2)
        )
        assert page.events == tied[1:]
        # A page exactly as long as what is left gives a cursor; the next page is empty.
        rest = await store.search_events(EventFilter(before=(T0 + 1, 0), limit=2))
        assert rest.events == [e for e in every if e.received_at < T0 + 1]
        assert rest.next is not None
        last = await store.search_events(EventFilter(before=rest.next, limit=2))
        assert last.events == [] and last.next is None
        # since is inclusive, until exclusive.
        page = await store.search_events(EventFilter(since=T0 + 3, until=T0 + 4, limit=50))
        assert {e.received_at for e in page.events} == {T0 + 3}


async def _export(store: Store, query: EventFilter, fmt: ExportFormat) -> tuple[bytes, list[int]]:
    """Every page of an export: the bytes, and each page's count of events."""
    data, counts = b"", []
    while True:
        page = await store.export_events(query, fmt)
        data += page.data
        counts.append(page.rows)
        if page.next is None:
            return data, counts
        query = attrs.evolve(query, before=page.next)


def _export_lines(data: bytes, fmt: ExportFormat) -> list[dict[str, Any]]:
    """An export's lines read back with orjson or the csv module (a CSV's
    missing values as None, its bodies parsed)."""
    if fmt == "ndjson":
        assert data.endswith(b"\n")
        return [orjson.loads(line) for line in data.split(b"\n")[:-1]]
    records = list(csv.reader(io.StringIO(data.decode(), newline="")))
    assert data.count(b"\r\n") >= len(records)
    lines = []
    for record in records:
        line: dict[str, Any] = dict(zip(EXPORT_COLUMNS, record, strict=True))
        line["id"] = int(line["id"])
        line["body"] = orjson.loads(line["body"])
        lines.append({k: None if v == "" else v for k, v in line.items()})
    return lines


@pytest.mark.parametrize("fmt", ["ndjson", "csv"])
async def test_export_pages_are_the_events_as_lines(config: Config, fmt: ExportFormat) -> None:
    """Pages of 9 walk every event once, newest first (the cursor breaks
    ties by id), each one line of the format with every field of the event."""
    async with open_store(config) as store:
        every = _newest_first(await _seed(store))
        data, counts = await _export(store, EventFilter(limit=9), fmt)
        assert sum(counts) == len(every) and set(counts[:-1]) == {9}
        assert _export_lines(data, fmt) == [
            {
                "id": e.id,
                "key": e.key,
                "received_at": iso(e.received_at),
                "source": e.source,
                "kind": e.kind,
                "project_id": None if e.project_id is None else str(e.project_id),
                "agent_id": None if e.agent_id is None else str(e.agent_id),
                "worker_id": e.worker_id,
                "body": e.body,
            }
            for e in every
        ]
        # A text filter, in pages of at most SCAN_ROWS rows read.
        data, _ = await _export(store, EventFilter(text="Żółw", limit=500), fmt)
        found = [line["id"] for line in _export_lines(data, fmt)]
        assert found == [e.id for e in every if _contains("Żółw")(e)]
        # An empty page: no bytes, no cursor.
        page = await store.export_events(EventFilter(kind="none", limit=5), fmt)
        assert (page.data, page.rows, page.next) == (b"", 0, None)


async def test_the_histogram_counts_per_bucket(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_store(config) as store:
        every = await _seed(store)
        start = T0 - 5  # buckets of 10 s: [T0-5, T0+5), [T0+5, T0+15), ...
        hist = await store.event_histogram(
            EventFilter(since=start), start=start, bucket_seconds=10, buckets=4
        )
        expected = [0] * 4
        for e in every:
            expected[int((e.received_at - start) // 10)] += 1
        assert hist.counts == expected and hist.complete and hist.counted_since is None
        # With filters and a text, and a since after the start.
        query = EventFilter(agent_id=A1, text="note 1", since=T0 + 7, until=T0 + 25)
        hist = await store.event_histogram(query, start=start, bucket_seconds=10, buckets=4)
        expected = [0] * 4
        for e in every:
            if e.agent_id == A1 and _contains("note 1")(e) and T0 + 7 <= e.received_at < T0 + 25:
                expected[int((e.received_at - start) // 10)] += 1
        assert hist.counts == expected and sum(expected) > 0
        # Capped: only the newest rows are counted, and it says from when.
        monkeypatch.setattr(event_search, "HISTOGRAM_ROWS", 10)
        hist = await store.event_histogram(
            EventFilter(since=start), start=start, bucket_seconds=10, buckets=4
        )
        newest = _newest_first(every)[:10]
        assert not hist.complete and hist.counted_since == newest[-1].received_at
        assert sum(hist.counts) == 10

"""Event search, histogram and export over the API, on both stores.

Events are written through the drain's own write (z4j.testing.event_search)
and every answer is checked against the rows read back with plain SQL. The
export's bounded memory is checked by what it does, not how fast: it reads
the store a page at a time and sends each page before reading the next.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, cast
from urllib.parse import urlencode

import orjson
import pytest
import trio

from z4j import keys
from z4j.brain.commands import Commands
from z4j.brain.http import events_api
from z4j.brain.http.api import Api
from z4j.brain.http.auth import Auth
from z4j.brain.http.resources import iso
from z4j.brain.http.streaming import StreamCut
from z4j.config import Config
from z4j.store import StoreUnavailable, event_search
from z4j.store.base import EventFilter, ExportFormat, ExportPage, Store
from z4j.testing import (
    StoredEvent,
    admin_token,
    body_contains,
    http_request,
    open_store,
    running_brain,
    seed_events,
    stored_events,
)
from z4j.testing.event_search import A1, A2, P1, P2, T0

FILTERS: list[tuple[dict[str, str], Any]] = [
    ({"project_id": str(P1)}, lambda e: e.project_id == str(P1)),
    ({"agent_id": str(A2)}, lambda e: e.agent_id == str(A2)),
    ({"worker_id": "w-3"}, lambda e: e.worker_id == "w-3"),
    ({"kind": "metric"}, lambda e: e.kind == "metric"),
    (
        {"since": str(T0 + 5), "until": "2027-01-15T08:00:17+00:00"},  # T0 + 17
        lambda e: T0 + 5 <= e.received_at < T0 + 17,
    ),
    ({"q": "disk full"}, lambda e: body_contains(e, "disk full")),
    ({"q": "100% done_ok, a;b"}, lambda e: body_contains(e, "100% done_ok, a;b")),
    ({"q": '"h8"'}, lambda e: body_contains(e, '"h8"')),  # a JSON-escaped character
    ({"q": "Żółw", "worker_id": "w-1"}, lambda e: e.worker_id == "w-1"),
    (
        {"project_id": str(P1), "kind": "custom.note", "since": str(T0 + 10), "q": "/2"},
        lambda e: (
            e.project_id == str(P1)
            and e.kind == "custom.note"
            and e.received_at >= T0 + 10
            and body_contains(e, "/2")
        ),
    ),
    ({"agent_id": str(A1), "worker_id": "w-2"}, lambda e: False),
    ({"kind": "", "q": "", "project_id": ""}, lambda e: True),  # empty fields: no condition
]


async def _get(http: tuple[str, int], token: str, path: str, **params: Any) -> Any:
    reply = await http_request(
        http, "GET", f"{path}?{urlencode(params)}", headers={"Authorization": f"Bearer {token}"}
    )
    assert reply.status == 200, reply.body
    return reply


async def _walk(http: tuple[str, int], token: str, params: dict[str, str], limit: int) -> list[int]:
    """Every page of a search: the ids in order."""
    ids: list[int] = []
    cursor: str | None = None
    for _ in range(1000):
        extra = {} if cursor is None else {"cursor": cursor}
        page = (await _get(http, token, "/api/v1/events", **params, **extra, limit=limit)).json()
        assert len(page["items"]) <= limit
        ids += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids
    raise AssertionError("no end of pages")


async def _seeded(config: Config) -> tuple[str, list[StoredEvent]]:
    token = await admin_token(config)
    async with open_store(config) as store:
        await seed_events(store)
    every = stored_events(config)
    assert len(every) == 10 * 2 + 1 + 30 * 3
    return token, every


async def test_each_filter_pages_through_exactly_its_events(config: Config) -> None:
    token, every = await _seeded(config)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            for params, expected in FILTERS:
                want = [e.id for e in every if expected(e)]
                for limit in (3, 500):
                    assert await _walk(http, token, params, limit) == want, (params, limit)
            # An item is the event as the API shows it.
            [item] = (await _get(http, token, "/api/v1/events", worker_id="w-2", limit=1)).json()[
                "items"
            ]
            newest = next(e for e in every if e.worker_id == "w-2")
            assert (item["id"], item["agent_id"], item["project_id"], item["body"]) == (
                newest.id,
                str(A2),
                str(P2),
                newest.body,
            )


async def test_a_text_search_reads_bounded_pages_and_still_finds_everything(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a rare text, a page reads at most SCAN_ROWS rows: it may come back
    short or empty, and its cursor goes on from the last row read."""
    monkeypatch.setattr(event_search, "SCAN_ROWS", 5)
    token, every = await _seeded(config)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            first = (await _get(http, token, "/api/v1/events", q="disk full", limit=50)).json()
            assert len(first["items"]) <= 1 and first["next_cursor"] is not None
            want = [e.id for e in every if body_contains(e, "disk full")]
            assert await _walk(http, token, {"q": "disk full"}, 50) == want


async def test_the_histogram_counts_each_bucket_under_the_filters(config: Config) -> None:
    token, every = await _seeded(config)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            since, until = T0 - 30, T0 + 90  # 120 s: buckets of 1 s
            for params, expected in FILTERS:
                if "since" in params or "until" in params:
                    continue  # they would move the range
                hist = (
                    await _get(
                        http, token, "/api/v1/events/histogram", **params, since=since, until=until
                    )
                ).json()
                assert hist["bucket_seconds"] == 1 and hist["complete"] is True
                assert len(hist["buckets"]) == 120
                counts = [0] * 120
                for e in every:
                    if expected(e):
                        counts[int(e.received_at - since)] += 1
                assert [b["count"] for b in hist["buckets"]] == counts, params
            # A wider range gets wider buckets; never more than 120.
            hist = (
                await _get(http, token, "/api/v1/events/histogram", since=T0 - 86400, until=T0 + 60)
            ).json()
            assert hist["bucket_seconds"] == 900 and len(hist["buckets"]) <= 120
            assert sum(b["count"] for b in hist["buckets"]) == len(every)
            # No range: the last day, which holds none of these (T0 is in 2027).
            hist = (await _get(http, token, "/api/v1/events/histogram")).json()
            assert 0 < len(hist["buckets"]) <= 121 and hist["complete"] is True


def _row_json(e: StoredEvent) -> dict[str, Any]:
    return {
        "id": e.id,
        "key": e.key,
        "received_at": iso(e.received_at),
        "source": e.source,
        "kind": e.kind,
        "project_id": e.project_id,
        "agent_id": e.agent_id,
        "worker_id": e.worker_id,
        "body": e.body,
    }


async def test_export_streams_every_matching_event_as_ndjson_and_csv(config: Config) -> None:
    token, every = await _seeded(config)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            reply = await _get(http, token, "/api/v1/events/export")
            assert reply.headers["content-type"] == "application/x-ndjson"
            assert reply.headers["transfer-encoding"] == "chunked"  # streamed, no length
            assert reply.headers["content-disposition"].startswith(
                'attachment; filename="z4j-events-'
            )
            assert reply.headers["content-disposition"].endswith('.ndjson"')
            lines = reply.body.split(b"\n")
            assert lines[-1] == b""
            assert [orjson.loads(line) for line in lines[:-1]] == [_row_json(e) for e in every]

            reply = await _get(http, token, "/api/v1/events/export", format="csv")
            assert reply.headers["content-type"] == "text/csv; charset=utf-8"
            assert reply.headers["content-disposition"].endswith('.csv"')
            rows = list(csv.reader(io.StringIO(reply.body.decode(), newline="")))
            assert rows[0] == list(events_api.EXPORT_COLUMNS)
            expected = [
                [
                    str(e.id),
                    e.key,
                    iso(e.received_at),
                    e.source,
                    e.kind,
                    e.project_id or "",
                    e.agent_id or "",
                    e.worker_id or "",
                ]
                for e in every
            ]
            assert [row[:-1] for row in rows[1:]] == expected
            assert [orjson.loads(row[-1]) for row in rows[1:]] == [e.body for e in every]
            # Fields with commas, quotes and line breaks are quoted (RFC 4180).
            assert b'"odd, ""kind""\nline two"' in reply.body.replace(b"\r\n", b"\n")
            assert any(row[4] == 'odd, "kind"\nline two' for row in rows)
            assert b'""msg""' in reply.body  # the body's JSON, its quotes doubled

            # Filters, and max, apply to an export.
            params = {"agent_id": str(A1), "q": "note", "since": str(T0 + 20)}
            want = [
                e
                for e in every
                if e.agent_id == str(A1) and body_contains(e, "note") and e.received_at >= T0 + 20
            ]
            reply = await _get(http, token, "/api/v1/events/export", **params)
            assert [orjson.loads(x)["id"] for x in reply.body.splitlines()] == [e.id for e in want]
            reply = await _get(http, token, "/api/v1/events/export", **params, max=4)
            assert [orjson.loads(x)["id"] for x in reply.body.splitlines()] == [
                e.id for e in want[:4]
            ]
            reply = await _get(http, token, "/api/v1/events/export", format="csv", kind="none")
            assert reply.body.decode() == ",".join(events_api.EXPORT_COLUMNS) + "\r\n"


@pytest.mark.parametrize(
    "query",
    [
        "cursor=zz",
        "cursor=1.5_-1",
        "cursor=nan_1",
        "cursor=1e300_1",
        "project_id=nope",
        "agent_id=1234",
        "since=yesterday",
        "until=99999999999999",
        "limit=0",
        "limit=501",
        "q=" + "x" * 201,
        "kind=%00",
        "worker_id=" + "w" * 201,
    ],
)
async def test_bad_filters_get_a_400_on_every_route(config: Config, query: str) -> None:
    token = await admin_token(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            for path in ("/api/v1/events", "/api/v1/events/histogram", "/api/v1/events/export"):
                if path != "/api/v1/events" and query.startswith(("cursor", "limit")):
                    continue  # a histogram and an export have no pages
                reply = await http_request(
                    brain.addresses.http,
                    "GET",
                    f"{path}?{query}",
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert reply.status == 400, (path, query, reply.body)
                assert reply.json()["error"] == "bad_request"
                assert reply.headers["content-type"] == "application/json"


async def test_bad_export_and_histogram_parameters_get_a_400(config: Config) -> None:
    token = await admin_token(config)
    auth = {"Authorization": f"Bearer {token}"}
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            for path in (
                "/api/v1/events/export?format=xml",
                "/api/v1/events/export?max=0",
                "/api/v1/events/export?max=-3",
                "/api/v1/events/export?max=99999999999999999999",
                "/api/v1/events/histogram?since=2027-01-02&until=2027-01-01",
                "/api/v1/events/histogram?since=2027-01-01&until=2027-01-01",
            ):
                reply = await http_request(http, "GET", path, headers=auth)
                assert reply.status == 400, (path, reply.body)
            for path in ("/api/v1/events/export", "/api/v1/events/histogram"):
                assert (await http_request(http, "GET", path)).status == 401


# -- the export's memory, in process --------------------------------------------------------


class CountingStore:
    """The real store, with each export read recorded in ``log`` (no other change)."""

    def __init__(self, store: Store, log: list[tuple[str, int]]) -> None:
        self._store, self._log = store, log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def export_events(self, query: EventFilter, fmt: ExportFormat) -> ExportPage:
        found = await self._store.export_events(query, fmt)
        self._log.append(("read", query.limit))
        self._log.append(("rows", found.rows))
        return found


async def _export_in_process(
    config: Config,
    path: str,
    log: list[tuple[str, int]],
    *,
    on_body: Any = None,
) -> bytes:
    """GET ``path`` from an `Api` over the real store, in memory: the body, with
    each body message recorded in ``log`` between the store reads."""
    token = await admin_token(config)
    async with open_store(config) as store:
        counting: Any = CountingStore(store, log)
        api = Api(counting, cast(Commands, None), Auth(store, keys.master_secret(config)))
        path, _, query = path.partition("?")
        scope = {
            "type": "http",
            "method": "GET",
            "path": path,
            "scheme": "http",
            "query_string": query.encode(),
            "client": ("192.0.2.1", 50000),
            "headers": [(b"host", b"x"), (b"authorization", f"Bearer {token}".encode())],
        }
        gone = trio.Event()
        asked = 0
        body = b""

        async def receive() -> dict[str, Any]:
            nonlocal asked
            asked += 1
            if asked == 1:
                return {"type": "http.request", "body": b"", "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal body
            if message["type"] == "http.response.start":
                assert message["status"] == 200
            else:
                log.append(("sent", message["body"].count(b"\n")))
                body += message["body"]
                if on_body is not None:
                    await on_body(gone)

        await api({**scope}, receive, send)
        return body


async def test_an_export_holds_two_pages_at_a_time(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export reads a page ahead of the one it sends, never more: at any
    point at most two pages are read and not yet sent. Pages stay within their
    row cap and (from the second on) their byte budget."""
    monkeypatch.setattr(events_api, "EXPORT_FIRST_ROWS", 3)
    monkeypatch.setattr(events_api, "EXPORT_PAGE_ROWS", 7)
    async with open_store(config) as store:
        await seed_events(store)
    log: list[tuple[str, int]] = []
    with trio.fail_after(30):
        body = await _export_in_process(config, "/api/v1/events/export", log)
    total = len(stored_events(config))
    assert body.count(b"\n") == total
    reads = [n for what, n in log if what == "read"]
    assert reads[0] == 3 and set(reads[1:]) == {7}
    assert len(reads) == 1 + math.ceil((total - 3) / 7)
    held = 0
    for what, _ in log:
        held += {"read": 1, "sent": -1}.get(what, 0)
        assert held <= 2, log
    rows = [n for what, n in log if what == "rows"]
    sent = [n for what, n in log if what == "sent"]
    assert sent[:-1] == rows and sent[-1] == 0  # each page whole, in order; then the end

    # A byte budget: large rows make smaller pages.
    monkeypatch.setattr(events_api, "EXPORT_PAGE_BYTES", 1000)
    log.clear()
    with trio.fail_after(30):
        body = await _export_in_process(config, "/api/v1/events/export?format=csv", log)
    reads = [n for what, n in log if what == "read"]
    assert reads[0] == 3 and max(reads[1:]) < 7 and min(reads[1:]) >= 1
    assert len(list(csv.reader(io.StringIO(body.decode(), newline="")))) == total + 1


async def test_an_export_stops_reading_when_the_client_goes_away(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that stops reading and then disconnects: the export is cancelled
    while it waits to send, and reads no more pages than the one ahead."""
    monkeypatch.setattr(events_api, "EXPORT_FIRST_ROWS", 5)
    monkeypatch.setattr(events_api, "EXPORT_PAGE_ROWS", 5)
    async with open_store(config) as store:
        await seed_events(store)

    async def stall_then_leave(gone: trio.Event) -> None:
        gone.set()  # the client goes away ...
        await trio.sleep_forever()  # ... while the socket is full

    log: list[tuple[str, int]] = []
    with trio.fail_after(30):
        body = await _export_in_process(
            config, "/api/v1/events/export", log, on_body=stall_then_leave
        )
    # The page sent, and at most the one read ahead of it; then nothing more.
    assert [what for what, _ in log if what != "rows"] in (
        ["read", "sent"],
        ["read", "sent", "read"],
        ["read", "read", "sent"],
    )
    assert body.count(b"\n") == 5


@pytest.mark.parametrize("fail_on", [2, 1])
async def test_an_export_that_fails_midway_is_cut_short_never_ended(
    config: Config, monkeypatch: pytest.MonkeyPatch, fail_on: int
) -> None:
    """The store failing after the status went out: the response gets no last
    (more_body false) message, so the client sees a cut transfer, not a whole
    file; failing on the first read, it is a plain 503 instead."""
    monkeypatch.setattr(events_api, "EXPORT_FIRST_ROWS", 5)
    monkeypatch.setattr(events_api, "EXPORT_PAGE_ROWS", 5)
    token = await admin_token(config)
    sent: list[dict[str, Any]] = []
    reads = 0

    class Failing(CountingStore):
        async def export_events(self, query: EventFilter, fmt: ExportFormat) -> ExportPage:
            nonlocal reads
            reads += 1
            if reads == fail_on:
                raise StoreUnavailable("the store went away")
            return await super().export_events(query, fmt)

    async def receive() -> dict[str, Any]:
        if not sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        await trio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/api/v1/events/export",
        "scheme": "http",
        "query_string": b"",
        "client": ("192.0.2.1", 50000),
        "headers": [(b"host", b"x"), (b"authorization", f"Bearer {token}".encode())],
    }
    async with open_store(config) as store:
        await seed_events(store)
        failing: Any = Failing(store, [])
        api = Api(failing, cast(Commands, None), Auth(store, keys.master_secret(config)))
        with trio.fail_after(30):
            if fail_on == 2:
                with pytest.RaisesGroup(StreamCut, flatten_subgroups=True):
                    await api(scope, receive, send)
                assert sent[0]["status"] == 200
                assert all(m.get("more_body", True) for m in sent)
                assert sent[1]["body"].count(b"\n") == 5
            else:
                await api(scope, receive, send)
                assert sent[0]["status"] == 503
                assert orjson.loads(sent[1]["body"])["error"] == "store_unavailable"

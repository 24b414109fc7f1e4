"""Event search benchmark: search pages per filter shape, and the HTTP export's rate and memory.

Run ``python benchmarks/search.py`` (``--help`` for the knobs; ``--events
100000`` for a quick run). Each figure is printed with its target and a
ceiling measured in the same run.

Load. A throwaway Postgres cluster (fsync off, wal_level=minimal: the load
only; the timed parts only read) gets the brain's schema (migration 16's
indexes included) and ``--events`` events (10,000,000) over the last
``--span-days`` days, one partition a day as the brain makes them. The
events table's indexes and unique constraint are dropped, the rows made
by INSERT ... SELECT over generate_series (no row crosses the client), the
indexes rebuilt from their own definitions (checked equal afterwards),
then VACUUM ANALYZE. Rows: 80% agent events (6 agents in 2 projects, 12
workers, celery-shaped task events with a nested ``data`` object), 20%
TCP records (request/query/job/log/exception), ~500 bytes of JSON each.
One row in 10 says "retrying after a timeout" somewhere inside its body,
one in 10,000 "card declined".

(a) Search: what GET /api/v1/events runs, through the store's own method
    (``PostgresStore.search_events``, a page of 50, the brain's pool and
    statement timeout), ``--queries`` times per filter shape with random
    values: no filter, project, agent, worker, kind (by its frequency),
    a rare kind, one hour, project + kind, page 2 of a random filter, a
    deep page (a cursor at a random time) and the text shapes. p50/p99
    for each; target p99 <= 100 ms for every indexed shape (all but the
    text). A text page has no index: it reads at most 10,000 rows of its
    other filters (event_search.SCAN_ROWS), reported without a target.
    Ceiling: the same page's SQL run again on the connection directly
    (no thread hop, no row mapping), for the no-filter shape.

(b) Export: a real brain process (``python -m z4j brain`` on this
    database) streams ``--export`` events (1,000,000) as NDJSON and as
    CSV over GET /api/v1/events/export to a client on loopback that reads
    and counts them. Targets: >= 100,000 events/s, and the brain's peak
    RSS growth (VmRSS sampled every 10 ms, against its RSS after a
    warm-up export) <= 50 MiB. Beside each, the CPU seconds the brain and
    the cluster's backends spent on it (on a shared machine the rate
    moves with the neighbours' load; the CPU per event much less).
    Ceilings, with the figure's ratio to each: the store's export pages
    of the same format read in process (the lines as Postgres builds
    them, no HTTP), and the same rows as ``COPY (SELECT ...) TO STDOUT``
    read by psycopg.

Everything runs on loopback; the cluster and temporary files are removed.
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import psycopg
import trio

from z4j.brain.http import events_api
from z4j.config import Config
from z4j.store import event_search
from z4j.store._filters import events_where
from z4j.store._rows import EVENT_COLUMNS
from z4j.store.base import EventFilter, ExportFormat
from z4j.store.postgres import PG, PostgresStore
from z4j.testing.agents import admin_token
from z4j.testing.brain import BrainProcess, make_config
from z4j.testing.postgres import PostgresCluster

DEFAULTS = Config()
TARGET_P99_MS = 100.0
TARGET_EXPORT_RATE = 100_000.0
TARGET_RSS_MIB = 50.0
PAGE = 50  # the API's default limit
DAY = 86_400.0

PROJECTS = (uuid.UUID(int=0xA1), uuid.UUID(int=0xB2))
AGENTS = tuple(uuid.UUID(int=0x100 + n) for n in range(6))  # 4 in project A, 2 in B
WORKERS = tuple(f"celery@worker-{a}-{w}" for a in range(6) for w in range(2))
AGENT_KINDS = (
    ("task.received", 0.25),
    ("task.started", 0.25),
    ("task.succeeded", 0.40),
    ("task.failed", 0.05),
    ("task.retried", 0.03),
    ("worker.heartbeat", 0.02),
)
TCP_KINDS = (("request", 0.5), ("query", 0.3), ("job", 0.1), ("log", 0.08), ("exception", 0.02))
RARE_KINDS = ("task.retried", "exception")
TASK_NAMES = tuple(
    f"{app}.tasks.{verb}"
    for app in ("billing", "accounts", "search", "mailer", "reports")
    for verb in ("send_email", "sync_customer", "charge_card", "export_csv")
)
COMMON_TEXT = "retrying after a timeout"  # one row in 10
RARE_TEXT = "card declined"  # one row in 10,000


def say(line: str) -> None:
    print(line, flush=True)


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def _cumulative(pairs: tuple[tuple[str, float], ...]) -> tuple[list[str], list[float]]:
    names, bounds, total = [], [], 0.0
    for name, share in pairs:
        total += share
        names.append(name)
        bounds.append(round(total, 6))
    bounds[-1] = 1.0
    return names, bounds


def _pick_sql(column: str, pairs: tuple[tuple[str, float], ...]) -> str:
    names, bounds = _cumulative(pairs)
    cases = " ".join(
        f"WHEN {column} < {bound!r} THEN '{name}'"
        for name, bound in zip(names, bounds, strict=True)
    )
    return f"CASE {cases} ELSE '{names[-1]}' END"


# -- load -----------------------------------------------------------------------------------

# One chunk of the load: rows lo..hi of n, received_at rising with i over the
# span up to "now". Every fifth row is a TCP record; the rest an agent's.
FILL_SQL = f"""
INSERT INTO events (id, received_at, idempotency_key, source, kind, project_id, agent_id,
    worker_id, body)
SELECT i, at, md5(i::text)::uuid,
    CASE WHEN tcp THEN 'tcp' ELSE 'agent' END,
    kind,
    CASE WHEN tcp THEN NULL WHEN a < 4 THEN %(project_a)s::uuid ELSE %(project_b)s::uuid END,
    CASE WHEN tcp THEN NULL ELSE (%(agents)s::uuid[])[1 + a] END,
    CASE WHEN tcp THEN NULL ELSE (%(workers)s::text[])[1 + 2 * a + (i %% 2)::int] END,
    CASE WHEN tcp THEN jsonb_build_object(
        't', kind,
        'host', 'web-' || (i %% 40) || '.prod.internal',
        'service', (ARRAY['checkout', 'search', 'accounts', 'billing'])[1 + (i %% 4)::int],
        'trace_id', md5(i::text),
        'duration_ms', round((r_text * 250)::numeric, 3),
        'status', (ARRAY[200, 200, 200, 201, 204, 404, 500])[1 + (i %% 7)::int],
        'attrs', jsonb_build_object(
            'method', (ARRAY['GET', 'POST', 'PUT', 'DELETE'])[1 + (i %% 4)::int],
            'route', '/api/v1/orders/{{id}}',
            'user_agent', 'Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36',
            'cache_hit', i %% 3 = 0),
        'message', message)
    ELSE jsonb_build_object(
        'id', md5(i::text || 'e'),
        'kind', kind,
        'engine', 'celery',
        'task_id', md5((i / 5)::text),
        'occurred_at', at,
        'data', jsonb_build_object(
            'task_name', (%(names)s::text[])[1 + (i %% 20)::int],
            'queue', (ARRAY['default', 'emails', 'billing', 'reports'])[1 + (i %% 4)::int],
            'worker', (%(workers)s::text[])[1 + 2 * a + (i %% 2)::int],
            'args', jsonb_build_array(i, 'order-' || i),
            'kwargs', jsonb_build_object('retry', false, 'priority', i %% 10),
            'message', message))
    END
FROM (
    SELECT i, at, tcp, a, r_text,
        CASE WHEN tcp THEN {_pick_sql("r_kind", TCP_KINDS)}
             ELSE {_pick_sql("r_kind", AGENT_KINDS)} END AS kind,
        CASE WHEN r_text < 0.0001 THEN 'card declined for order ' || i
             WHEN r_text < 0.1 THEN 'retrying after a timeout, attempt ' || (i %% 5)
             ELSE 'done in ' || (i %% 997) || ' ms' END
        || ' lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor'
        AS message
    FROM (
        SELECT i, i %% 5 = 0 AS tcp, floor(random() * 6)::int AS a,
            random() AS r_kind, random() AS r_text,
            to_timestamp(%(now)s - %(span)s * (1 - i::float8 / %(n)s)) AS at
        FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS i
    ) AS draws
) AS g
"""


def _index_state(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return conn.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'events' ORDER BY indexname"
    ).fetchall()


async def prepare(url: str, now: float, span_days: int) -> None:
    """The brain's schema, and one partition per day of the span (as the drain makes them)."""
    store = PostgresStore.from_url(url, pool_size=1, statement_timeout_ms=0)
    try:
        await store.migrate()
        today = datetime.fromtimestamp(now, UTC).date()
        await store.ensure_partitions({today - timedelta(days=d) for d in range(span_days + 2)})
    finally:
        await store.aclose()


def load_events(
    url: str, n: int, chunk: int, now: float, span: float, *, seed: float = 0.42
) -> None:
    """``n`` events over ``span`` seconds up to ``now``; ``seed``: Postgres's random()'s."""
    with psycopg.connect(url, autocommit=True) as conn:
        indexes = _index_state(conn)
        unique = conn.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = 'events'::regclass AND contype = 'u'"
        ).fetchone()
        assert unique is not None
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute("SELECT setseed(%s)", [seed])
        started = time.perf_counter()
        conn.execute(f"ALTER TABLE events DROP CONSTRAINT {unique[0]}")
        for name, _ in indexes:
            if name != unique[0]:
                conn.execute(f"DROP INDEX {name}")
        params: dict[str, Any] = {
            "project_a": PROJECTS[0],
            "project_b": PROJECTS[1],
            "agents": list(AGENTS),
            "workers": list(WORKERS),
            "names": list(TASK_NAMES),
            "now": now,
            "span": span,
            "n": n,
        }
        for lo in range(1, n + 1, chunk):
            hi = min(n, lo + chunk - 1)
            conn.execute(FILL_SQL, {**params, "lo": lo, "hi": hi})
            say(f"    load: {hi:>11,} / {n:,} events  ({time.perf_counter() - started:.0f} s)")
        conn.execute("SELECT setval(pg_get_serial_sequence('events', 'id'), %s)", [n])
        built = time.perf_counter()
        conn.execute(f"ALTER TABLE events ADD CONSTRAINT {unique[0]} {unique[1]}")
        for name, definition in indexes:
            if name != unique[0]:
                # A partitioned index's definition reads "ON ONLY events": built
                # that way, it would cover no partition.
                conn.execute(definition.replace(" ON ONLY ", " ON ", 1))
                say(f"    index {name} built  ({time.perf_counter() - built:.0f} s)")
        if _index_state(conn) != indexes:
            raise RuntimeError("the rebuilt indexes differ from the migration's")
        partitions = conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass"
        ).fetchone()
        per_partition = conn.execute(
            "SELECT count(*) FROM pg_indexes WHERE tablename LIKE 'events\\_p%'"
        ).fetchone()
        assert partitions is not None and per_partition is not None
        if per_partition[0] != partitions[0] * len(indexes):
            raise RuntimeError(
                f"{per_partition[0]} partition indexes, not {partitions[0]} x {len(indexes)}"
            )
        vacuum = time.perf_counter()
        conn.execute("VACUUM (ANALYZE) events")
        say(f"    VACUUM ANALYZE  ({time.perf_counter() - vacuum:.0f} s)")
        size = conn.execute(
            "SELECT pg_size_pretty(sum(pg_table_size(inhrelid))),"
            " pg_size_pretty(sum(pg_indexes_size(inhrelid)))"
            " FROM pg_inherits WHERE inhparent = 'events'::regclass"
        ).fetchone()
        assert size is not None
        say(
            f"    loaded {n:,} events in {time.perf_counter() - started:.0f} s: table "
            f"{size[0]}, indexes {size[1]} (the migration's {len(indexes)}, checked)"
        )


# -- (a) search -----------------------------------------------------------------------------

INDEXED = (
    "no filter",
    "project",
    "agent",
    "worker",
    "kind",
    "rare kind",
    "one hour",
    "project + kind",
    "page 2",
    "deep page",
)
TEXT = ("text, 1 in 10", "text, 1 in 10,000", "text + agent")


@attrs.define
class Sampler:
    """Random filters of one shape, as the search page sends them."""

    rng: random.Random
    now: float
    span: float

    def kind(self, *, agent: bool = False) -> str:
        """A kind as often as it is stored (of agent events only, with ``agent``)."""
        pairs = AGENT_KINDS if agent or self.rng.random() < 0.8 else TCP_KINDS
        names, bounds = _cumulative(pairs)
        draw = self.rng.random()
        return next(name for name, bound in zip(names, bounds, strict=True) if draw < bound)

    def at(self) -> float:
        return self.now - self.rng.random() * self.span

    def filter(self, shape: str) -> EventFilter:
        rng = self.rng
        if shape == "project":
            return EventFilter(project_id=rng.choice(PROJECTS), limit=PAGE)
        if shape == "agent":
            return EventFilter(agent_id=rng.choice(AGENTS), limit=PAGE)
        if shape == "worker":
            return EventFilter(worker_id=rng.choice(WORKERS), limit=PAGE)
        if shape == "kind":
            return EventFilter(kind=self.kind(), limit=PAGE)
        if shape == "rare kind":
            return EventFilter(kind=rng.choice(RARE_KINDS), limit=PAGE)
        if shape == "one hour":
            start = self.at()
            return EventFilter(since=start, until=start + 3600, limit=PAGE)
        if shape == "project + kind":
            kind = self.kind(agent=True)
            return EventFilter(project_id=rng.choice(PROJECTS), kind=kind, limit=PAGE)
        if shape == "deep page":
            plain = self.filter(rng.choice(INDEXED[:8]))
            return attrs.evolve(plain, before=(self.at(), 2**62))
        if shape == "text, 1 in 10":
            return EventFilter(text=COMMON_TEXT, limit=PAGE)
        if shape == "text, 1 in 10,000":
            return EventFilter(text=RARE_TEXT, limit=PAGE)
        if shape == "text + agent":
            return EventFilter(text="timeout", agent_id=rng.choice(AGENTS), limit=PAGE)
        return EventFilter(limit=PAGE)


async def time_searches(url: str, now: float, span: float, queries: int) -> dict[str, list[float]]:
    """{shape: milliseconds per search_events call}."""
    rng = random.Random(11)
    sampler = Sampler(rng, now, span)
    store = PostgresStore.from_url(
        url, pool_size=DEFAULTS.db_pool_size, statement_timeout_ms=DEFAULTS.db_statement_timeout_ms
    )
    out: dict[str, list[float]] = {}
    try:

        async def query_for(shape: str) -> EventFilter:
            while shape == "page 2":  # of a filter with a page 2
                first = sampler.filter(rng.choice(INDEXED[:8]))
                page = await store.search_events(first)
                if page.next is not None:
                    return attrs.evolve(first, before=page.next)
            return sampler.filter(shape)

        for shape in (*INDEXED, *TEXT):  # warm up: caches, the pool's connections
            for _ in range(3):
                await store.search_events(await query_for(shape))
        for shape in (*INDEXED, *TEXT):
            times: list[float] = []
            short = 0
            for _ in range(queries):
                query = await query_for(shape)
                started = time.perf_counter()
                page = await store.search_events(query)
                times.append((time.perf_counter() - started) * 1000)
                short += len(page.events) < PAGE
            out[shape] = times
            note = f", {short} short pages" if short else ""
            say(
                f"    {shape:<18} p50 {_percentile(times, 50):7.2f} ms  "
                f"p99 {_percentile(times, 99):7.2f} ms  (n={len(times)}{note})"
            )
    finally:
        await store.aclose()
    return out


async def time_histograms(url: str, now: float, span: float, queries: int) -> None:
    """What GET /api/v1/events/histogram runs (120 buckets at most, the newest
    1,000,000 rows counted at most), over a random day and over the whole span."""
    rng = random.Random(13)
    sampler = Sampler(rng, now, span)
    store = PostgresStore.from_url(
        url, pool_size=2, statement_timeout_ms=DEFAULTS.db_statement_timeout_ms
    )
    try:
        for what, seconds, shape in [
            ("a day, no filter", DAY, "no filter"),
            ("a day, by kind", DAY, "kind"),
            ("the span, by agent", span, "agent"),
        ]:
            times: list[float] = []
            partial = 0
            for _ in range(queries):
                until = now - rng.random() * max(0.0, span - seconds)
                query = attrs.evolve(sampler.filter(shape), since=until - seconds, until=until)
                width = event_search.bucket_width(seconds, 120)
                start = until - seconds
                started = time.perf_counter()
                found = await store.event_histogram(
                    query, start=start, bucket_seconds=width, buckets=int(seconds // width) + 1
                )
                times.append((time.perf_counter() - started) * 1000)
                partial += not found.complete
            say(
                f"    histogram, {what:<19} p50 {_percentile(times, 50):8.1f} ms  "
                f"p99 {_percentile(times, 99):8.1f} ms  (n={len(times)}, {partial} capped "
                f"at {event_search.HISTOGRAM_ROWS:,} rows; no target)"
            )
    finally:
        await store.aclose()


def raw_page_ms(url: str, queries: int) -> list[float]:
    """The no-filter page's SQL on a connection of its own: the ceiling for (a)."""
    sql = PG.sql(f"SELECT {EVENT_COLUMNS} FROM events ORDER BY received_at DESC, id DESC LIMIT ?")
    times = []
    with psycopg.connect(url) as conn:
        for _ in range(queries + 3):
            started = time.perf_counter()
            conn.execute(sql, [PAGE]).fetchall()
            times.append((time.perf_counter() - started) * 1000)
    return times[3:]


def explain_shapes(url: str, now: float, span: float) -> None:
    """EXPLAIN ANALYZE of one query of each indexed shape: which index served it."""
    rng = random.Random(5)
    sampler = Sampler(rng, now, span)
    with psycopg.connect(url) as conn:
        for shape in INDEXED:
            if shape == "page 2":
                continue
            query = sampler.filter(shape)
            where = events_where(PG, query)
            sql = PG.sql(
                f"SELECT {EVENT_COLUMNS} FROM events{where}"
                " ORDER BY received_at DESC, id DESC LIMIT ?"
            )
            row = conn.execute(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + sql, [*where.params, query.limit]
            ).fetchone()
            assert row is not None
            plan = row[0][0]
            used: set[str] = set()
            nodes = [plan["Plan"]]
            while nodes:  # the indexes of every partition's scan, by the parent's name
                node = nodes.pop()
                if "Index Name" in node:
                    used.add(re.sub(r"^events_p\d{8}_", "", node["Index Name"]))
                nodes += node.get("Plans") or []
            names = sorted(used)
            say(
                f"    {shape:<18} {plan['Execution Time']:8.2f} ms  "
                f"{plan['Plan']['Node Type']} over {', '.join(names) or 'no index'}"
            )


# -- (b) export -----------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssPeak:
    """The highest VmRSS of a process while the block runs (sampled every 10 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))


def http_export(
    address: tuple[str, int], token: str, fmt: str, most: int
) -> tuple[int, int, float]:
    """GET an export and read it to the end: (lines, bytes, seconds)."""
    conn = http.client.HTTPConnection(*address, timeout=600)
    started = time.perf_counter()
    conn.request(
        "GET",
        f"/api/v1/events/export?format={fmt}&max={most}",
        headers={"Authorization": f"Bearer {token}"},
    )
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"export answered {response.status}: {response.read()[:500]!r}")
    lines = size = 0
    last = b""
    while chunk := response.read(1 << 20):
        lines += chunk.count(b"\n")
        size += len(chunk)
        last = chunk
    elapsed = time.perf_counter() - started
    conn.close()
    if not last.endswith(b"\n"):
        raise RuntimeError("the export did not end with a whole line")
    return lines, size, elapsed


def copy_ceiling(url: str, most: int) -> tuple[int, float]:
    """The same rows as COPY (SELECT ...) TO STDOUT, read by psycopg: (bytes, seconds)."""
    sql = (
        "COPY (SELECT id, idempotency_key, received_at, source, kind, project_id, agent_id,"
        f" worker_id, body FROM events ORDER BY received_at DESC, id DESC LIMIT {int(most)})"
        " TO STDOUT"
    )
    size = 0
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        with conn.cursor().copy(sql) as copy:
            for block in copy:
                size += len(block)
        return size, time.perf_counter() - started


async def store_pages_ceiling(url: str, most: int, fmt: ExportFormat) -> tuple[int, int, float]:
    """The store's export pages in ``fmt``, read in process one after the other
    (the export reads one ahead), its largest page size: (rows, bytes, seconds)."""
    store = PostgresStore.from_url(url, pool_size=2, statement_timeout_ms=0)
    rows = size = 0
    try:
        page = events_api.EXPORT_PAGE_ROWS
        query = EventFilter(limit=page)
        started = time.perf_counter()
        while rows < most:
            found = await store.export_events(
                attrs.evolve(query, limit=min(page, most - rows)), fmt
            )
            rows += found.rows
            size += len(found.data)
            if found.next is None:
                break
            query = attrs.evolve(query, before=found.next)
        return rows, size, time.perf_counter() - started
    finally:
        await store.aclose()


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a process has used."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cluster_cpu_seconds(data_dir: Path) -> float:
    """CPU seconds used by the cluster's processes now running (its backends);
    NaN when its postmaster.pid cannot be read."""
    try:
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    except OSError:
        return math.nan
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                total += cpu_seconds(int(entry.name))
        except (OSError, ValueError):
            continue  # gone meanwhile
    return total


def export_figure(url: str, pg_data: Path, root: Path, most: int) -> list[str]:
    failures: list[str] = []
    data_dir = root / "brain"
    config = make_config(data_dir, url)
    token = trio.run(admin_token, config)
    env = {
        "Z4J_DATA_DIR": str(data_dir),
        "Z4J_DATABASE_URL": url,
        "Z4J_HTTP_BIND": "127.0.0.1:0",
        "Z4J_INGEST_BIND": "127.0.0.1:0",
        "Z4J_LOG_LEVEL": "INFO",  # BrainProcess waits for the INFO ready line
    }
    rates: dict[str, float] = {}
    brain = BrainProcess(env, log_path=root / "brain.log")
    try:
        pid = brain.proc.pid
        # Warm up: imports, the pool's connections, the allocator's arenas.
        http_export(brain.http, token, "ndjson", min(most, 20_000))
        http_export(brain.http, token, "csv", min(most, 20_000))
        for fmt in ("ndjson", "csv"):
            before = rss_bytes(pid)
            brain_cpu, pg_cpu = cpu_seconds(pid), cluster_cpu_seconds(pg_data)
            with RssPeak(pid) as peak:
                lines, size, seconds = http_export(brain.http, token, fmt, most)
            brain_cpu = cpu_seconds(pid) - brain_cpu
            pg_cpu = cluster_cpu_seconds(pg_data) - pg_cpu
            events = lines - (1 if fmt == "csv" else 0)
            if events != most:
                raise RuntimeError(f"{fmt}: {events:,} events exported, not {most:,}")
            rate = rates[fmt] = events / seconds
            growth = (peak.peak - before) / 2**20
            ok_rate = rate >= TARGET_EXPORT_RATE
            ok_rss = growth <= TARGET_RSS_MIB
            say(
                f"    HTTP export, {fmt:<6} {events:,} events, {size / 2**20:,.0f} MiB in "
                f"{seconds:.1f} s: {rate:,.0f} events/s "
                f"(target >= {TARGET_EXPORT_RATE:,.0f}: {'PASS' if ok_rate else 'FAIL'}); "
                f"brain RSS {before / 2**20:.0f} MiB, peak growth {growth:.1f} MiB "
                f"(target <= {TARGET_RSS_MIB:g}: {'PASS' if ok_rss else 'FAIL'})"
            )
            say(
                f"        CPU: brain {brain_cpu:.1f} s ({brain_cpu / events * 1e6:.2f} us an "
                f"event), Postgres {pg_cpu:.1f} s ({pg_cpu / events * 1e6:.2f} us an event)"
            )
            if not ok_rate:
                failures.append(f"{fmt} export {rate:,.0f} events/s < {TARGET_EXPORT_RATE:,.0f}")
            if not ok_rss:
                failures.append(f"{fmt} export RSS growth {growth:.1f} MiB > {TARGET_RSS_MIB:g}")
    finally:
        brain.stop()
    for fmt in ("ndjson", "csv"):
        rows, size, seconds = trio.run(store_pages_ceiling, url, most, fmt)
        say(
            f"    ceiling: the store's {fmt} export pages in process (no HTTP): {rows:,} rows, "
            f"{size / 2**20:,.0f} MiB in {seconds:.1f} s, {rows / seconds:,.0f} rows/s; the HTTP "
            f"export's ratio to it {rates[fmt] / (rows / seconds):.2f}"
        )
    size, seconds = copy_ceiling(url, most)
    ratios = ", ".join(f"{fmt} {rate / (most / seconds):.2f}" for fmt, rate in rates.items())
    say(
        f"    ceiling: COPY (SELECT the same rows) TO STDOUT via psycopg: "
        f"{size / 2**20:,.0f} MiB in {seconds:.1f} s, {most / seconds:,.0f} rows/s; the HTTP "
        f"exports' ratios to it: {ratios}"
    )
    return failures


# -- the run --------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Event search p50/p99 per filter shape over many events (Postgres), "
        "and the HTTP export's rate and the brain's RSS growth.",
    )
    parser.add_argument("--events", type=int, default=10_000_000, help="events loaded")
    parser.add_argument("--export", type=int, default=1_000_000, help="events exported")
    parser.add_argument("--span-days", type=int, default=7, help="days the events span")
    parser.add_argument("--chunk", type=int, default=1_000_000, help="rows per load statement")
    parser.add_argument("--queries", type=int, default=200, help="timed searches per shape")
    parser.add_argument("--only", choices=("search", "export"), help="run one of the two figures")
    args = parser.parse_args()
    most = min(args.export, args.events)

    started = time.perf_counter()
    say(
        f"z4j search benchmark: {os.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the start"
    )
    failures: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="z4j-bench-search-"))
    settings = {"wal_level": "minimal", "max_wal_senders": "0"}
    try:
        with PostgresCluster(fsync=False, settings=settings) as pg:
            url = pg.create_database("bench_search")
            with psycopg.connect(url) as conn:
                version = conn.execute("SHOW server_version").fetchone()
                buffers = conn.execute("SHOW shared_buffers").fetchone()
            assert version is not None and buffers is not None
            say(
                f"    Postgres {version[0]}, shared_buffers {buffers[0]}, fsync=off and "
                f"wal_level=minimal (for the load); pool {DEFAULTS.db_pool_size}, statement "
                f"timeout {DEFAULTS.db_statement_timeout_ms / 1000:g} s"
            )
            now = time.time()
            span = args.span_days * DAY
            trio.run(prepare, url, now, args.span_days)
            load_events(url, args.events, args.chunk, now, span)

            if args.only in (None, "search"):
                say(
                    f"(a) search over {args.events:,} events: PostgresStore.search_events, a page "
                    f"of {PAGE}, {args.queries} random queries per shape"
                )
                results = trio.run(time_searches, url, now, span, args.queries)
                indexed = [ms for shape in INDEXED for ms in results[shape]]
                worst = max(INDEXED, key=lambda s: _percentile(results[s], 99))
                p99 = _percentile(indexed, 99)
                worst_p99 = _percentile(results[worst], 99)
                ok = worst_p99 <= TARGET_P99_MS
                say(
                    f"    indexed shapes together: p50 {_percentile(indexed, 50):.2f} ms, p99 "
                    f"{p99:.2f} ms; worst shape {worst}: p99 {worst_p99:.2f} ms   "
                    f"(target p99 <= {TARGET_P99_MS:g} ms per shape: {'PASS' if ok else 'FAIL'})"
                )
                text = [ms for shape in TEXT for ms in results[shape]]
                say(
                    f"    text shapes (no index; at most {event_search.SCAN_ROWS:,} rows read a "
                    f"page): p50 {_percentile(text, 50):.2f} ms, p99 {_percentile(text, 99):.2f} "
                    "ms (no target)"
                )
                trio.run(time_histograms, url, now, span, min(args.queries, 20))
                raw = raw_page_ms(url, args.queries)
                say(
                    f"    ceiling: the no-filter page's SQL on a plain connection: p50 "
                    f"{_percentile(raw, 50):.2f} ms, p99 {_percentile(raw, 99):.2f} ms"
                )
                say("    EXPLAIN ANALYZE, one query of each indexed shape:")
                explain_shapes(url, now, span)
                if not ok:
                    failures.append(f"search p99 {worst_p99:.1f} ms ({worst}) > {TARGET_P99_MS:g}")

            if args.only in (None, "export"):
                say(
                    f"(b) export of {most:,} of the {args.events:,} events through a brain "
                    "process's GET /api/v1/events/export"
                )
                failures += export_figure(url, pg.data, root, most)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for failure in failures:
        say(f"MISSED: {failure}")
    say(
        f"total run time {time.perf_counter() - started:.0f} s, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

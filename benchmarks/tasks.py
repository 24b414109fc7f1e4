"""Task projection benchmark: the drain with and without it, and the tasks page's query.

Run ``python benchmarks/tasks.py`` (``--help`` for the knobs; ``--tasks
1000000`` for a quicker run, ``--only drain`` or ``--only page`` for one
half). Both figures are measured against a reference taken in the same run.

(a) Drain throughput with the task projection on, against the same drain
    with it off. A buffer file holds agent rows (source ``agent``, origin
    {project_id, agent_id, worker_id}, body a JSON array of events) as the
    brain's agent endpoint writes them: one row per event_batch frame,
    ``--per-row`` events each, run for 100 (an agent that batches) and 1
    (z4j-bare 1.13 sends one event per frame; research-15, section 3). The
    events are what z4j-celery sends for a task that succeeds on a solo
    pool, 5 per task:

    - ``task.received`` (signal copy: name, queue, args, kwargs, root id),
    - ``task.started`` (signal copy: name, args, kwargs),
    - ``task.succeeded`` (signal copy: name, native result, runtime_ms null),
    - ``task.started`` and ``task.succeeded`` again, the broker monitor's
      copies ~0.9 s later: task_name ``<unknown:xxxxxxxx>``, worker = the
      Celery hostname, result as a repr string, runtime_ms an int.

    Tasks start at ``--rate`` per second over a few agents (one worker
    session each); each agent's events go out in time order, so a task's
    copies often land in different rows, and in different drain batches.
    The buffer is drained into Postgres (fsync on) by the real drain path
    (`z4j.testing.drain.draining` + `z4j.store.postgres.PostgresStore`, the
    brain's default drain workers, lease, pool and statement timeout), once
    with ``project_tasks=False`` and once with ``True``, each into a fresh
    database from a copy of the same buffer file, alternated off/on
    ``--rounds`` times; the best run of each counts. This process runs with
    the garbage collector's thresholds and GIL switch interval of the
    ``z4j brain`` process (`z4j.cli.tune_interpreter`, the defaults). Each
    run says the CPU time it took, in this process (the drains, the buffer,
    Trio) and in Postgres (its backends and background processes). The
    clock runs from the start of the drains until the buffer is empty. A
    run counts only if ``events`` then holds every event, and ``tasks``
    holds one row per task, succeeded, with its real name, the broker
    copy's worker and runtime (on), or nothing (off). Target: on/off >= 0.7.

    Each claim is the brain's: up to Z4J_DRAIN_BATCH_ROWS rows and
    Z4J_DRAIN_BATCH_BYTES of payloads (``--batch-rows``/``--batch-bytes``
    override them), about 12,000 events of 100-event agent batches and
    10,000 of one-event ones. (Before the byte limit a claim was 2,000 rows
    whatever they held: 200,000 events of 100-event batches in one
    transaction.)

(b) The tasks page's query over ``--tasks`` tasks (10,000,000). A fresh
    database gets the brain's schema; the ``tasks`` table's indexes are
    dropped, the table filled with INSERT ... SELECT over generate_series
    (4 engines, 50 task names with a skewed spread, 10 queues for the
    engines that have queues, 6 agents in 2 projects, the 6 states at
    89.5% succeeded / 4% failed / 3% received / 2% started / 1% retried /
    0.5% revoked, last_event_at spread over 30 days in insertion order;
    each doc 600 bytes, the size of a celery task's, so that the rows take
    their real room), the indexes recreated from their own definitions
    (checked equal to the migration's afterwards), ``task_counts`` filled
    as the drain keeps it, then VACUUM ANALYZE. This cluster runs with fsync off and
    wal_level=minimal, for the load only: the timed queries only read.

    Then what GET /api/v1/tasks runs, through the store's own methods:
    ``PostgresStore.list_tasks`` (one page of 50) and
    ``PostgresStore.count_tasks`` (count_by_state), ``--queries`` times per
    filter with random filter values: state=failed, engine, name, queue,
    agent_id, no filter, page 2 (a page-1 cursor under a random one of
    those filters) and a deep page (a cursor at a random time in the 30
    days, random filter). p50/p99 of each, and of the list query over all
    of them; target p99 <= 100 ms for the list query. The count query is
    reported beside it: with no filter, or by engine, it reads
    ``task_counts``; by name or agent it counts the newest 100,000 matches
    (the API then says ``counts_exact: false``). It runs at most
    ``--count-seconds`` per filter. EXPLAIN ANALYZE of one query of each
    kind says which index served it.

Everything runs on loopback; clusters and temporary files are removed.
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import orjson
import psycopg
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cluster_cpu_seconds, process_cpu_seconds

from z4j.buffer import Buffer, BufferFile, NewRow
from z4j.cli import tune_interpreter
from z4j.config import Config
from z4j.stats import BrainStats
from z4j.store import tasks as task_sql
from z4j.store.base import TaskFilter
from z4j.store.postgres import PG, PostgresStore
from z4j.testing.drain import draining
from z4j.testing.postgres import PostgresCluster

DEFAULTS = Config()
TARGET_RATIO = 0.7
TARGET_P99_MS = 100.0
EVENTS_PER_TASK = 5
PAGE = 50  # the API's default limit
DOC_BYTES = 600  # a celery task's doc (5 observations, its registers), as orjson

ENGINES = (("celery", 0.55), ("dramatiq", 0.20), ("huey", 0.15), ("taskiq", 0.10))
QUEUED_ENGINES = ("celery", "dramatiq")  # huey and taskiq send no queue
STATES = (
    ("received", 0.03),
    ("started", 0.02),
    ("retried", 0.01),
    ("succeeded", 0.895),
    ("failed", 0.04),
    ("revoked", 0.005),
)
TASK_NAMES = tuple(
    f"{app}.tasks.{verb}_{noun}"
    for app, verb, noun in (
        (a, v, n)
        for a in ("billing", "accounts", "search", "mailer", "reports")
        for v, n in (
            ("send", "email"),
            ("sync", "customer"),
            ("rebuild", "index"),
            ("charge", "card"),
            ("export", "csv"),
            ("resize", "image"),
            ("refresh", "cache"),
            ("notify", "webhook"),
            ("expire", "sessions"),
            ("compute", "totals"),
        )
    )
)  # 50 names
QUEUES = (
    "celery",
    "default",
    "high",
    "low",
    "emails",
    "billing",
    "reports",
    "webhooks",
    "search",
    "media",
)
PROJECTS = (uuid.UUID(int=0xA1), uuid.UUID(int=0xB2))
AGENTS = tuple(uuid.UUID(int=0x100 + n) for n in range(6))  # 4 in project A, 2 in B
DAY = 86_400.0
SPREAD_DAYS = 30


def say(line: str) -> None:
    print(line, flush=True)


# -- (a) the drain, with and without the projection ------------------------------------


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat()


def _celery_task(
    rng: random.Random, at: float, name: str, queue: str, host: str
) -> list[tuple[float, dict[str, Any]]]:
    """The 5 events of one successful Celery task on a solo pool: 3 signal copies,
    2 broker-monitor copies ~0.9 s later (research-15, section 3)."""
    task_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    args = [rng.randrange(1_000_000), f"order-{rng.randrange(10**6)}"]
    kwargs = {"retry": False, "priority": rng.randrange(10)}
    result = {"ok": True, "rows": rng.randrange(1000)}
    started = at + 0.002 + rng.random() * 0.01
    runtime = 0.005 + rng.random() * 0.2
    finished = started + runtime
    lag = 0.85 + rng.random() * 0.1
    unknown = f"<unknown:{task_id[:8]}>"

    def event(kind: str, when: float, data: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        return when, {
            "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "kind": kind,
            "engine": "celery",
            "task_id": task_id,
            "occurred_at": _iso(when),
            "data": data,
        }

    return [
        event(
            "task.received",
            at,
            {
                "task_name": name,
                "queue": queue,
                "worker": None,
                "args": args,
                "kwargs": kwargs,
                "root_task_id": task_id,
            },
        ),
        event(
            "task.started",
            started,
            {"task_name": name, "queue": None, "worker": None, "args": args, "kwargs": kwargs},
        ),
        event(
            "task.succeeded",
            finished,
            {
                "task_name": name,
                "queue": None,
                "worker": None,
                "result": result,
                "runtime_ms": None,
            },
        ),
        event(
            "task.started",
            started + lag,
            {"task_name": unknown, "queue": None, "worker": host, "args": None, "kwargs": None},
        ),
        event(
            "task.succeeded",
            finished + lag,
            {
                "task_name": unknown,
                "queue": None,
                "worker": host,
                "result": repr({"ok": True, "rows": result["rows"]}),
                "runtime_ms": round(runtime * 1000),
            },
        ),
    ]


def agent_rows(tasks: int, per_row: int, agents: int, rate: float, seed: int) -> Iterator[NewRow]:
    """Buffer rows as the agent endpoint writes them: per agent, its events in time
    order, ``per_row`` to a row; rows in the order they would be sent."""
    rng = random.Random(seed)
    start = time.time() - tasks / rate - 120
    origins = [
        orjson.dumps(
            {
                "project_id": str(PROJECTS[0]),
                "agent_id": str(AGENTS[a]),
                "worker_id": f"ws-{a}",
            }
        )
        for a in range(agents)
    ]
    pending: list[tuple[float, int, int, dict[str, Any]]] = []  # (at, seq, agent, event)
    batches: list[list[dict[str, Any]]] = [[] for _ in range(agents)]
    seq = 0

    def take(at: float, agent: int, event: dict[str, Any]) -> NewRow | None:
        batch = batches[agent]
        batch.append(event)
        if len(batch) < per_row:
            return None
        batches[agent] = []
        return NewRow(
            received_at=at + 0.05, source="agent", body=orjson.dumps(batch), origin=origins[agent]
        )

    for n in range(tasks):
        at = start + n / rate
        agent = n % agents
        name = TASK_NAMES[int(len(TASK_NAMES) * rng.random() ** 2)]
        queue = QUEUES[int(len(QUEUES) * rng.random() ** 1.5)]
        host = f"celery@worker-{agent}"
        for when, event in _celery_task(rng, at, name, queue, host):
            heapq.heappush(pending, (when, seq, agent, event))
            seq += 1
        # Every later event is at or after ``at``: what is older is final.
        while pending and pending[0][0] <= at:
            when, _, a, event = heapq.heappop(pending)
            row = take(when, a, event)
            if row is not None:
                yield row
    while pending:
        when, _, a, event = heapq.heappop(pending)
        row = take(when, a, event)
        if row is not None:
            yield row
    for a, batch in enumerate(batches):
        if batch:
            yield NewRow(
                received_at=time.time(), source="agent", body=orjson.dumps(batch), origin=origins[a]
            )


def make_buffer(path: Path, args: argparse.Namespace, per_row: int) -> tuple[int, int]:
    """The master buffer file; returns (rows, bytes of event JSON)."""
    buf = BufferFile(path)
    rows = size = 0
    group: list[NewRow] = []
    try:
        for row in agent_rows(args.drain_tasks, per_row, args.agents, args.rate, seed=7):
            group.append(row)
            rows += 1
            size += len(row.body)
            if len(group) == 100:
                buf.append(group)
                group = []
        if group:
            buf.append(group)
    finally:
        buf.close()
    return rows, size


async def migrate(url: str) -> None:
    store = PostgresStore.from_url(url, pool_size=1, statement_timeout_ms=0)
    try:
        await store.migrate()
    finally:
        await store.aclose()


def batch_rows_for(per_row: int, args: argparse.Namespace) -> int:
    """--batch-rows, else the brain's default (Z4J_DRAIN_BATCH_ROWS)."""
    return int(args.batch_rows) if args.batch_rows else DEFAULTS.drain_batch_rows


async def drain_once(
    buffer_path: Path, url: str, project_tasks: bool, batch_rows: int, args: argparse.Namespace
) -> tuple[float | None, float, int]:
    """Drain the whole buffer; (seconds or None past --timeout, this process's CPU
    seconds meanwhile, failed writes)."""
    buffer = await Buffer.open(buffer_path, max_rows=10**9)
    store = PostgresStore.from_url(
        url,
        pool_size=args.pool_size,
        statement_timeout_ms=DEFAULTS.db_statement_timeout_ms,
        project_tasks=project_tasks,
    )
    stats = BrainStats()
    try:
        cpu = process_cpu_seconds(os.getpid())
        started = time.perf_counter()
        seconds = None
        async with draining(
            buffer,
            store,
            batch_rows=batch_rows,
            batch_bytes=args.batch_bytes,
            lease_seconds=DEFAULTS.drain_lease_seconds,
            workers=args.workers,
            stats=stats,
        ):
            with trio.move_on_after(args.timeout):
                while buffer.file.depth > 0:  # noqa: ASYNC110 - polls a counter a thread updates
                    await trio.sleep(0.002)
                seconds = time.perf_counter() - started
            used = process_cpu_seconds(os.getpid()) - cpu
        return seconds, used, stats.drain_failures
    finally:
        await buffer.aclose()
        await store.aclose()


def check_drained(url: str, project_tasks: bool, events: int, tasks: int) -> str:
    """Raise unless the database holds what the drain had to write; a summary."""
    with psycopg.connect(url) as conn:
        got = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        if got != events:
            raise RuntimeError(f"events holds {got} rows, expected {events}")
        if not project_tasks:
            rows = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
            if rows:
                raise RuntimeError(f"projection off, yet tasks holds {rows} rows")
            return f"events {got:,}, tasks empty"
        rows, succeeded, named, worker, runtime, once = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE state = 'succeeded'),"
            " count(*) FILTER (WHERE name LIKE '%.tasks.%'),"
            " count(*) FILTER (WHERE worker LIKE 'celery@worker-%'),"
            " count(*) FILTER (WHERE runtime_ms IS NOT NULL),"
            " count(*) FILTER (WHERE attempts = 1)"
            " FROM tasks"
        ).fetchone()
    wanted = {
        "rows": rows,
        "succeeded": succeeded,
        "real name": named,
        "broker worker": worker,
        "runtime_ms": runtime,
        "1 attempt": once,
    }
    wrong = {k: v for k, v in wanted.items() if v != tasks}
    if wrong:
        raise RuntimeError(f"tasks: expected {tasks} of each, got {wrong}")
    return f"events {got:,}, tasks {rows:,}: all succeeded, real name, worker, runtime"


def drain_run(
    pg: PostgresCluster,
    name: str,
    master: Path,
    workdir: Path,
    project_tasks: bool,
    batch_rows: int,
    args: argparse.Namespace,
) -> tuple[float | None, str]:
    """(events/s or None if it did not finish, how it went and what the database holds)."""
    events = args.drain_tasks * EVENTS_PER_TASK
    url = pg.create_database(name)
    buffer_path = workdir / name / "buffer.sqlite3"
    try:
        buffer_path.parent.mkdir(mode=0o700)
        shutil.copyfile(master, buffer_path)  # closed cleanly: no WAL left beside it
        trio.run(migrate, url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
        postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
        server = cluster_cpu_seconds(postmaster)
        seconds, used, failures = trio.run(
            drain_once, buffer_path, url, project_tasks, batch_rows, args
        )
        time.sleep(0.2)  # the pool's backends exit, and are reaped
        server = cluster_cpu_seconds(postmaster) - server
        failed = f"; {failures} store writes failed and were retried" if failures else ""
        cpu = f"CPU: drain process {used:.2f} s, Postgres {server:.2f} s"
        if seconds is None:
            return None, f"not drained after {args.timeout:g} s, {cpu}{failed}"
        summary = check_drained(url, project_tasks, events, args.drain_tasks)
        return events / seconds, f"{seconds:.2f} s, {cpu}; {summary}{failed}"
    finally:
        shutil.rmtree(workdir / name, ignore_errors=True)
        pg.drop_database(name)


def drain_figure(args: argparse.Namespace, root: Path) -> list[str]:
    """Figure (a), for each --per-row; returns what missed its target."""
    events = args.drain_tasks * EVENTS_PER_TASK
    shapes = [int(n) for n in str(args.per_row).split(",") if n.strip()]
    say(
        f"(a) drain with and without the task projection: {args.drain_tasks:,} celery tasks x "
        f"{EVENTS_PER_TASK} events = {events:,} events, {args.agents} agents, "
        f"{args.rate:g} tasks/s"
    )
    failures = []
    with PostgresCluster(fsync=not args.no_fsync) as pg:
        with psycopg.connect(pg.url) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
        say(
            f"    Postgres {version}, fsync={'off' if args.no_fsync else 'on'}, loopback; "
            f"{args.workers} drain workers, pool {args.pool_size}, "
            f"lease {DEFAULTS.drain_lease_seconds:g} s, "
            f"statement timeout {DEFAULTS.db_statement_timeout_ms / 1000:g} s"
        )
        for per_row in shapes:
            master = root / f"master-{per_row}" / "buffer.sqlite3"
            master.parent.mkdir(mode=0o700)
            started = time.perf_counter()
            rows, size = make_buffer(master, args, per_row)
            batch_rows = batch_rows_for(per_row, args)
            per_claim = min(batch_rows, max(1, args.batch_bytes // max(1, size // rows)))
            say(
                f"  agent rows of {per_row} event{'s' if per_row > 1 else ''}: {rows:,} rows "
                f"({size / events:.0f} B per event as JSON, written in "
                f"{time.perf_counter() - started:.1f} s); a drain claims up to {batch_rows:,} "
                f"rows and {args.batch_bytes:,} bytes: about {per_claim * per_row:,} events"
            )
            results: dict[bool, list[float]] = {False: [], True: []}
            for rnd in range(1, args.rounds + 1):
                for project_tasks in (False, True):
                    label = "on " if project_tasks else "off"
                    rate, summary = drain_run(
                        pg,
                        f"bench_tasks_{per_row}_{label.strip()}_{rnd}",
                        master,
                        root,
                        project_tasks,
                        batch_rows,
                        args,
                    )
                    results[project_tasks].append(rate or 0.0)
                    shown = f"{rate:>9,.0f} events/s" if rate else f"{'(none)':>9} events/s"
                    say(f"    round {rnd}, projection {label}: {shown}  ({summary})")
            shutil.rmtree(master.parent, ignore_errors=True)
            off, on = max(results[False]), max(results[True])
            ratio = on / off if off else 0.0
            ok = ratio >= TARGET_RATIO
            say(f"    reference, projection off (best run): {off:>9,.0f} events/s")
            say(
                f"    projection on (best run):             {on:>9,.0f} events/s "
                f"({on / EVENTS_PER_TASK:,.0f} tasks/s), ratio on/off {ratio:.2f}   "
                f"(target >= {TARGET_RATIO}: {'PASS' if ok else 'FAIL'})"
            )
            if not ok:
                failures.append(
                    f"drain ratio on/off {ratio:.2f} < {TARGET_RATIO} ({per_row}-event rows)"
                )
    return failures


# -- (b) the tasks page over many tasks ---------------------------------------------------


def _cumulative(pairs: tuple[tuple[str, float], ...]) -> tuple[list[str], list[float]]:
    names, bounds, total = [], [], 0.0
    for name, share in pairs:
        total += share
        names.append(name)
        bounds.append(total)
    bounds[-1] = 1.01  # no gap for rounding
    return names, bounds


def _pick_sql(column: str, pairs: tuple[tuple[str, float], ...]) -> str:
    names, bounds = _cumulative(pairs)
    cases = " ".join(
        f"WHEN {column} < {bound!r} THEN '{name}'"
        for name, bound in zip(names, bounds, strict=True)
    )
    return f"CASE {cases} END"


# One chunk of the fill: rows lo..hi of n. Random draws first (one per column),
# then the columns. last_event_at rises with the row number (insertion order),
# over SPREAD_DAYS up to "now".
FILL_SQL = f"""
INSERT INTO tasks (project_id, engine, task_id, name, queue, state, attempts, agent_id, worker,
    exception, message, runtime_ms, first_seen, received_at, started_at, finished_at,
    last_event_at, doc)
SELECT
    CASE WHEN agent < 4 THEN %(project_a)s::uuid ELSE %(project_b)s::uuid END,
    engine,
    CASE WHEN engine = 'taskiq' THEN replace(gen_random_uuid()::text, '-', '')
         ELSE gen_random_uuid()::text END,
    (%(names)s::text[])[1 + floor(50 * power(r_name, 2))::int],
    CASE WHEN engine IN ('celery', 'dramatiq')
         THEN (%(queues)s::text[])[1 + floor(10 * power(r_queue, 1.5))::int] END,
    state,
    CASE WHEN state = 'retried' THEN 2 ELSE 1 END,
    (%(agents)s::uuid[])[1 + agent],
    CASE WHEN state <> 'received' THEN engine || '@worker-' || agent || '-' || (i %% 4) END,
    CASE WHEN state = 'failed'
         THEN (ARRAY['ValueError', 'TimeoutError', 'ConnectionError', 'KeyError'])
              [1 + (i %% 4)] END,
    CASE WHEN state = 'failed' THEN 'boom ' || (i %% 97) END,
    CASE WHEN state IN ('succeeded', 'failed') THEN runtime END,
    at - 0.5 * interval '1 second' - runtime * interval '1 millisecond',
    at - 0.5 * interval '1 second' - runtime * interval '1 millisecond',
    CASE WHEN state <> 'received' THEN at - runtime * interval '1 millisecond' END,
    CASE WHEN state IN ('succeeded', 'failed', 'revoked', 'retried') THEN at END,
    at,
    %(doc)s::bytea
FROM (
    SELECT i, r_name, r_queue, agent,
        {_pick_sql("r_engine", ENGINES)} AS engine,
        {_pick_sql("r_state", STATES)} AS state,
        round((5 + 2000 * power(r_runtime, 3))::numeric, 3)::float8 AS runtime,
        to_timestamp(%(now)s - %(span)s * (1 - i::float8 / %(n)s) + 60 * r_jitter) AS at
    FROM (
        SELECT i, random() AS r_engine, random() AS r_name, random() AS r_queue,
            random() AS r_state, random() AS r_runtime, random() AS r_jitter,
            floor(random() * 6)::int AS agent
        FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS i
    ) AS draws
) AS g
"""


def _index_state(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return conn.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'tasks' ORDER BY indexname"
    ).fetchall()


def fill_tasks(url: str, n: int, chunk: int) -> float:
    """Fill ``tasks`` with ``n`` rows, indexes dropped and recreated; returns "now"."""
    now = time.time()
    with psycopg.connect(url, autocommit=True) as conn:
        indexes = _index_state(conn)
        pkey = conn.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = 'tasks'::regclass AND contype = 'p'"
        ).fetchone()
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute("SELECT setseed(0.42)")
        started = time.perf_counter()
        # One transaction from TRUNCATE on: with wal_level=minimal the new
        # table file is written without WAL.
        with conn.transaction():
            conn.execute("TRUNCATE tasks")
            conn.execute(f"ALTER TABLE tasks DROP CONSTRAINT {pkey[0]}")
            for name, _ in indexes:
                if name != pkey[0]:
                    conn.execute(f"DROP INDEX {name}")
            params: dict[str, Any] = {
                "project_a": PROJECTS[0],
                "project_b": PROJECTS[1],
                "names": list(TASK_NAMES),
                "queues": list(QUEUES),
                "agents": list(AGENTS),
                "now": now,
                "span": SPREAD_DAYS * DAY,
                "n": n,
                # A real celery task's doc is ~600 bytes: the rows take their real room.
                "doc": b"x" * DOC_BYTES,
            }
            for lo in range(1, n + 1, chunk):
                hi = min(n, lo + chunk - 1)
                conn.execute(FILL_SQL, {**params, "lo": lo, "hi": hi})
                say(f"    fill: {hi:>11,} / {n:,} rows  ({time.perf_counter() - started:.0f} s)")
        load = time.perf_counter()
        conn.execute(f"ALTER TABLE tasks ADD CONSTRAINT {pkey[0]} {pkey[1]}")
        say(f"    index {pkey[0]} built  ({time.perf_counter() - load:.0f} s)")
        for name, definition in indexes:
            if name != pkey[0]:
                conn.execute(definition)
                say(f"    index {name} built  ({time.perf_counter() - load:.0f} s)")
        if _index_state(conn) != indexes:
            raise RuntimeError("the recreated indexes differ from the migration's")
        # What the drain keeps beside the rows: the counts by state.
        conn.execute("TRUNCATE task_counts")
        conn.execute(
            "INSERT INTO task_counts SELECT project_id, engine, coalesce(queue, ''), state,"
            " 0, count(*) FROM tasks GROUP BY 1, 2, 3, 4"
        )
        vacuum = time.perf_counter()
        conn.execute("VACUUM (ANALYZE) tasks")
        say(f"    VACUUM ANALYZE  ({time.perf_counter() - vacuum:.0f} s)")
        size = conn.execute(
            "SELECT pg_size_pretty(pg_table_size('tasks')),"
            " pg_size_pretty(pg_indexes_size('tasks'))"
        ).fetchone()
        say(
            f"    loaded {n:,} tasks in {time.perf_counter() - started:.0f} s: table {size[0]}, "
            f"indexes {size[1]} (the migration's {len(indexes)}, checked)"
        )
    return now


class Sampler:
    """Random filters of one kind, as the tasks page sends them."""

    KINDS = ("state=failed", "engine", "name", "queue", "agent_id", "no filter")

    def __init__(self, rng: random.Random, now: float) -> None:
        self.rng = rng
        self.now = now

    def filter(self, kind: str, **more: Any) -> TaskFilter:
        rng = self.rng
        if kind == "state=failed":
            return TaskFilter(state="failed", **more)
        if kind == "engine":
            return TaskFilter(engine=rng.choice([e for e, _ in ENGINES]), **more)
        if kind == "name":
            return TaskFilter(name=rng.choice(TASK_NAMES), **more)
        if kind == "queue":
            return TaskFilter(queue=rng.choice(QUEUES), **more)
        if kind == "agent_id":
            return TaskFilter(agent_id=rng.choice(AGENTS), **more)
        return TaskFilter(**more)

    def deep_cursor(self) -> tuple[float, str, str]:
        at = self.now - self.rng.random() * SPREAD_DAYS * DAY
        return at, "~", ""


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


async def time_queries(
    url: str, now: float, args: argparse.Namespace
) -> dict[str, tuple[list[float], list[float]]]:
    """{filter kind: (list query ms, count query ms)}."""
    rng = random.Random(11)
    sampler = Sampler(rng, now)
    store = PostgresStore.from_url(
        url, pool_size=DEFAULTS.db_pool_size, statement_timeout_ms=DEFAULTS.db_statement_timeout_ms
    )
    kinds = [*Sampler.KINDS, "page 2", "deep page"]
    out: dict[str, tuple[list[float], list[float]]] = {}
    try:

        async def query_for(kind: str) -> TaskFilter:
            if kind == "page 2":
                first = sampler.filter(rng.choice(Sampler.KINDS))
                page = await store.list_tasks(first)
                last = page[-1]
                return attrs.evolve(first, before=(last.last_event_at, last.engine, last.task_id))
            if kind == "deep page":
                return sampler.filter(rng.choice(Sampler.KINDS), before=sampler.deep_cursor())
            return sampler.filter(kind)

        for kind in kinds:  # warm up: caches, the pool's connections
            for _ in range(5):
                query = await query_for(kind)
                await store.list_tasks(query)
        for kind in kinds:
            lists: list[float] = []
            counts: list[float] = []
            budget = time.perf_counter() + args.count_seconds
            for _ in range(args.queries):
                query = await query_for(kind)
                started = time.perf_counter()
                page = await store.list_tasks(query)
                lists.append((time.perf_counter() - started) * 1000)
                if len(page) != PAGE:
                    raise RuntimeError(f"{kind}: {query} gave a page of {len(page)}")
                if len(counts) < 3 or time.perf_counter() < budget:
                    started = time.perf_counter()
                    await store.count_tasks(query)
                    counts.append((time.perf_counter() - started) * 1000)
            out[kind] = (lists, counts)
            say(
                f"    {kind:<13} list p50 {_percentile(lists, 50):7.2f} ms  "
                f"p99 {_percentile(lists, 99):7.2f} ms  (n={len(lists)})   "
                f"count p50 {_percentile(counts, 50):8.1f} ms  "
                f"p99 {_percentile(counts, 99):8.1f} ms  (n={len(counts)})"
            )
    finally:
        await store.aclose()
    return out


class _Capture:
    """Stands in for a connection: keeps the SQL a store function would run."""

    def __init__(self) -> None:
        self.sql = ""
        self.params: list[Any] = []

    def execute(self, sql: str, params: Any = ()) -> _Capture:
        self.sql, self.params = sql, list(params)
        return self

    def fetchall(self) -> list[Any]:
        return []


def _plan_summary(node: dict[str, Any]) -> tuple[str, float, str]:
    """("Node > Node using index ..." down the plan's first children, rows filtered
    out, the index condition)."""
    parts = []
    removed = 0.0
    cond = ""
    while True:
        part = node["Node Type"]
        if "Index Name" in node:
            part += f" using {node['Index Name']}"
            cond = node.get("Index Cond", "")
        if node.get("Heap Fetches"):
            part += f" [heap fetches {node['Heap Fetches']:,}]"
        if node.get("Workers Launched"):
            part += f" [{node['Workers Launched']} workers]"
        removed += node.get("Rows Removed by Filter", 0) * node.get("Actual Loops", 1)
        parts.append(part)
        children = node.get("Plans") or []
        if not children:
            break
        node = children[0]
    return " > ".join(parts), removed, cond


def explain(url: str, now: float) -> None:
    rng = random.Random(5)
    sampler = Sampler(rng, now)
    cases = [(kind, sampler.filter(kind), True) for kind in Sampler.KINDS]
    cases += [
        (f"deep, {kind}", sampler.filter(kind, before=sampler.deep_cursor()), False)
        for kind in Sampler.KINDS
    ]
    with psycopg.connect(url) as conn:
        for kind, query, count in cases:
            functions: list[tuple[str, Any]] = [("list ", task_sql.list_tasks)]
            if count:
                functions.append(("count", task_sql.count_by_state))
            for what, fn in functions:
                capture = _Capture()
                fn(PG, capture, query)
                [[plan]] = conn.execute(
                    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + capture.sql, capture.params
                ).fetchone()
                summary, removed, cond = _plan_summary(plan["Plan"])
                shared = plan["Plan"].get("Shared Hit Blocks", 0) + plan["Plan"].get(
                    "Shared Read Blocks", 0
                )
                extra = f", {removed:,.0f} rows filtered out" if removed else ""
                if query.before is not None:
                    extra += (
                        ", cursor in the index condition"
                        if "ROW(" in cond
                        else ", cursor NOT in the index condition"
                    )
                say(
                    f"    {kind:<20} {what} {plan['Execution Time']:9.2f} ms  {summary}  "
                    f"({shared:,} buffers{extra})"
                )


def page_figure(args: argparse.Namespace) -> list[str]:
    """Figure (b); returns what missed its target."""
    say(
        f"(b) the tasks page over {args.tasks:,} tasks: PostgresStore.list_tasks (a page of "
        f"{PAGE}) and count_tasks, {args.queries} random queries per filter"
    )
    settings = {"wal_level": "minimal", "max_wal_senders": "0"}
    with PostgresCluster(fsync=False, settings=settings) as pg:
        url = pg.create_database("bench_tasks_page")
        with psycopg.connect(url) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            buffers = conn.execute("SHOW shared_buffers").fetchone()[0]
        say(
            f"    Postgres {version}, shared_buffers {buffers}, fsync=off and wal_level=minimal "
            f"(for the load); pool {DEFAULTS.db_pool_size}, statement timeout "
            f"{DEFAULTS.db_statement_timeout_ms / 1000:g} s"
        )
        trio.run(migrate, url)
        now = fill_tasks(url, args.tasks, args.chunk)
        timed = time.perf_counter()
        results = trio.run(time_queries, url, now, args)
        say(f"    (timed in {time.perf_counter() - timed:.0f} s)")
        say("    EXPLAIN ANALYZE, one query of each kind:")
        explain(url, now)
    lists = [ms for listed, _ in results.values() for ms in listed]
    counts = [ms for _, counted in results.values() for ms in counted]
    pages = {kind: _percentile(listed, 99) for kind, (listed, _) in results.items()}
    worst = max(pages, key=pages.__getitem__)
    p99 = _percentile(lists, 99)
    ok = p99 <= TARGET_P99_MS
    say(
        f"    list query, all filters: p50 {_percentile(lists, 50):.2f} ms, p99 {p99:.2f} ms "
        f"(worst filter: {worst}, p99 {pages[worst]:.2f} ms)   "
        f"(target p99 <= {TARGET_P99_MS:g} ms: {'PASS' if ok else 'FAIL'})"
    )
    count_p99 = _percentile(counts, 99)
    say(
        f"    count query, all filters: p50 {_percentile(counts, 50):.1f} ms, "
        f"p99 {count_p99:.1f} ms (no target)"
    )
    say(
        f"    GET /api/v1/tasks runs both on its first page: p99 of the two together at most "
        f"{p99 + count_p99:.1f} ms (counts from task_counts, or from the newest 100,000 "
        "matches in an index)"
    )
    return [] if ok else [f"tasks list query p99 {p99:.1f} ms > {TARGET_P99_MS:g} ms"]


def main() -> int:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Drain events/s with the task projection on vs off, same run; "
        "the tasks page's query p50/p99 over many tasks.",
    )
    parser.add_argument("--only", choices=("drain", "page"), help="run one of the two figures")
    parser.add_argument(
        "--drain-tasks", type=int, default=20_000, help="celery tasks in the buffer, 5 events each"
    )
    parser.add_argument(
        "--per-row",
        default="100,1",
        help="events per buffer row (an agent's batch; z4j-bare sends 1), comma-separated",
    )
    parser.add_argument("--agents", type=int, default=4, help="agents sending the events")
    parser.add_argument("--rate", type=float, default=1000.0, help="tasks started per second")
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULTS.drain_workers,
        help="drain workers (Z4J_DRAIN_WORKERS's default)",
    )
    parser.add_argument(
        "--batch-rows",
        type=int,
        default=0,
        help=f"buffer rows per claim; 0: Z4J_DRAIN_BATCH_ROWS's default ({DEFAULTS.drain_batch_rows})",
    )
    parser.add_argument(
        "--batch-bytes",
        type=int,
        default=DEFAULTS.drain_batch_bytes,
        help="payload bytes per claim (Z4J_DRAIN_BATCH_BYTES's default)",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=DEFAULTS.db_pool_size,
        help="Postgres pool size (Z4J_DB_POOL_SIZE's default)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="off/on drain pairs; best counts")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="give up on one drain run after this long"
    )
    parser.add_argument(
        "--no-fsync", action="store_true", help="drain into Postgres with fsync=off"
    )
    parser.add_argument("--tasks", type=int, default=10_000_000, help="tasks in the page's table")
    parser.add_argument("--chunk", type=int, default=1_000_000, help="rows per fill statement")
    parser.add_argument("--queries", type=int, default=200, help="timed queries per filter")
    parser.add_argument(
        "--count-seconds",
        type=float,
        default=10.0,
        help="time count queries of one filter for this long at most (at least 3)",
    )
    args = parser.parse_args()

    started = time.perf_counter()
    tune_interpreter(DEFAULTS)  # as the `z4j brain` process runs
    say(
        f"z4j tasks benchmark: {os.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the start"
    )
    failures: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="z4j-bench-tasks-"))
    try:
        if args.only in (None, "drain"):
            failures += drain_figure(args, root)
        if args.only in (None, "page"):
            failures += page_figure(args)
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

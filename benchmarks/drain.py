"""Drain benchmark: records/s from a buffer file into Postgres, against psql \\copy.

Run ``python benchmarks/drain.py`` (``--help`` for the knobs). It starts a
throwaway Postgres cluster with fsync on (durable commits, as in
production), writes N payloads of 5 records (~3 KB each, ~590 B per record,
with a nested JSON object per record) into a buffer file with
`BufferFile.append`, then for 1 and more drain workers:

- copies that buffer file, opens it as the brain does, and runs the real
  drain path (`z4j.brain.drain.Drainer` + `z4j.store.postgres.PostgresStore`, the
  brain's default batch size, lease and pool size) into a fresh database
  that has the brain's schema; the clock runs from the start of the drains
  until the buffer is empty, and the run counts only if ``events`` then
  holds every record;
- the ceiling, in the same run: ``psql -c "\\copy events_copy (...) FROM
  file (FORMAT csv)"`` of the very same event rows (same received_at, key,
  source, kind, buffer id and JSON body, written out by `z4j.events`) into
  ``events_copy``, a plain (unpartitioned) table made with ``CREATE TABLE
  events_copy (LIKE events INCLUDING ALL)``: same columns and defaults, the
  same unique constraint on (idempotency_key, received_at) and the same
  (kind, received_at) index, in a fresh database. psql is timed as a whole
  command (start, connect, copy, commit). It runs before and after the
  drains; the faster of the two is the ceiling.

The drain does more than psql does: it claims and deletes the rows in the
SQLite buffer (synchronous=FULL) and it is idempotent (COPY into a staging
table, then INSERT ... ON CONFLICT DO NOTHING into the daily partition).
Everything runs on loopback; the cluster and temporary files are removed.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RECORDS_PER_PAYLOAD, CpuMeter, make_payloads

from z4j.buffer import Buffer, BufferFile, ClaimedRow, NewRow
from z4j.config import Config
from z4j.events import event_rows
from z4j.store.postgres import PostgresStore
from z4j.testing.drain import draining
from z4j.testing.postgres import PostgresCluster, find_pg_bin

COLUMNS = "received_at, idempotency_key, source, kind, buffer_id, body"
DEFAULTS = Config()


def make_buffer(path: Path, payloads: int, distinct: int) -> None:
    """A buffer file holding ``payloads`` rows, appended in commits of 1000."""
    bodies = make_payloads(min(distinct, payloads))
    buf = BufferFile(path)
    try:
        now = time.time()
        for start in range(0, payloads, 1000):
            buf.append(
                [
                    NewRow(received_at=now, source="tcp", body=bodies[i % len(bodies)])
                    for i in range(start, min(payloads, start + 1000))
                ]
            )
    finally:
        buf.close()


def copy_buffer(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)  # closed cleanly: no WAL left beside it


def write_csv(buffer_path: Path, csv_path: Path) -> int:
    """The event rows the drain will store, as CSV for psql; returns rows written."""
    db = sqlite3.connect(buffer_path)
    try:
        buffer_id = uuid.UUID(
            db.execute("SELECT value FROM meta WHERE key = 'buffer_id'").fetchone()[0]
        )
        rows = [
            ClaimedRow(id=r[0], received_at=r[1], source=r[2], body=r[3], origin=r[4])
            for r in db.execute(
                "SELECT id, received_at, source, body, origin FROM payloads ORDER BY id"
            )
        ]
    finally:
        db.close()
    count = 0
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        for e in event_rows(buffer_id, rows):
            writer.writerow(
                (
                    e.received_at.isoformat(),
                    str(uuid.UUID(bytes=e.idempotency_key)),
                    e.source,
                    e.kind,
                    str(buffer_id),
                    e.body.decode(),
                )
            )
            count += 1
    return count


async def migrate(url: str) -> None:
    store = PostgresStore.from_url(url, pool_size=1, statement_timeout_ms=0)
    try:
        await store.migrate()
    finally:
        await store.aclose()


def psql_copy(pg: PostgresCluster, name: str, csv_path: Path, expected: int) -> float:
    """Seconds for psql to \\copy the CSV into events_copy in a fresh database."""
    url = pg.create_database(name)
    try:
        trio.run(migrate, url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE events_copy (LIKE events INCLUDING ALL)")
            conn.execute("CHECKPOINT")
        psql = shutil.which("psql") or str(find_pg_bin() / "psql")
        command = [
            psql,
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            f"\\copy events_copy ({COLUMNS}) FROM '{csv_path}' WITH (FORMAT csv)",
        ]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        seconds = time.perf_counter() - started
        with psycopg.connect(url) as conn:
            got = conn.execute("SELECT count(*) FROM events_copy").fetchone()[0]
        if got != expected:
            raise RuntimeError(f"psql copied {got} rows, expected {expected}")
        return seconds
    finally:
        pg.drop_database(name)


async def drain_once(
    buffer_path: Path, url: str, workers: int, args: argparse.Namespace
) -> tuple[float, float]:
    """Drain the whole buffer with ``workers`` drains; (seconds, process CPU share)."""
    buffer = await Buffer.open(buffer_path, max_rows=10**9)
    store = PostgresStore.from_url(
        url, pool_size=args.pool_size, statement_timeout_ms=DEFAULTS.db_statement_timeout_ms
    )
    try:
        await store.migrate()
        cpu = CpuMeter(os.getpid())
        started = time.perf_counter()
        async with draining(
            buffer,
            store,
            batch_rows=args.batch_rows,
            batch_bytes=args.batch_bytes,
            lease_seconds=DEFAULTS.drain_lease_seconds,
            workers=workers,
        ):
            with trio.fail_after(args.timeout):
                while buffer.file.depth > 0:  # noqa: ASYNC110 - polls a counter a thread updates
                    await trio.sleep(0.002)
            seconds = time.perf_counter() - started
            share = cpu.read()
        return seconds, share
    finally:
        await buffer.aclose()
        await store.aclose()


def drain_run(
    pg: PostgresCluster,
    name: str,
    master: Path,
    workdir: Path,
    workers: int,
    expected: int,
    args: argparse.Namespace,
) -> tuple[float, float]:
    url = pg.create_database(name)
    buffer_path = workdir / name / "buffer.sqlite3"
    try:
        copy_buffer(master, buffer_path)
        trio.run(migrate, url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
        seconds, share = trio.run(drain_once, buffer_path, url, workers, args)
        with psycopg.connect(url) as conn:
            got = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        if got != expected:
            raise RuntimeError(f"{workers} drains stored {got} events, expected {expected}")
        return seconds, share
    finally:
        shutil.rmtree(workdir / name, ignore_errors=True)
        pg.drop_database(name)


def main() -> int:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Drain records/s into Postgres for 1 and N workers vs psql \\copy, same run.",
    )
    parser.add_argument(
        "--payloads",
        type=int,
        default=60_000,
        help="buffer rows to drain, 5 records each",
    )
    parser.add_argument(
        "--workers",
        default="1,2,4",
        help="comma-separated drain worker counts to run",
    )
    parser.add_argument(
        "--batch-rows",
        type=int,
        default=DEFAULTS.drain_batch_rows,
        help="payloads per claim (Z4J_DRAIN_BATCH_ROWS's default)",
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
    parser.add_argument(
        "--distinct", type=int, default=2_000, help="distinct payload bodies, cycled"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="give up on one drain run after this long"
    )
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="run Postgres with fsync=off (default: on, durable commits)",
    )
    args = parser.parse_args()
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    records = args.payloads * RECORDS_PER_PAYLOAD

    root = Path(tempfile.mkdtemp(prefix="z4j-bench-drain-"))
    try:
        master = root / "master" / "buffer.sqlite3"
        make_buffer(master, args.payloads, args.distinct)
        csv_path = root / "events.csv"
        rows = write_csv(master, csv_path)
        assert rows == records, (rows, records)
        print(
            f"z4j drain benchmark: {os.cpu_count()} cores, {args.payloads} payloads x "
            f"{RECORDS_PER_PAYLOAD} records = {records} records, "
            f"{csv_path.stat().st_size / records:.0f} B per record as CSV"
        )
        with PostgresCluster(fsync=not args.no_fsync) as pg:
            with psycopg.connect(pg.url) as conn:
                version = conn.execute("SHOW server_version").fetchone()[0]
            print(
                f"Postgres {version}, fsync={'off' if args.no_fsync else 'on'}, loopback; "
                f"drain batch {args.batch_rows} payloads, pool {args.pool_size}, "
                f"lease {DEFAULTS.drain_lease_seconds:g} s"
            )
            ceilings = []
            seconds = psql_copy(pg, "bench_psql_1", csv_path, records)
            ceilings.append(records / seconds)
            print(
                f"    psql \\copy into events_copy (first):  {records / seconds:>9,.0f} records/s"
                f"  ({seconds:.2f} s)",
                flush=True,
            )
            results = {}
            for workers in worker_counts:
                secs, share = drain_run(
                    pg, f"bench_drain_{workers}", master, root, workers, records, args
                )
                results[workers] = records / secs
                print(
                    f"    z4j drain, {workers} worker{'s' if workers > 1 else ' '}:"
                    f"{'':18}{records / secs:>9,.0f} records/s  ({secs:.2f} s, "
                    f"drain process CPU {share:.2f} cores)",
                    flush=True,
                )
            seconds = psql_copy(pg, "bench_psql_2", csv_path, records)
            ceilings.append(records / seconds)
            print(
                f"    psql \\copy into events_copy (second): {records / seconds:>9,.0f} records/s"
                f"  ({seconds:.2f} s)",
                flush=True,
            )
        ceiling = max(ceilings)
        print(f"ceiling (faster psql run): {ceiling:,.0f} records/s")
        failures = []
        for workers, rate in results.items():
            ratio = rate / ceiling
            ok = rate >= 60_000 and ratio >= 0.75
            print(
                f"    {workers} worker{'s' if workers > 1 else ' '}: {rate:>9,.0f} records/s, "
                f"ratio to psql \\copy {ratio:.2f}   "
                f"(targets >= 60,000 and >= 0.75: {'PASS' if ok else 'FAIL'})"
            )
        best = max(results.values()) if results else 0.0
        if best < 60_000:
            failures.append(f"best drain {best:,.0f} < 60,000 records/s")
        if best / ceiling < 0.75:
            failures.append(f"best drain ratio {best / ceiling:.2f} < 0.75")
        for failure in failures:
            print(f"MISSED: {failure}")
        return 1 if failures else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

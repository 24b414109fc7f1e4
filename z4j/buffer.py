"""The durable local buffer: a SQLite WAL file between ingest and the store.

Why it exists: a payload is acknowledged only once it is durable, and the
shared store (Postgres) may be slow or down. The buffer takes every payload
in group commits (many payloads per SQLite transaction, one fsync), and drain
tasks move it on to the store at their own pace.

How it stays correct:

- One row per payload. Row ids come from AUTOINCREMENT, so an id is never
  reused after a delete; together with the buffer's own id (a UUID kept in
  the file) they give every record a stable idempotency key, so a batch that
  reaches the store twice lands once.
- Drains *claim* rows with a lease (token and expiry), write them to the
  store, and only then delete them. A drain that gives up or dies releases
  its claim, or the lease expires and the rows are taken again.
- Leases live in memory, not in the file: the file is locked to one
  process, so after a restart every row is unclaimed anyway. Claiming is
  then a read, on a connection of its own (WAL readers never wait for the
  writer), and ingest's commits never queue behind a drain's claim.
- The depth (rows stored, claimed or not, plus rows admitted but not yet
  committed) is kept in memory and checked before admitting a payload, so a
  full buffer answers at once and nothing stored is ever dropped.
- A payload the store rejects as data (not as an outage) is moved to the
  ``dead_letter`` table of the same file: kept, counted, and out of the
  drain's way. An operator lists, inspects, re-queues (back into
  ``payloads`` under a new id, so the drain takes it like any new row) or
  discards it (z4j/dead_letters.py holds the shapes they see).
- SQLite work runs on worker threads: writes (appends, deletes) one at a
  time on the write connection, claims one at a time on the read one.

One concern justifies the length (past 700 lines): the buffer file, its SQL
and its Trio face, whose counters and locking every part above shares.
"""

from __future__ import annotations

import collections
import fcntl
import functools
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from ._datadir import private_dir, private_file

__all__ = [
    "Buffer",
    "BufferFile",
    "BufferFull",
    "BufferInUse",
    "Claim",
    "ClaimedRow",
    "DeadLetter",
    "NewRow",
]


# The group-commit writer thread: at most this many commits or seconds per
# turn before it lets the drains at the file, and how long it waits for the
# next append before it gives the thread back.
_WRITER_COMMITS_PER_TURN = 64
_WRITER_TURN_SECONDS = 0.05
_WRITER_LINGER_SECONDS = 0.002


class BufferFull(Exception):
    """The buffer holds its maximum number of rows; try again later."""


class BufferInUse(Exception):
    """Another process holds this buffer file."""


@attrs.frozen(kw_only=True)
class NewRow:
    """A payload about to be buffered."""

    received_at: float
    source: str
    body: bytes
    origin: bytes | None = None


@attrs.frozen(kw_only=True)
class ClaimedRow:
    """A buffered payload claimed by a drain."""

    id: int
    received_at: float
    source: str
    body: bytes
    origin: bytes | None


@attrs.frozen(kw_only=True)
class Claim:
    """A drain's lease on a batch of rows, all with ids in ``first..last``."""

    token: str
    rows: tuple[ClaimedRow, ...]
    # It stopped at the row or byte limit (more rows were there to take).
    full: bool = False

    @property
    def first(self) -> int:
        return self.rows[0].id

    @property
    def last(self) -> int:
        return self.rows[-1].id


@attrs.frozen(kw_only=True)
class DeadLetter:
    """A payload set aside in ``dead_letter``: what it was and why the store refused it.

    ``body`` holds at most the bytes asked for (``body_bytes`` is its full
    size), so a listing or an inspection never loads a huge payload whole.
    """

    id: int
    received_at: float
    source: str
    origin: bytes | None
    body: bytes
    body_bytes: int
    error: str
    failed_at: float


_DEAD_LETTER_COUNTERS = ("dead_letters_requeued", "dead_letters_discarded")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letter (
    id          INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    source      TEXT NOT NULL,
    origin      BLOB,
    body        BLOB NOT NULL,
    error       TEXT NOT NULL,
    failed_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS payloads (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    source      TEXT NOT NULL,
    origin      BLOB,
    body        BLOB NOT NULL,
    claim_token TEXT,  -- unused since leases moved to memory; kept for old files
    claim_until REAL
);
"""


@attrs.define
class _Lease:
    first: int
    last: int
    until: float


# Pages of new buffer files. A payload row is ~3 KB: on SQLite's default 4 KiB
# pages each row takes a page of its own, written to the WAL as one frame
# (two writes) per row. 16 KiB pages hold five such rows: a group commit of
# 175 rows went from ~16 to ~9 us per row. Commits of one or two rows write a
# bigger page (10-20 % slower in SQLite alone), yet the NightOwl load of
# benchmarks/ingest.py measured no loss (A/B, three runs each).
_PAGE_SIZE = 16384
# The WAL is checkpointed into the file once it holds this much (SQLite's
# default of 1,000 pages is 4 MiB on 4 KiB pages; bigger checkpoints make
# longer stalls for the commit that runs them).
_WAL_CHECKPOINT_BYTES = 4 * 1024 * 1024

# Rows per INSERT statement in `BufferFile.append` (4 parameters each, far
# under SQLite's parameter limit); one prepared statement per size is cached.
_ROWS_PER_STATEMENT = 64


@functools.lru_cache(maxsize=_ROWS_PER_STATEMENT)
def _insert_sql(rows: int) -> str:
    return "INSERT INTO payloads (received_at, source, origin, body) VALUES " + ", ".join(
        ["(?, ?, ?, ?)"] * rows
    )


def _insert_params(rows: Sequence[NewRow]) -> list[object]:
    params: list[object] = []
    extend = params.extend
    for r in rows:
        extend((r.received_at, r.source, r.origin, r.body))
    return params


class BufferFile:
    """Blocking access to the buffer file. Call only from worker threads.

    Not thread-safe by itself: `Buffer` serialises every call.
    """

    def __init__(self, path: Path) -> None:
        private_dir(path.parent)
        self.path = path
        self._lock_fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise BufferInUse(
                f"buffer file {path} is in use by another process; give each instance "
                "its own Z4J_BUFFER_PATH (or Z4J_DATA_DIR)"
            ) from None
        # Leases (claims) in memory: token -> rows first..last, and ranges
        # once claimed and now free again (released or expired). Claims take
        # ranges back first, then rows past `_cursor`, the last id claimed.
        self._leases: dict[str, _Lease] = {}
        self._free: list[tuple[int, int]] = []
        self._cursor = 0
        self._leases_lock = threading.Lock()  # leases are touched from several threads
        self._claim_lock = threading.Lock()  # one claim at a time
        self._reader: sqlite3.Connection | None = None
        try:
            private_file(path)  # before SQLite creates it: 0600, and its -wal/-shm alike
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            # Takes effect only when the file is created (then fixed by WAL).
            self._db.execute(f"PRAGMA page_size={_PAGE_SIZE}")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
            page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
            self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_CHECKPOINT_BYTES // page_size}")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'buffer_id'").fetchone()
            if row is None:
                self.buffer_id = uuid.uuid4()
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES ('buffer_id', ?)", (str(self.buffer_id),)
                )
            else:
                self.buffer_id = uuid.UUID(row[0])
            # Files from before leases moved to memory may carry stale claims.
            self._db.execute(
                "UPDATE payloads SET claim_token = NULL, claim_until = NULL "
                "WHERE claim_token IS NOT NULL"
            )
            self.depth: int = self._db.execute("SELECT count(*) FROM payloads").fetchone()[0]
            self.dead_letter_rows: int = self.dead_letters()
            self.dead_letter_totals: dict[str, int] = {
                key: int(found[0]) if found else 0
                for key in _DEAD_LETTER_COUNTERS
                for found in [
                    self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
                ]
            }
            self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._reader.execute("PRAGMA query_only=ON")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for name in ("_reader", "_db"):
            db = getattr(self, name, None)
            if db is not None:
                db.close()
                setattr(self, name, None)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = -1

    def append(self, rows: Sequence[NewRow]) -> None:
        """Insert ``rows`` in one transaction, durable (fsynced) when this returns.

        Up to `_ROWS_PER_STATEMENT` rows go in one multi-row INSERT, which is
        a transaction by itself; more go in such statements inside BEGIN
        IMMEDIATE ... COMMIT. Few statements per commit means few round trips
        through the GIL for the writer thread, which the Trio thread feels.
        """
        db = self._db
        if len(rows) <= _ROWS_PER_STATEMENT:
            db.execute(_insert_sql(len(rows)), _insert_params(rows))
        else:
            db.execute("BEGIN IMMEDIATE")
            try:
                for start in range(0, len(rows), _ROWS_PER_STATEMENT):
                    chunk = rows[start : start + _ROWS_PER_STATEMENT]
                    db.execute(_insert_sql(len(chunk)), _insert_params(chunk))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        self.depth += len(rows)

    def claim(self, limit: int, lease_seconds: float, max_bytes: int | None = None) -> Claim | None:
        """Lease up to ``limit`` unclaimed rows, oldest first, and no more rows
        than fit ``max_bytes`` of bodies (at least one); a freed range is taken
        whole (it was bounded when first claimed).

        The byte bound is what keeps a claim's memory and its store transaction
        in bounds whatever the payloads' size: 2,000 agent batches of 100
        events are 200,000 events, 2,000 ingest frames of 10 MiB are 20 GiB.

        Reads only, on the read connection: safe beside a running append.
        """
        assert self._reader is not None
        with self._claim_lock:
            now = time.time()
            with self._leases_lock:
                for token, lease in list(self._leases.items()):
                    if lease.until < now:
                        del self._leases[token]
                        self._free.append((lease.first, lease.last))
                self._free.sort()
                freed = self._free.pop(0) if self._free else None
                cursor = self._cursor
            rows = []
            if freed is not None:
                rows = self._reader.execute(
                    "SELECT id, received_at, source, body, origin FROM payloads"
                    " WHERE id BETWEEN ? AND ? ORDER BY id",
                    freed,
                ).fetchall()
            full = bool(rows)  # a range taken back: more may wait behind it
            if not rows:  # no range to take back (or its rows are gone): new rows
                found = self._reader.execute(
                    "SELECT id, received_at, source, body, origin FROM payloads"
                    " WHERE id > ? ORDER BY id LIMIT ?",
                    (cursor, limit),
                )
                size = 0
                for row in found:
                    size += len(row[3])
                    if rows and max_bytes is not None and size > max_bytes:
                        full = True
                        break
                    rows.append(row)
                found.close()
                full = full or len(rows) == limit
            if not rows:
                return None
            token = uuid.uuid4().hex
            with self._leases_lock:
                self._leases[token] = _Lease(rows[0][0], rows[-1][0], now + lease_seconds)
                self._cursor = max(self._cursor, rows[-1][0])
        return Claim(
            token=token,
            rows=tuple(
                ClaimedRow(id=r[0], received_at=r[1], source=r[2], body=r[3], origin=r[4])
                for r in rows
            ),
            full=full,
        )

    def _take(self, claim: Claim) -> bool:
        """End ``claim``'s lease; False if its rows moved on to another claim.

        A lease that expired but whose rows nobody took yet still counts.
        """
        with self._leases_lock:
            if self._leases.pop(claim.token, None) is not None:
                return True
            span = (claim.first, claim.last)
            if span in self._free:
                self._free.remove(span)
                return True
            return False

    def complete(self, claim: Claim) -> int:
        """Delete a claim's rows once the store holds them; returns rows deleted.

        Rows whose lease expired and were claimed again by another drain are
        left to that drain.
        """
        if not self._take(claim):
            return 0
        try:
            cur = self._db.execute(
                "DELETE FROM payloads WHERE id BETWEEN ? AND ?", (claim.first, claim.last)
            )
        except BaseException:
            self._give_back(claim)
            raise
        self.depth -= cur.rowcount
        return cur.rowcount

    def _give_back(self, claim: Claim) -> None:
        with self._leases_lock:
            self._free.append((claim.first, claim.last))

    def quarantine(self, claim: Claim, row_id: int, error: str) -> int:
        """Move one claimed row the store cannot take to ``dead_letter``.

        The payload is kept (for an operator to inspect, fix and re-send),
        and stops blocking the drain. Returns rows moved (0 or 1).
        """
        with self._leases_lock:
            if claim.token not in self._leases:
                return 0  # the lease expired: the row is someone else's now
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT INTO dead_letter (id, received_at, source, origin, body, error, failed_at)"
                " SELECT id, received_at, source, origin, body, ?, ? FROM payloads WHERE id = ?",
                (error, time.time(), row_id),
            )
            moved = db.execute("DELETE FROM payloads WHERE id = ?", (row_id,)).rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.depth -= moved
        self.dead_letter_rows += moved
        return moved

    def dead_letters(self, projects: frozenset[uuid.UUID] | None = None) -> int:
        """How many dead letters there are (of ``projects`` only, unless None)."""
        where, params = _of_projects(projects)
        sql = f"SELECT count(*) FROM dead_letter{' WHERE ' + where if where else ''}"
        return int(self._db.execute(sql, params).fetchone()[0])

    def dead_letter_page(
        self,
        *,
        before: int | None,
        limit: int,
        body_bytes: int,
        projects: frozenset[uuid.UUID] | None = None,
    ) -> list[DeadLetter]:
        """Dead letters newest first, ids below ``before`` (keyset), bodies cut
        to ``body_bytes``; of ``projects`` only, unless None."""
        terms: list[str] = []
        params: list[Any] = []
        if before is not None:
            terms.append("id < ?")
            params.append(before)
        of_projects, values = _of_projects(projects)
        if of_projects:
            terms.append(of_projects)
            params += values
        where = f"WHERE {' AND '.join(terms)}" if terms else ""
        rows = self._db.execute(
            "SELECT id, received_at, source, origin, substr(body, 1, ?), length(body), error,"
            f" failed_at FROM dead_letter {where} ORDER BY id DESC LIMIT ?",
            (body_bytes, *params, limit),
        ).fetchall()
        return [_dead_letter(row) for row in rows]

    def dead_letter_projects(self, row_ids: Sequence[int]) -> dict[int, uuid.UUID | None]:
        """The project of each of ``row_ids`` that is a dead letter (None: an
        ingest payload, which has none)."""
        found: dict[int, uuid.UUID | None] = {}
        for row_id in dict.fromkeys(row_ids):
            row = self._db.execute(
                f"SELECT {_ORIGIN_PROJECT} FROM dead_letter WHERE id = ?", (row_id,)
            ).fetchone()
            if row is not None:
                found[row_id] = _project_id(row[0])
        return found

    def dead_letter(self, row_id: int, *, body_bytes: int) -> DeadLetter | None:
        row = self._db.execute(
            "SELECT id, received_at, source, origin, substr(body, 1, ?), length(body), error,"
            " failed_at FROM dead_letter WHERE id = ?",
            (body_bytes, row_id),
        ).fetchone()
        return None if row is None else _dead_letter(row)

    def requeue(self, row_ids: Sequence[int], max_rows: int | None = None) -> dict[int, int]:
        """Move dead letters back into ``payloads``, each under a new row id.

        A new id, not the old one: the claim cursor has passed the old id,
        and a drain's lease covers a whole id range, so an old id could be
        skipped or deleted unstored inside a neighbour's claim. The new id
        changes a TCP record's idempotency key, which is safe: a row is set
        aside only after the store refused it alone, so none of it landed.
        Returns {old id: new id} for the rows found; with ``max_rows``,
        `BufferFull` if they would take the buffer past it.
        """
        db = self._db
        moved: dict[int, int] = {}
        db.execute("BEGIN IMMEDIATE")
        try:
            for row_id in dict.fromkeys(row_ids):
                row = db.execute(
                    "SELECT received_at, source, origin, body FROM dead_letter WHERE id = ?",
                    (row_id,),
                ).fetchone()
                if row is None:
                    continue
                if max_rows is not None and self.depth + len(moved) + 1 > max_rows:
                    raise BufferFull(f"the buffer holds {self.depth} of {max_rows} rows")
                cur = db.execute(
                    "INSERT INTO payloads (received_at, source, origin, body) VALUES (?, ?, ?, ?)",
                    row,
                )
                assert cur.lastrowid is not None
                moved[row_id] = cur.lastrowid
                db.execute("DELETE FROM dead_letter WHERE id = ?", (row_id,))
            self._add_to_counter(db, "dead_letters_requeued", len(moved))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.depth += len(moved)
        self.dead_letter_rows -= len(moved)
        self.dead_letter_totals["dead_letters_requeued"] += len(moved)
        return moved

    def discard(self, row_ids: Sequence[int]) -> list[int]:
        """Delete dead letters for good; returns the ids that were there."""
        db = self._db
        gone: list[int] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for row_id in dict.fromkeys(row_ids):
                if db.execute("DELETE FROM dead_letter WHERE id = ?", (row_id,)).rowcount:
                    gone.append(row_id)
            self._add_to_counter(db, "dead_letters_discarded", len(gone))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.dead_letter_rows -= len(gone)
        self.dead_letter_totals["dead_letters_discarded"] += len(gone)
        return gone

    @staticmethod
    def _add_to_counter(db: sqlite3.Connection, key: str, n: int) -> None:
        """Durable totals in ``meta``: the CLI's re-queues and discards count too."""
        if n:
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key)"
                " DO UPDATE SET value = CAST(value AS INTEGER) + excluded.value",
                (key, str(n)),
            )

    def release(self, claim: Claim) -> None:
        """Give a claim's rows back without storing them (store failure, shutdown)."""
        if self._take(claim):
            self._give_back(claim)

    def extend(self, claim: Claim, lease_seconds: float) -> None:
        with self._leases_lock:
            lease = self._leases.get(claim.token)
            if lease is not None:
                lease.until = time.time() + lease_seconds

    def count(self) -> int:
        """Rows in the file, counted by SQLite (for tests and checks)."""
        return int(self._db.execute("SELECT count(*) FROM payloads").fetchone()[0])


# A dead letter's project: its origin's (agent payloads), NULL for ingest payloads.
_ORIGIN_PROJECT = (
    "CASE WHEN json_valid(CAST(origin AS TEXT))"
    " THEN json_extract(CAST(origin AS TEXT), '$.project_id') END"
)


def _of_projects(projects: frozenset[uuid.UUID] | None) -> tuple[str, list[str]]:
    """A condition on dead letters: of one of ``projects`` ("" for None)."""
    if projects is None:
        return "", []
    if not projects:
        return "0", []
    ids = sorted(str(p) for p in projects)
    return f"{_ORIGIN_PROJECT} IN ({', '.join('?' * len(ids))})", ids


def _project_id(text: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _dead_letter(row: Any) -> DeadLetter:
    row_id, received_at, source, origin, body, size, error, failed_at = row
    return DeadLetter(
        id=row_id,
        received_at=received_at,
        source=source,
        origin=origin,
        body=bytes(body or b""),
        body_bytes=size or 0,
        error=error,
        failed_at=failed_at,
    )


@attrs.frozen(kw_only=True)
class BufferStatistics:
    """A snapshot of the buffer, for metrics, health and the heartbeat."""

    depth: int
    reserved: int
    max_rows: int
    appended_total: int
    commits_total: int
    completed_total: int
    dead_letter_rows: int = 0
    dead_letters_requeued: int = 0
    dead_letters_discarded: int = 0

    @property
    def utilisation(self) -> float:
        return (self.depth + self.reserved) / self.max_rows


@attrs.define
class _AppendRequest:
    rows: Sequence[NewRow]
    done: trio.Event = attrs.field(factory=trio.Event)
    error: BaseException | None = None


class Buffer:
    """The Trio face of the buffer: admission, group commit, claims.

    Ingest connections call `admit` (cheap, synchronous: is there room?) and
    then `append` (waits until the rows are durable). `run_writer` is the
    one task that commits: it takes every append waiting at that moment into
    one transaction, so more concurrent clients mean bigger, cheaper commits.
    """

    def __init__(self, file: BufferFile, *, max_rows: int) -> None:
        self.file = file
        self.max_rows = max_rows
        self.buffer_id = file.buffer_id
        self._reserved = 0
        self._limiter = trio.CapacityLimiter(1)  # the write connection
        self._read_limiter = trio.CapacityLimiter(1)  # the read connection (claims)
        # Appends wait here for the writer thread, which pops them (a deque's
        # append and popleft are safe across threads); `_more` wakes the
        # thread when it lingers, `_work` the writer task when no turn runs.
        self._queue: collections.deque[_AppendRequest] = collections.deque()
        self._more = threading.Event()
        self._work = trio.Event()
        self._turn_running = False
        self._closed = False
        self._rows_arrived = trio.lowlevel.ParkingLot()
        self._appended_total = 0
        self._commits_total = 0
        self._completed_total = 0

    @classmethod
    async def open(cls, path: Path, *, max_rows: int) -> Buffer:
        file = await trio.to_thread.run_sync(BufferFile, path)
        return cls(file, max_rows=max_rows)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._run(self.file.close)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- ingest side -----------------------------------------------------------

    def admit(self, rows: int) -> bool:
        """Reserve room for ``rows``; False when the buffer is full."""
        if self.file.depth + self._reserved + rows > self.max_rows:
            return False
        self._reserved += rows
        return True

    async def append(self, rows: Sequence[NewRow]) -> None:
        """Wait until admitted ``rows`` are durable; raises if the commit failed.

        No task hop on the way: the request goes straight to the writer
        thread's queue (this runs once per payload or agent batch group).
        """
        if self._closed:
            raise trio.ClosedResourceError("the buffer writer is closed")
        request = _AppendRequest(rows)
        self._queue.append(request)
        self._more.set()
        if not self._turn_running:
            self._work.set()
        await request.done.wait()
        if request.error is not None:
            raise request.error

    async def run_writer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Commit appends in groups until `close_writer` (then what is queued) or cancel.

        The commits run on one worker thread that stays for a while (one
        thread hop per many commits, not one per commit): it takes every
        append queued at that moment into one transaction, hands the result
        back to the loop, and goes straight on with what queued meanwhile.
        It lets go of the file between turns so drains get their claims in.
        """
        token = trio.lowlevel.current_trio_token()
        task_status.started()
        while True:
            if not self._queue:
                if self._closed:
                    return
                await self._work.wait()
                self._work = trio.Event()
                continue
            self._turn_running = True
            try:
                await self._run(self._commit_queued, token)
            finally:
                self._turn_running = False

    def _commit_queued(self, token: trio.lowlevel.TrioToken) -> None:
        """Writer thread: commit what is queued, in groups, for one turn."""
        queue, more = self._queue, self._more
        started = time.monotonic()
        for _ in range(_WRITER_COMMITS_PER_TURN):
            if not queue:
                # Linger a moment for the next append rather than pay for a
                # new thread hop; never while holding rows.
                more.clear()
                if not queue and not more.wait(_WRITER_LINGER_SECONDS):
                    return
            batch: list[_AppendRequest] = []
            while queue:
                batch.append(queue.popleft())
            rows = [row for request in batch for row in request.rows]
            error: BaseException | None = None
            try:
                self.file.append(rows)
            except Exception as exc:  # storage failure: every waiter gets 5:ERROR
                error = exc
            token.run_sync_soon(self._committed, batch, len(rows), error)
            if time.monotonic() - started > _WRITER_TURN_SECONDS:
                return

    def _committed(
        self, batch: list[_AppendRequest], rows: int, error: BaseException | None
    ) -> None:
        """On the loop: wake the appenders of one commit."""
        self._reserved -= rows
        if error is None:
            self._appended_total += rows
            self._commits_total += 1
            self._rows_arrived.unpark_all()
        for request in batch:
            request.error = error
            request.done.set()

    async def serve_writer(
        self, *, shutdown: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The writer as a service: once ``shutdown`` is set, commit what is
        queued and return (appends after that are refused)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run_writer)
            task_status.started()
            await shutdown.wait()
            self.close_writer()

    def close_writer(self) -> None:
        """No more appends: the writer finishes what is queued, then returns."""
        self._closed = True
        self._work.set()

    # -- drain side --------------------------------------------------------------

    async def claim(
        self, limit: int, lease_seconds: float, max_bytes: int | None = None
    ) -> Claim | None:
        result: Claim | None = await trio.to_thread.run_sync(
            self.file.claim, limit, lease_seconds, max_bytes, limiter=self._read_limiter
        )
        return result

    async def complete(self, claim: Claim) -> None:
        deleted: int = await self._run(self.file.complete, claim)
        self._completed_total += deleted

    async def release(self, claim: Claim) -> None:
        self.file.release(claim)  # leases are in memory: nothing to wait for
        await trio.lowlevel.checkpoint()

    async def quarantine(self, claim: Claim, row_id: int, error: str) -> None:
        await self._run(self.file.quarantine, claim, row_id, error)

    # -- dead letters (an operator's) -------------------------------------------

    async def dead_letter_page(
        self,
        *,
        before: int | None,
        limit: int,
        body_bytes: int,
        projects: frozenset[uuid.UUID] | None = None,
    ) -> list[DeadLetter]:
        fn = functools.partial(
            self.file.dead_letter_page,
            before=before,
            limit=limit,
            body_bytes=body_bytes,
            projects=projects,
        )
        result: list[DeadLetter] = await self._run(fn)
        return result

    async def dead_letter_count(self, projects: frozenset[uuid.UUID]) -> int:
        """Dead letters of ``projects`` (the total is in `statistics`)."""
        result: int = await self._run(self.file.dead_letters, projects)
        return result

    async def dead_letter_projects(self, row_ids: Sequence[int]) -> dict[int, uuid.UUID | None]:
        result: dict[int, uuid.UUID | None] = await self._run(
            self.file.dead_letter_projects, row_ids
        )
        return result

    async def dead_letter(self, row_id: int, *, body_bytes: int) -> DeadLetter | None:
        fn = functools.partial(self.file.dead_letter, row_id, body_bytes=body_bytes)
        result: DeadLetter | None = await self._run(fn)
        return result

    async def requeue(self, row_ids: Sequence[int]) -> dict[int, int]:
        """Back into the drain's way ({old id: new id}); `BufferFull` when no room."""
        moved: dict[int, int] = await self._run(
            self.file.requeue, row_ids, self.max_rows - self._reserved
        )
        if moved:
            self._rows_arrived.unpark_all()  # idle drains look now
        return moved

    async def discard(self, row_ids: Sequence[int]) -> list[int]:
        gone: list[int] = await self._run(self.file.discard, row_ids)
        return gone

    async def extend(self, claim: Claim, lease_seconds: float) -> None:
        self.file.extend(claim, lease_seconds)
        await trio.lowlevel.checkpoint()

    async def wait_for_rows(self, at_most: float) -> None:
        """Return when new rows were committed, or after ``at_most`` seconds."""
        with trio.move_on_after(at_most):
            await self._rows_arrived.park()

    # -- observation --------------------------------------------------------------

    def health_checks(self) -> dict[str, Callable[[], Awaitable[str | None]]]:
        """For /health/ready: a full buffer refuses ingest."""

        async def buffer_check() -> str | None:
            if self.full:
                stats = self.statistics()
                return f"buffer full ({stats.depth} of {stats.max_rows} rows)"
            return None

        return {"buffer": buffer_check}

    def statistics(self) -> BufferStatistics:
        return BufferStatistics(
            depth=self.file.depth,
            reserved=self._reserved,
            max_rows=self.max_rows,
            appended_total=self._appended_total,
            commits_total=self._commits_total,
            completed_total=self._completed_total,
            dead_letter_rows=self.file.dead_letter_rows,
            dead_letters_requeued=self.file.dead_letter_totals["dead_letters_requeued"],
            dead_letters_discarded=self.file.dead_letter_totals["dead_letters_discarded"],
        )

    @property
    def full(self) -> bool:
        return self.file.depth + self._reserved >= self.max_rows

"""OpAMP agents' state in the store: what both transports do with a message.

One concern, one module: the path of an OpAMP message from bytes to the
store and back, with the write and read economies that path needs (they
only make sense together).

The HTTP adapter (`z4j.brain.http.opamp`) and the WebSocket one
(`z4j.brain.http.opamp_ws`) differ in how bytes arrive and replies leave;
everything between is here, over the sans-IO core (`z4j.protocol.opamp`):
the token's project, decoding (heavy bodies off the loop, in turns), the
stored state and desired configuration (one store call), `receive`, what to
write, and the configuration's status.

Writes scale with changes. When `receive` reports a change (or the agent is
new) the whole row is written at once. When nothing changed but the
sequence number, the row is not written at once: the agent's number is
remembered here (`_Skipped`, so its next message on this replica is in
sequence) and ``last_seen`` with it is queued (`_Touches`); `serve` writes
the queue in one statement every `FLUSH_SECONDS`. An HTTP poll's number is
always queued: the next poll may land on another replica, which reads it
from the store (so polls alternating between replicas stay in sequence,
unless they come faster than a flush); on a store with one brain
(SQLite), none does, and HTTP polls are queued as WebSocket ones are. A WebSocket session keeps its own
number, so its agent's row is queued at most once per a third of
Z4J_OPAMP_HEARTBEAT_WINDOW_SECONDS, message or not (`keep_alive`: the
connection is the sign of life, whatever the agent's heartbeat interval).
So 10,000 agents heartbeating cost one write statement a second, not
thousands, and ``online`` is never late by more than a third of the window
plus a flush. A replica that reads a stale number (after a restart, or a
reconnection elsewhere) sees a gap and asks for the full state once (the
cost the core's docstring names). So does the first message this process
gets from each agent: while no replica answered, the agent may have
dropped a report it could not send, and a later compressed one would hide
that for good.

Heavy work does not hold up other clients (tests/test_abuse_opamp.py): a
body over `HEAVY_BYTES` (or gzipped) is inflated on a worker thread, its
fields counted a slice at a time on the loop (a crowded message is refused
before protobuf's parser, which holds the GIL, ever sees it), and a
message or stored state over it is folded on a worker thread. Heavy
messages take turns, one at a time over all agents and both transports:
what protobuf does with megabytes holds the GIL in C for milliseconds at a
time, and two or three of those at once add up to a stall.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, NamedTuple

import attrs
import trio
import trio.lowlevel

from .. import keys
from ..protocol.opamp import (
    STATUS_PARTS,
    Change,
    FieldCount,
    OpampDecodeError,
    Outcome,
    Transport,
    bad_request,
    decode_agent_to_server,
    payload,
    receive,
)
from ..protocol.opamp import opamp_pb2 as pb
from ..protocol.opamp.remote_config import ConfigFile, ConfigProgress, RemoteConfig, progress
from ..protocol.opamp.state import AgentState
from ..stats import BrainStats, ThrottledLog
from ..store import opamp as stored
from ..store.base import OpampAgent, OpampConfig, Store, StoreUnavailable
from ..store.opamp_history import HISTORY_CHANGES
from .lifetime import until

__all__ = ["FLUSH_SECONDS", "HEAVY_BYTES", "Applied", "OpampFleet", "message_type"]

log = logging.getLogger("z4j.opamp")

SKIPPED_MAX: Final = 100_000  # agents whose skipped sequence number one replica remembers
HEAVY_BYTES: Final = 64 * 1024  # past this, decoding and folding run on a worker thread
HEAVY_WORKERS: Final = 1  # worker threads doing heavy OpAMP work at once, in all
COUNT_SLICE: Final = 1_000  # fields counted between two looks at the event loop
CONFIG_CACHE_BYTES: Final = 16 * 1024 * 1024  # desired configurations kept built, by hash
FLUSH_SECONDS: Final = 1.0  # queued last_seen writes go out together this often
TOUCHES_MAX: Final = 200_000  # queued last_seen writes; past it, a flush is due at once
GROUP_MAX: Final = 1_000  # agents' writes in one transaction at most
TOKEN_SECONDS: Final = 1.0  # a token's project is read again from the store this often
TOKENS_MAX: Final = 10_000  # tokens whose project one process remembers
# Changes a row patch writes (store/opamp.py `AgentPatch`): a known agent's
# acknowledgement moves nothing the API summarises but the status.
_PATCHED: Final = frozenset({Change.REMOTE_CONFIG_STATUS, Change.FULL_STATE_REQUESTS})


def message_type(message: pb.AgentToServer) -> str:
    """The metric label of a message: disconnect, status (carries a part) or heartbeat."""
    if message.HasField("agent_disconnect"):
        return "disconnect"
    if any(message.HasField(part.value) for part in STATUS_PARTS):
        return "status"
    return "heartbeat"


@attrs.frozen
class Applied:
    """One message applied: the reply, the agent's state after it, and the
    hash of the configuration the reply offers (None: it offers none)."""

    reply: pb.ServerToAgent
    state: AgentState
    config_offered: bytes | None


_Key = tuple[uuid.UUID, str]  # (project, instance_uid hex), as rows name an agent


class _Skipped:
    """The sequence numbers this replica answered but did not write yet, per agent.

    Each is kept with the time of its message, and used only while the
    stored row is no newer (a row written after it, by another replica,
    wins; our own queued ``last_seen``, flushed, is never newer). Bounded:
    the oldest entry goes first, which costs that agent one full report.
    """

    def __init__(self, limit: int = SKIPPED_MAX) -> None:
        self._limit = limit
        self._entries: OrderedDict[_Key, tuple[float, int]] = OrderedDict()

    def sequence(self, project_id: uuid.UUID, uid: bytes, last_seen: float) -> int | None:
        """The number skipped since the row seen at ``last_seen`` was written, if any."""
        entry = self._entries.get((project_id, uid.hex()))
        return entry[1] if entry is not None and last_seen <= entry[0] else None

    def remember(self, project_id: uuid.UUID, uid: bytes, sequence_num: int, at: float) -> None:
        key = (project_id, uid.hex())
        self._entries.pop(key, None)
        self._entries[key] = (at, sequence_num)
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)

    def forget(self, project_id: uuid.UUID, instance_uid: bytes) -> None:
        self._entries.pop((project_id, instance_uid.hex()), None)


class _Known(NamedTuple):
    """What answering an agent's next message needs of its stored row (the
    state as the core sees it, and a few columns), and its configuration."""

    state: AgentState
    first_seen: float
    last_seen: float
    disconnected_at: float | None
    config: OpampConfig | None
    generation: int  # `OpampNudges.generation` when the configuration was read


def _known(row: OpampAgent | None, config: OpampConfig | None, generation: int) -> _Known | None:
    if row is None:
        return None
    return _Known(
        stored.state_of(row),
        row.first_seen,
        row.last_seen,
        row.disconnected_at,
        _slim(config),
        generation,
    )


def _slim(config: OpampConfig | None) -> OpampConfig | None:
    """Without its files: they are built once per hash in the fleet (`_desired`)."""
    if config is not None and config.files:
        return attrs.evolve(config, files={})
    return config


def _state_bytes(state: AgentState) -> int:
    return sum(len(state.part(part) or b"") for part in STATUS_PARTS)


class _Rows:
    """What a sole writer last wrote or read of each agent (`_Known`), used
    while the configuration generation has not moved (see `OpampFleet`).
    Each holds the state object the agent's session holds too, so it costs
    little beyond the index. Bounded: the oldest goes first, and costs a
    store read."""

    def __init__(self, limit: int = SKIPPED_MAX) -> None:
        self._limit = limit
        self._entries: OrderedDict[tuple[uuid.UUID, bytes], _Known] = OrderedDict()

    def get(self, project_id: uuid.UUID, uid: bytes, generation: int) -> _Known | None:
        entry = self._entries.get((project_id, uid))
        if entry is None or entry.generation != generation:
            return None
        return entry

    def put(self, project_id: uuid.UUID, known: _Known) -> None:
        key = (project_id, known.state.instance_uid)
        self._entries.pop(key, None)
        self._entries[key] = known
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)

    def drop(self, project_id: uuid.UUID, uid: bytes) -> None:
        self._entries.pop((project_id, uid), None)

    def clear(self) -> None:
        self._entries.clear()

    def refresh(
        self, project_id: uuid.UUID, uid: bytes, config: OpampConfig | None, generation: int
    ) -> None:
        """An agent's configuration, read afresh under ``generation``."""
        entry = self._entries.get((project_id, uid))
        if entry is not None:
            self._entries[project_id, uid] = entry._replace(config=config, generation=generation)


class _Batch:
    __slots__ = ("done", "error", "writes")

    def __init__(self) -> None:
        self.writes: list[stored.StateWrite] = []
        self.done = trio.Event()
        self.error: BaseException | None = None


class _GroupCommit:
    """Agents' writes from concurrent messages, committed together.

    Each message's writes (its row, its configuration's status) join the
    batch being gathered and wait for its commit; the writer commits what
    gathered while the previous commit ran, in one transaction. A burst of
    10,000 acknowledgements costs tens of commits (fsyncs), not 20,000.
    Without the writer running (a fleet used without `OpampFleet.serve`),
    each write commits alone.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._batch = _Batch()
        self._ready = trio.Event()
        self.running = False

    async def write(self, write: stored.StateWrite) -> None:
        if not self.running:
            await self._store.write_opamp_states([write])
            return
        batch = self._batch
        batch.writes.append(write)
        self._ready.set()
        await batch.done.wait()
        if batch.error is not None:
            raise StoreUnavailable(f"writing OpAMP state failed: {batch.error}") from batch.error

    async def serve_forever(self) -> None:
        self.running = True
        try:
            while True:
                await self._ready.wait()
                batch, self._batch = self._batch, _Batch()
                self._ready = trio.Event()
                try:
                    for start in range(0, len(batch.writes), GROUP_MAX):
                        await self._store.write_opamp_states(
                            batch.writes[start : start + GROUP_MAX]
                        )
                except Exception as exc:
                    if not isinstance(exc, StoreUnavailable):
                        log.exception("writing OpAMP state failed")
                    batch.error = exc
                batch.done.set()
        finally:
            self.running = False
            if self._batch.writes:
                self._batch.error = StoreUnavailable("the OpAMP writer stopped")
            self._batch.done.set()


class _Touches:
    """``last_seen`` writes waiting for the next flush, one per agent (the newest)."""

    def __init__(self) -> None:
        self.pending: dict[tuple[uuid.UUID, bytes], tuple[int, float]] = {}
        self.full = trio.Event()

    def add(self, project_id: uuid.UUID, uid: bytes, sequence_num: int, now: float) -> None:
        self.pending[project_id, uid] = (sequence_num, now)
        if len(self.pending) >= TOUCHES_MAX:
            self.full.set()

    def drop(self, project_id: uuid.UUID, uid: bytes) -> None:
        """A whole row was just written: it carries a newer ``last_seen``."""
        self.pending.pop((project_id, uid), None)

    def take(self) -> list[tuple[uuid.UUID, bytes, int, float]]:
        pending, self.pending = self.pending, {}
        self.full = trio.Event()
        return [(project, uid, seq, now) for (project, uid), (seq, now) in pending.items()]


class OpampFleet:
    """The OpAMP agents of this brain, as both transports see them (module docstring)."""

    def __init__(
        self,
        store: Store,
        master_secret: bytes,
        stats: BrainStats,
        *,
        max_message_bytes: int,
        heartbeat_window_seconds: float,
        flush_seconds: float = FLUSH_SECONDS,
        on_change: Callable[[uuid.UUID, str, str], None] | None = None,
        sole_writer: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``on_change(project_id, instance_uid_hex, what)``: told after each
        write that changes what the API shows of an agent (``state``: its
        row; ``config``: its configuration's status), not per poll; the
        dashboard's live feed (None: no one to tell).

        ``sole_writer``: given when no other process writes OpAMP state to
        this store (SQLite: one brain per data directory), it returns a
        number that moves whenever a configuration is written in this
        process (`OpampNudges.generation`). Messages are then answered from
        what this fleet wrote or read last of each agent (`_Rows`), reading
        the store again when that number moved, and forgetting it all when
        another connection wrote to the store (checked each flush: a write
        made behind the brain's back is seen within a second).
        """
        self._store = store
        self._sole_writer = sole_writer
        self._rows = _Rows()
        self._writes = _GroupCommit(store)
        self._on_change = on_change
        self._master = master_secret
        self._stats = stats
        self.limit = max_message_bytes
        self._touch_seconds = heartbeat_window_seconds / 3
        self._flush_seconds = flush_seconds
        self._clock = clock
        self._skipped = _Skipped()
        self._tokens: dict[bytes, tuple[uuid.UUID, float]] = {}
        # Agents heard by this process: the first message from any other is
        # not vouched for (`receive`), so it is asked for a full report once.
        self._heard_here: OrderedDict[tuple[uuid.UUID, bytes], None] = OrderedDict()
        self._touches = _Touches()
        self._seen: dict[tuple[uuid.UUID, bytes], float] = {}  # last touch queued, per agent
        self._window = heartbeat_window_seconds
        self._http_heard: OrderedDict[tuple[uuid.UUID, bytes], float] = OrderedDict()
        self._heavy = trio.CapacityLimiter(HEAVY_WORKERS)
        self.heavy_turn = trio.Lock()  # heavy messages, one at a time (module docstring)
        self._log = ThrottledLog(log)
        self._configs: OrderedDict[str, RemoteConfig] = OrderedDict()
        self._config_bytes = 0

    # -- the flush task ---------------------------------------------------------------

    async def serve(
        self, *, shutdown: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Write queued ``last_seen`` every `FLUSH_SECONDS` until ``shutdown``, then once more."""
        async with until(shutdown) as nursery:
            task_status.started()
            nursery.start_soon(self._flush_forever)
            nursery.start_soon(self._writes.serve_forever)
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await self.flush()

    async def _flush_forever(self) -> None:
        seen_version = None
        while True:
            with trio.move_on_after(self._flush_seconds):
                await self._touches.full.wait()
            await self.flush()
            if self._sole_writer is not None:
                # Another connection wrote to the store behind this brain (a
                # tool, a restore): forget what was kept, read afresh.
                try:
                    version = await self._store.data_version()
                except StoreUnavailable:
                    continue
                if seen_version is not None and version != seen_version:
                    self._rows.clear()
                seen_version = version

    async def flush(self) -> None:
        """Write the queued ``last_seen`` now (a failed write is logged and
        dropped: the agent's next messages queue it again)."""
        touches = self._touches.take()
        if not touches:
            return
        try:
            await self._store.touch_opamp_agents(touches)
        except Exception as exc:
            self._log.warning("touch", "writing OpAMP last_seen failed: %s", exc)
            return
        self._stats.opamp_writes["last_seen"] += 1
        self._stats.opamp_writes["last_seen_rows"] += len(touches)

    # -- what a transport asks ----------------------------------------------------------

    async def project_of(self, token: str | None) -> uuid.UUID | None:
        """The project whose OpAMP token this is (None: no such token).

        A known token's project is kept for `TOKEN_SECONDS` (thousands of
        agents poll with one token: one store read a second, not one per
        poll), so a revoked token stops working within that time on every
        replica. An unknown token is never kept: each try reads the store,
        and a token made a moment ago works at once.
        """
        if token is None:
            return None
        return await self.project_of_digest(self.token_digest(token))

    def token_digest(self, token: str) -> bytes:
        """How the store names a token (its keyed hash)."""
        return keys.opamp_token_hash(self._master, token)

    async def project_of_digest(self, digest: bytes) -> uuid.UUID | None:
        """`project_of`, given the token's `token_digest`."""
        now = trio.current_time()
        known = self._tokens.get(digest)
        if known is not None:
            if now - known[1] < TOKEN_SECONDS:
                return known[0]
            # One request reads it again; the others meanwhile go on as before.
            self._tokens[digest] = (known[0], now)
        project = await self._store.opamp_token_project(digest)
        if project is None:
            self._tokens.pop(digest, None)
            return None
        if len(self._tokens) >= TOKENS_MAX:
            self._tokens.clear()
        self._tokens[digest] = (project, now)
        return project

    async def decode_heavy(self, body: bytes, encoding: str | None) -> pb.AgentToServer:
        """A heavy body's message: inflated on a worker thread (zlib lets go of
        the GIL); its fields counted a slice at a time on the loop (Python in a
        thread would hold the GIL against it); the rest parsed, which the count
        bounds. The caller holds `heavy_turn`."""
        data = await trio.to_thread.run_sync(
            functools.partial(payload, body, content_encoding=encoding, limit=self.limit),
            limiter=self._heavy,
        )
        count = FieldCount(data)
        while not count.advance(COUNT_SLICE):
            await trio.lowlevel.checkpoint()
        return decode_agent_to_server(data, limit=self.limit, counted=True)

    def rejected(self, error: OpampDecodeError) -> pb.ServerToAgent:
        """Count a malformed message; the BAD_REQUEST answering it."""
        self._stats.opamp_rejected[error.reason] += 1
        return bad_request(error)

    async def apply(
        self,
        project_id: uuid.UUID,
        message: pb.AgentToServer,
        *,
        transport: Transport,
        heavy: bool,
        capabilities_sent: bool = False,
        config_sent: bytes | None = None,
        sequence_num: int | None = None,
    ) -> Applied:
        """Load, `receive`, write what the writing rule asks for (module
        docstring). ``heavy``: the message came in a large or compressed body.
        ``capabilities_sent``, ``config_sent``: what this WebSocket already
        carried (see `receive`); ``sequence_num``: the number of the agent's
        previous message on it, which the session knows better than the
        store (whose copy may wait for a flush)."""
        self._stats.opamp_messages[message_type(message)] += 1
        now = self._clock()
        uid = message.instance_uid
        cacheable = self._sole_writer is not None
        generation = 0 if self._sole_writer is None else self._sole_writer()
        if transport is Transport.HTTP:
            self._heard(project_id, uid, now)
        known = self._rows.get(project_id, uid, generation) if cacheable else None
        if known is None:
            row, config = await self._store.load_opamp_agent(project_id, uid)
            known = _known(row, config, generation)
        else:
            config = known.config
        skipped = None
        if known is not None:
            skipped = self._skipped.sequence(project_id, uid, known.last_seen)
            if sequence_num is not None:
                skipped = sequence_num
        desired = await self._desired(project_id, uid, config, message)
        vouched = (project_id, uid) in self._heard_here
        fold = functools.partial(
            _fold,
            project_id,
            known,
            skipped,
            message,
            now,
            desired,
            transport,
            capabilities_sent,
            config_sent,
            vouched,
        )
        if heavy or (known is not None and _state_bytes(known.state) > HEAVY_BYTES):
            outcome, record = await trio.to_thread.run_sync(fold, limiter=self._heavy)
        else:
            outcome, record = fold()
        state = outcome.state
        self._vouch(project_id, state)
        status = None
        if config is not None:
            status, config = self._follow(project_id, config, state, now)
        moved = state.instance_uid != uid  # a new agent too: its configuration moves
        if known is None or record is not None or status is not None:
            await self._writes.write(
                stored.StateWrite(
                    record,
                    uid if moved and record is not None else None,
                    status,
                    _history_changes(outcome) if record is not None else (),
                )
            )
        if known is None or record is not None:
            assert record is not None
            self._skipped.forget(project_id, uid)
            self._touches.drop(project_id, uid)
            self._seen[project_id, state.instance_uid] = now
            self._stats.opamp_writes["full"] += 1
            if self._on_change is not None:
                self._on_change(project_id, record.instance_uid, "state")
            last_seen, disconnected_at = record.last_seen, record.disconnected_at
            first_seen = record.first_seen
        else:
            self._skipped.remember(project_id, uid, state.sequence_num, now)
            # An HTTP agent's next poll may land on another replica, which
            # reads the number from the store: every one is queued (a sole
            # writer has no other replica). A WebSocket session keeps its
            # number; the store's copy can wait.
            self._queue_touch(
                project_id,
                uid,
                state.sequence_num,
                now,
                known.last_seen,
                every=transport is Transport.HTTP and self._sole_writer is None,
            )
            first_seen, last_seen = known.first_seen, known.last_seen
            disconnected_at = known.disconnected_at
        if status is not None:
            self._stats.opamp_writes["config_status"] += 1
            if self._on_change is not None:
                self._on_change(project_id, state.instance_uid.hex(), "config")
        if cacheable:
            if moved:
                self._rows.drop(project_id, uid)
            self._rows.put(
                project_id,
                _Known(state, first_seen, last_seen, disconnected_at, _slim(config), generation),
            )
        offered = None
        if outcome.reply.HasField("remote_config"):
            offered = outcome.reply.remote_config.config_hash
        return Applied(outcome.reply, state, offered)

    def _vouch(self, project_id: uuid.UUID, state: AgentState) -> None:
        """Vouch for the agent from now on, once its state is whole here."""
        key = (project_id, state.instance_uid)
        if state.full_state_requests:
            self._heard_here.pop(key, None)
            return
        self._heard_here[key] = None
        self._heard_here.move_to_end(key)
        while len(self._heard_here) > SKIPPED_MAX:
            self._heard_here.popitem(last=False)

    def _heard(self, project_id: uuid.UUID, uid: bytes, now: float) -> None:
        """Count the HTTP agents heard within the window (the sessions gauge)."""
        heard = self._http_heard
        heard.pop((project_id, uid), None)
        heard[project_id, uid] = now
        while heard:
            oldest = next(iter(heard.values()))
            if now - oldest <= self._window and len(heard) <= SKIPPED_MAX:
                break
            heard.popitem(last=False)
        self._stats.opamp_sessions["http"] = len(heard)

    def keep_alive(self, project_id: uuid.UUID, state: AgentState) -> None:
        """An open WebSocket session is alive: queue its ``last_seen`` when due."""
        self._queue_touch(
            project_id, state.instance_uid, state.sequence_num, self._clock(), None, every=False
        )

    def _queue_touch(
        self,
        project_id: uuid.UUID,
        uid: bytes,
        sequence_num: int,
        now: float,
        stored_seen: float | None,
        *,
        every: bool,
    ) -> None:
        """Queue ``last_seen`` and the number: ``every`` message, or once per
        a third of the window per agent."""
        key = (project_id, uid)
        if key in self._touches.pending:  # not written yet: it takes the newest number
            self._touches.add(project_id, uid, sequence_num, now)
            self._stats.opamp_writes["coalesced"] += 1
            return
        last = self._seen.get(key, stored_seen if stored_seen is not None else 0.0)
        if not every and now - last < self._touch_seconds:
            self._stats.opamp_writes["coalesced"] += 1
            return
        if len(self._seen) >= SKIPPED_MAX:
            self._seen.clear()  # costs at most one early touch per agent
        self._seen[key] = now
        self._touches.add(project_id, uid, sequence_num, now)

    async def desired(
        self, project_id: uuid.UUID, instance_uids: list[bytes]
    ) -> dict[bytes, RemoteConfig]:
        """The desired configurations of many agents, read in one store call
        and built once per hash: what pushes to their WebSockets offer."""
        generation = None if self._sole_writer is None else self._sole_writer()
        configs = await self._store.get_opamp_configs(project_id, instance_uids)
        if generation is not None:
            # What was just read is what these agents' next messages need:
            # kept, they are answered without reading the store again.
            for uid in instance_uids:
                self._rows.refresh(project_id, uid, _slim(configs.get(uid)), generation)
        return {uid: self._remote_config(config) for uid, config in configs.items() if config.files}

    # -- the desired configuration --------------------------------------------------------

    async def _desired(
        self,
        project_id: uuid.UUID,
        uid: bytes,
        config: OpampConfig | None,
        message: pb.AgentToServer,
    ) -> RemoteConfig | None:
        """The configuration for the core to offer, if it may have to.

        The store leaves the files out of an applied configuration: the core
        would not offer it, unless this very message reports otherwise (a
        restarted or rolled-back agent), and only then are they read.
        """
        if config is None:
            return None
        if not config.files and config.status != ConfigProgress.APPLIED.value:
            # Kept without its files (`_Rows`): built already, or read again.
            built = self._configs.get(config.config_hash)
            if built is not None:
                return built
            config = await self._store.get_opamp_config(project_id, uid)
            if config is None or not config.files:
                return None
            return self._remote_config(config)
        if not config.files:
            if not message.HasField("remote_config_status"):
                return None
            digest = bytes.fromhex(config.config_hash)
            if progress(message.remote_config_status, digest) is ConfigProgress.APPLIED:
                return None
            config = await self._store.get_opamp_config(project_id, uid)
            if config is None or not config.files:
                return None
        return self._remote_config(config)

    def _remote_config(self, config: OpampConfig) -> RemoteConfig:
        """The configuration as the core offers it, built once per hash (hashing
        the files again on every poll would cost as much as they weigh); the
        cache is bounded by the bytes it holds."""
        built = self._configs.get(config.config_hash)
        if built is not None:
            self._configs.move_to_end(config.config_hash)
            return built
        built = RemoteConfig(
            {
                name: ConfigFile(body=file["body"].encode(), content_type=file["content_type"])
                for name, file in config.files.items()
            }
        )
        size = sum(len(file.body) for _, file in built.files)
        if size <= CONFIG_CACHE_BYTES:
            self._configs[config.config_hash] = built
            self._config_bytes += size
            while self._config_bytes > CONFIG_CACHE_BYTES:
                _, dropped = self._configs.popitem(last=False)
                self._config_bytes -= sum(len(file.body) for _, file in dropped.files)
        return built

    def _follow(
        self, project_id: uuid.UUID, config: OpampConfig, state: AgentState, now: float
    ) -> tuple[stored.StatusWrite | None, OpampConfig]:
        """The configuration's status to write when the agent's report about
        its hash moves it (a change the agent reported, so no write per
        poll), and the configuration as it is then."""
        reported = None
        if state.remote_config_status is not None:
            reported = pb.RemoteConfigStatus.FromString(state.remote_config_status)
        digest = bytes.fromhex(config.config_hash)
        status = progress(reported, digest)
        error = ""
        if status is ConfigProgress.FAILED and reported is not None:
            error = reported.error_message
        if (status.value, error) == (config.status, config.error_message):
            return None, config
        write = stored.StatusWrite(
            project_id=project_id,
            instance_uid=state.instance_uid,  # the new one, if the agent was just given one
            config_hash=digest,
            status=status.value,
            error_message=error,
            now=now,
        )
        return write, attrs.evolve(config, status=status.value, error_message=error, status_at=now)


def _history_changes(outcome: Outcome) -> tuple[str, ...]:
    """What of a message's changes the agent's history keeps, by name
    (store/opamp_history.py): not the sequence bookkeeping."""
    names = []
    for change in outcome.changed:
        if change is Change.CONNECTED:
            names.append("connected" if outcome.state.connected else "disconnected")
        elif change is not Change.FULL_STATE_REQUESTS:
            names.append(change.value)
    order = {name: i for i, name in enumerate(HISTORY_CHANGES)}
    return tuple(sorted(names, key=lambda name: order.get(name, len(order))))


def _fold(
    project_id: uuid.UUID,
    known: _Known | None,
    skipped: int | None,
    message: pb.AgentToServer,
    now: float,
    desired: RemoteConfig | None,
    transport: Transport,
    capabilities_sent: bool,
    config_sent: bytes | None,
    vouched: bool,
) -> tuple[Outcome, OpampAgent | stored.AgentPatch | None]:
    """`receive`, and the row to write when the agent is new or changed
    (None: only ``last_seen`` may be due; a patch when only the remote
    configuration status moved). Pure: it may run on a thread."""
    prior = None
    if known is not None:
        prior = known.state
        if skipped is not None:
            prior = attrs.evolve(prior, sequence_num=skipped)
    outcome = receive(
        prior,
        message,
        transport=transport,
        new_instance_uid=lambda: uuid.uuid4().bytes,
        desired_config=desired,
        capabilities_sent=capabilities_sent,
        config_sent=config_sent,
        vouched=vouched,
    )
    if known is not None and not outcome.changed:
        return outcome, None
    state = outcome.state
    if known is not None and outcome.changed <= _PATCHED:
        patch = stored.patch_of(
            project_id,
            state,
            transport=transport.value,
            first_seen=known.first_seen,
            last_seen=now,
            disconnected_at=known.disconnected_at,
        )
        return outcome, patch
    disconnected_at = None
    if not state.connected:
        kept = None if known is None else known.disconnected_at
        disconnected_at = now if kept is None else kept
    record = stored.record_of(
        project_id,
        state,
        transport=transport.value,
        first_seen=now if known is None else known.first_seen,
        last_seen=now,
        disconnected_at=disconnected_at,
    )
    return outcome, record

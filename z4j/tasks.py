"""The task projection's core: a task's agent events folded into one `tasks` row.

One concern justifies the length (past 700 lines): the fold and its doc,
with the fast path the drain takes (`TaskState`) beside the reader's
(`task_row`), both from the same attempt rules so that they cannot drift.

The drain writes a task's row in the same transaction as its events, batch
by batch, and agents re-send, reorder and (Celery) double their events. So
the fold must not care how events arrive: `merge` keeps a *doc* that is a
join of what it has seen, and derives the row from the doc alone. Any
permutation, duplication and batching of the same events gives the same doc
and row.

The doc (stored with the row; plain JSON)::

    {"v": 1, "project": hex, "engine": str, "task_id": str,
     "first_seen": t, "last_event_at": t, "received_at": t | null,
     "obs": [[at, id, agent, kind, broker_copy, worker, runtime_ms,
              exception, message], ...],
     "reg": {field: [value, quality, at], ...},
     "truncated": true}                     # only once observations were dropped

- ``obs``: one small observation per event, keyed by (event id, agent hex):
  kind without ``task.``, true for Celery's broker-monitor copy, worker,
  runtime_ms, exception, message; sorted by (at, id, agent). Lists, not
  objects, as the fold holds them: the drain writes one per event.
  (Version 1 docs, with an object per observation and an "agents" list
  its "a" indexed, are still read.) Two
  versions of one key (a re-send filed at its receipt time) keep the later
  ``at``. At most `OBSERVATION_CAP`: past it the earliest go, as the latest
  decide the state; attempts then count only the retries kept.
- ``reg``: name, queue, args, kwargs, result, traceback, parent_id, root_id,
  tags and priority each hold their best candidate's value, best by
  (quality, at), then canonical JSON. Quality puts a real name before a
  Celery placeholder (``<unknown:…>``), a primary copy before a broker
  copy, a queue before Dramatiq's ``.DQ`` delay queue. Null or "" is never
  a candidate, except a primary success's null result (the task returned
  None); a parent equal to the task itself (Celery's re-receipt) is none.
  So large values sit in the doc once, and nothing empty overwrites them.
- ``first_seen``/``last_event_at``: the earliest/latest ``at``;
  ``received_at``: the earliest received (when the task was first queued).

Attempts and state, from the observations:

- Attempts are separated by primary ``task.retried`` events; when there
  are none, by the broker copies of the one agent that sent the most
  (ties: the smaller agent id), as prefork Celery sends nothing else.
- A primary event belongs to the attempt of the first boundary at or after
  its time (at the same time: the attempt that boundary ends). A broker
  copy belongs to the attempt numbered by the retries its own agent's
  monitor reported before it: its clock runs late, but in order. A
  broker-copy retry that is not a boundary only adds a worker or runtime.
- An attempt's state is its highest event, ranked as in `TASK_STATES`
  (failed above succeeded); the task's is its last attempt's, or
  ``retried`` while that attempt has seen nothing. So a received, which
  ranks lowest and never opens an attempt, cannot move a task back.
- An attempt's times (received, started, the end that set its state)
  prefer primary copies, then the earliest; its worker, runtime_ms and
  exception prefer primary copies, then the latest, and for the exception
  the highest kind first. runtime_ms falls back to finished - started.
- The row takes times, worker and runtime from the last attempt (worker:
  the last one known, between attempts), the exception from the attempt
  that set the state, and agent_id from the latest primary observation
  (else the latest).

Known limits: Dramatiq files every re-enqueue under the first enqueue time,
so its later attempts have no received_at; in prefork Celery the receipts
are placed against the monitor's late retry times; a broker event the
monitor maps twice (redelivery) is a second copy we cannot tell apart.
"""

from __future__ import annotations

import ast
import functools
import math
import re
from bisect import bisect_left
from collections.abc import Callable, Container, Iterable, Mapping
from typing import Any, Final, NamedTuple

import orjson

from ._filing import filing_time

__all__ = [
    "OBSERVATION_CAP",
    "TASK_STATES",
    "TaskEvent",
    "TaskRow",
    "TaskState",
    "TaskSummary",
    "merge",
    "task_event",
    "task_row",
]

TASK_STATES = ("received", "started", "retried", "succeeded", "failed", "revoked")
OBSERVATION_CAP = 256
DOC_VERSION = 2
_READABLE_VERSIONS = (1, 2)

_RANK = {state: rank for rank, state in enumerate(TASK_STATES)}
_KINDS = {"task." + state: state for state in TASK_STATES}
_ENDS = frozenset(("retried", "succeeded", "failed", "revoked"))
_FAILURES = frozenset(("retried", "failed", "revoked"))  # the ends that can say why
# Registers whose candidates are any value but null and "", by (primary copy, at):
# the event's data field each is read from.
_PLAIN_REGISTERS = (
    ("args", "args"),
    ("kwargs", "kwargs"),
    ("traceback", "traceback"),
    ("root_task_id", "root_id"),
    ("tags", "tags"),
    ("priority", "priority"),
)
# Agent ids as the doc holds them (hex), for the few agents a brain hears from.
_AGENT_HEX: dict[bytes, str] = {}
_AGENT_HEX_KEPT = 1024


class TaskEvent(NamedTuple):
    """One agent event about a task, as the projection reads it (a named tuple:
    the drain makes one per task event)."""

    project_id: bytes  # 16-byte UUID
    agent_id: bytes  # 16-byte UUID
    worker_id: str | None  # the WebSocket worker (session) that sent it
    event_id: str
    kind: str  # "task.received" ...
    engine: str
    task_id: str
    at: float  # occurred_at when sane, else receipt (z4j._filing)
    data: Mapping[str, Any]

    @property
    def broker_copy(self) -> bool:
        """Celery's second feed (its broker monitor): it names the worker host, or
        knows no task name. Signal copies do neither (z4j-celery 1.13)."""
        if self.engine != "celery":
            return False
        worker, name = self.data.get("worker"), self.data.get("task_name")
        return (type(worker) is str and worker != "") or (
            type(name) is str and name != "" and _placeholder(name)
        )


class TaskRow(NamedTuple):
    """The columns of one `tasks` row, all derived from the doc (a named tuple:
    the drain makes one per task it writes)."""

    project_id: bytes
    engine: str
    task_id: str
    name: str | None
    queue: str | None
    state: str
    attempts: int
    agent_id: bytes
    worker: str | None  # the engine's worker name (celery hostname, dramatiq host@pid)
    args: Any
    kwargs: Any
    result: Any
    exception: str | None
    message: str | None
    traceback: str | None
    runtime_ms: float | None
    parent_id: str | None
    root_id: str | None
    tags: Any
    priority: Any
    first_seen: float
    received_at: float | None
    started_at: float | None
    finished_at: float | None
    last_event_at: float
    timeline: list[dict[str, Any]]


# A TaskEvent from a tuple of its values, without the Python-level __new__ a
# NamedTuple call runs (the drain makes one per task event).
_new_event: Callable[[Iterable[Any]], TaskEvent] = functools.partial(tuple.__new__, TaskEvent)


def task_event(
    project_id: bytes,
    agent_id: bytes,
    worker_id: str | None,
    event: Mapping[str, Any],
    received_at: float,
    *,
    filed_at: float | None = None,
) -> TaskEvent | None:
    """None unless a task lifecycle event (kind in task.received/started/succeeded/
    failed/retried/revoked) with non-empty string engine and task_id.
    ``filed_at``: its filing time when the caller has it already."""
    kind, engine, task_id = event.get("kind"), event.get("engine"), event.get("task_id")
    event_id, data = event.get("id"), event.get("data")
    if not (type(kind) is str and kind in _KINDS and type(event_id) is str):
        return None
    if not (type(engine) is str and engine and type(task_id) is str and task_id):
        return None
    at = (
        filing_time(event.get("occurred_at"), received_at).timestamp()
        if filed_at is None
        else filed_at
    )
    return _new_event(
        (
            project_id,
            agent_id,
            worker_id,
            event_id,
            kind,
            engine,
            task_id,
            at,
            data if type(data) is dict or isinstance(data, Mapping) else {},
        )
    )


def merge(
    doc: Mapping[str, Any] | None, events: Iterable[TaskEvent]
) -> tuple[dict[str, Any], TaskRow]:
    """Fold events (all of ONE key: same project/engine/task_id; raise ValueError
    otherwise) into the stored doc (None: a new task); return the new doc
    (JSON-serialisable with orjson, stored in the row) and the derived row."""
    task = TaskState.load(doc) if doc is not None else None
    for event in events:
        if task is None:
            task = TaskState((event.project_id, event.engine, event.task_id))
        task.add(event)
    if task is None:
        raise ValueError("merge needs a doc or at least one event")
    task.trim()
    obs = task.sorted_obs()
    return task.dump(obs), task.row(obs)


def task_row(doc: Mapping[str, Any]) -> TaskRow:
    """The row a doc stands for (what `merge` returned with it)."""
    task = TaskState.load(doc)
    return task.row(task.sorted_obs())


# -- observations and registers ----------------------------------------------------------


# What an event leaves in the doc besides its registers' candidates: (at, event
# id, agent hex, kind (a TASK_STATES member), Celery's broker-monitor copy,
# worker, runtime_ms, exception, message). A plain tuple, as the doc holds it
# (orjson writes tuples as lists): the drain makes one per task event. The
# loops below unpack it, or read a field by these indexes.
_Obs = tuple[float, str, str, str, bool, str | None, float | None, str | None, str | None]
_AT: Final = 0
_ID: Final = 1
_AGENT: Final = 2
_KIND: Final = 3
_SECONDARY: Final = 4
_WORKER: Final = 5
_RUNTIME: Final = 6
_EXCEPTION: Final = 7
_MESSAGE: Final = 8

_Key = tuple[bytes, str, str]


class TaskSummary(NamedTuple):
    """A task's stored columns besides its doc: what the drain writes of a fold
    (`TaskState.summary`), the same values `TaskRow` holds."""

    project_id: bytes
    engine: str
    task_id: str
    name: str | None
    queue: str | None
    state: str
    attempts: int
    agent_id: bytes
    worker: str | None
    exception: str | None
    message: str | None
    runtime_ms: float | None
    parent_id: str | None
    root_id: str | None
    first_seen: float
    received_at: float | None
    started_at: float | None
    finished_at: float | None
    last_event_at: float


_new_summary: Callable[[Iterable[Any]], TaskSummary] = functools.partial(tuple.__new__, TaskSummary)


class TaskState:
    """A doc being folded: the observations and registers of one task."""

    __slots__ = ("first_seen", "key", "last_event_at", "obs", "received_at", "reg", "truncated")

    def __init__(self, key: _Key) -> None:
        self.key = key
        self.obs: dict[tuple[str, str], _Obs] = {}
        self.reg: dict[str, list[Any]] = {}
        self.first_seen = math.inf
        self.last_event_at = -math.inf
        self.received_at: float | None = None
        self.truncated = False

    @classmethod
    def load(cls, doc: Mapping[str, Any]) -> TaskState:
        version = doc.get("v")
        if version not in _READABLE_VERSIONS:
            raise ValueError(f"task doc version {version!r}, expected {DOC_VERSION}")
        task = cls((bytes.fromhex(doc["project"]), doc["engine"], doc["task_id"]))
        agents = doc.get("agents", ())
        kept = task.obs
        for o in doc["obs"]:
            if version == 1:
                ob: _Obs = (
                    o["at"],
                    o["id"],
                    agents[o["a"]],
                    o["k"],
                    "s" in o,
                    o.get("w"),
                    o.get("rt"),
                    o.get("ex"),
                    o.get("msg"),
                )
            else:
                ob = tuple(o)
            kept[ob[_ID], ob[_AGENT]] = ob
        task.reg = {name: list(value) for name, value in doc["reg"].items()}
        task.first_seen, task.last_event_at = doc["first_seen"], doc["last_event_at"]
        task.received_at = doc["received_at"]
        task.truncated = bool(doc.get("truncated"))
        return task

    def add(self, event: TaskEvent) -> None:
        project_id, agent_id, _, eid, kind_name, engine, task_id, at, data = event
        key = self.key
        if task_id != key[2] or engine != key[1] or project_id != key[0]:
            raise ValueError(
                f"event {eid!r} is about {engine}/{task_id}, not {key[1]}/{key[2]} of this project"
            )
        # The drain folds every task event: this is its hot loop, so the
        # registers' rule is written out inline (see the module's docstring:
        # the best candidate by quality, then at, then canonical JSON).
        get = data.get
        kind = _KINDS[kind_name]
        worker, name = get("worker"), get("task_name")
        worker_ok = type(worker) is str and worker != ""
        name_ok = placeholder = False
        if type(name) is str and name:
            name_ok = True
            placeholder = name.startswith("<unknown") and name.endswith(">")
        secondary = engine == "celery" and (worker_ok or placeholder)
        agent = _AGENT_HEX.get(agent_id)
        if agent is None:
            agent = agent_id.hex()
            if len(_AGENT_HEX) < _AGENT_HEX_KEPT:
                _AGENT_HEX[agent_id] = agent
        exception, message = _failure(data) if kind in _FAILURES else _NO_FAILURE
        runtime = get("runtime_ms")
        if runtime is not None and not (type(runtime) in _NUMBERS and math.isfinite(runtime)):
            runtime = None
        ob = (
            at,
            eid,
            agent,
            kind,
            secondary,
            worker if worker_ok else None,
            runtime,
            exception,
            message,
        )
        obs = self.obs
        old = obs.get((eid, agent))
        if old is None or _later_version(ob, old):
            obs[eid, agent] = ob

        if at < self.first_seen:
            self.first_seen = at
        if at > self.last_event_at:
            self.last_event_at = at
        if kind == "received" and (self.received_at is None or at < self.received_at):
            self.received_at = at

        primary = 0 if secondary else 1
        reg = self.reg
        if name_ok:
            _offer(reg, "name", name, primary + (0 if placeholder else 2), at)
        queue = get("queue")
        if type(queue) is str and queue:
            delayed = engine == "dramatiq" and queue.endswith(".DQ")
            _offer(reg, "queue", queue, 2 * primary + (0 if delayed else 1), at)
        for source, field in _PLAIN_REGISTERS:
            value = get(source)
            if value is not None and value != "":
                _offer(reg, field, value, primary, at)
        if kind == "succeeded" and "result" in data:
            result = data["result"]
            if primary or result is not None:
                _offer(reg, "result", result, primary, at)
        parent = get("parent_task_id")
        # Celery's re-receipt of a retry names the task as its own parent.
        if type(parent) is str and parent and parent != task_id:
            _offer(reg, "parent_id", parent, primary, at)

    def trim(self) -> None:
        """Keep the `OBSERVATION_CAP` latest observations by (at, id, agent)."""
        if len(self.obs) > OBSERVATION_CAP:
            kept = sorted(self.obs.values())[-OBSERVATION_CAP:]
            self.obs = {(o[_ID], o[_AGENT]): o for o in kept}
            self.truncated = True

    def sorted_obs(self) -> list[_Obs]:
        # (at, id, agent) is unique, so the tuples never compare further.
        return sorted(self.obs.values())

    def dump(self, obs: list[_Obs]) -> dict[str, Any]:
        return self._doc([list(o) for o in obs])  # as JSON gives them back

    def _doc(self, obs: list[Any]) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "v": DOC_VERSION,
            "project": self.key[0].hex(),
            "engine": self.key[1],
            "task_id": self.key[2],
            "first_seen": self.first_seen,
            "last_event_at": self.last_event_at,
            "received_at": self.received_at,
            "obs": obs,
            "reg": self.reg,
        }
        if self.truncated:
            doc["truncated"] = True
        return doc

    def stored(self) -> tuple[bytes, TaskSummary]:
        """Trim, then the doc as stored (orjson bytes, as `dump` gives it) and
        the row's columns: what the drain writes, without the row's derived
        extras (inputs, result, timeline) that only readers need."""
        self.trim()
        obs = self.sorted_obs()
        doc = orjson.dumps(self._doc(obs))  # tuples as lists, as `dump` has them
        return doc, self.summary(obs)

    def summary(self, obs: list[_Obs]) -> TaskSummary:
        """The row's columns, from observations sorted by (at, id, agent)."""
        groups, uncounted = _attempt_groups(obs)
        last = _attempt(groups[-1], uncounted)
        # Why the task is where it is: a retried task's reason is its previous attempt's.
        cause = last if last[0] is not None or len(groups) == 1 else _attempt(groups[-2], uncounted)
        return self._summary(obs, len(groups), last, cause)

    def _summary(
        self, obs: list[_Obs], attempts: int, last: _Attempt, cause: _Attempt
    ) -> TaskSummary:
        state, _, started_at, finished_at, worker, runtime_ms, _, _ = last
        # The agent that reported last, and (between attempts) the worker that ran
        # the task last: primary copies first.
        latest = _preferred(obs)
        if worker is None:
            ran = _preferred([o for o in obs if o[_WORKER] is not None])
            worker = ran[_WORKER] if ran else None
        get = self.reg.get
        none = _NONE  # an empty register's (value,)
        project, engine, task_id = self.key
        return _new_summary(
            (
                project,
                engine,
                task_id,
                get("name", none)[0],
                get("queue", none)[0],
                state or "retried",
                attempts,
                bytes.fromhex(latest[_AGENT]) if latest else b"",
                worker,
                cause[6],
                cause[7],
                runtime_ms,
                get("parent_id", none)[0],
                get("root_id", none)[0],
                self.first_seen,
                self.received_at,
                started_at,
                finished_at,
                self.last_event_at,
            )
        )

    def row(self, obs: list[_Obs]) -> TaskRow:
        groups, uncounted = _attempt_groups(obs)
        attempts = [_attempt(items, uncounted) for items in groups]
        last = attempts[-1]
        cause = last if last[0] is not None or len(attempts) == 1 else attempts[-2]
        s = self._summary(obs, len(attempts), last, cause)
        get = self.reg.get
        none = _NONE
        return TaskRow(
            project_id=s.project_id,
            engine=s.engine,
            task_id=s.task_id,
            name=s.name,
            queue=s.queue,
            state=s.state,
            attempts=s.attempts,
            agent_id=s.agent_id,
            worker=s.worker,
            args=get("args", none)[0],
            kwargs=get("kwargs", none)[0],
            result=get("result", none)[0],
            exception=s.exception,
            message=s.message,
            traceback=get("traceback", none)[0],
            runtime_ms=s.runtime_ms,
            parent_id=s.parent_id,
            root_id=s.root_id,
            tags=get("tags", none)[0],
            priority=get("priority", none)[0],
            first_seen=s.first_seen,
            received_at=s.received_at,
            started_at=s.started_at,
            finished_at=s.finished_at,
            last_event_at=s.last_event_at,
            timeline=[
                dict(zip(_ATTEMPT_FIELDS, (n, *attempt), strict=True))
                for n, attempt in enumerate(attempts, 1)
            ],
        )


_NONE = (None,)  # an empty register's value
_NO_FAILURE = (None, None)
_NUMBERS = (int, float)


def _offer(reg: dict[str, list[Any]], field: str, value: Any, quality: int, at: float) -> None:
    """A register's candidate: kept if it beats the held one by (quality, at,
    canonical JSON)."""
    held = reg.get(field)
    if (
        held is None
        or quality > held[1]
        or (
            quality == held[1]
            and (at > held[2] or (at == held[2] and _canonical_wins(value, held[0])))
        )
    ):
        reg[field] = [value, quality, at]


def _canonical_wins(value: Any, held: Any) -> bool:
    return _canonical(value) > _canonical(held)


def _later_version(new: _Obs, old: _Obs) -> bool:
    """Two versions of one (event id, agent): e.g. a re-send filed at its receipt time.
    Pick by the order `trim` keeps by, so the choice and the cap commute."""
    if new[_AT] != old[_AT]:
        return new[_AT] > old[_AT]
    return orjson.dumps(new) > orjson.dumps(old)


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _placeholder(name: str) -> bool:
    """Celery's stand-in when it does not know the name: ``<unknown:…>``."""
    return name.startswith("<unknown") and name.endswith(">")


# -- attempts -----------------------------------------------------------------------------
#
# Observations arrive here sorted by (at, id, agent), so "the latest" is the last
# one met and "the earliest" the first: the loops below pick without sort keys.

# One attempt: (state, received_at, started_at, finished_at, worker, runtime_ms,
# exception, message); the timeline's entries are these, numbered.
_Attempt = tuple[
    str | None,
    float | None,
    float | None,
    float | None,
    str | None,
    float | None,
    str | None,
    str | None,
]
_ATTEMPT_FIELDS = (
    "attempt",
    "state",
    "received_at",
    "started_at",
    "finished_at",
    "worker",
    "runtime_ms",
    "exception",
    "message",
)
_NOT_COUNTED: frozenset[_Obs] = frozenset()


def _attempt_groups(obs: list[_Obs]) -> tuple[list[list[_Obs]], Container[_Obs]]:
    """The observations of each attempt, from observations sorted by (at, id,
    agent); and the broker-copy retries that only add a worker or runtime."""
    retried = [o for o in obs if o[_KIND] == "retried"]
    if not retried:
        return [obs], _NOT_COUNTED
    bounds = [o for o in retried if not o[_SECONDARY]]
    if not bounds:
        streams: dict[str, list[_Obs]] = {}
        for o in retried:
            streams.setdefault(o[_AGENT], []).append(o)
        bounds = min(streams.items(), key=lambda s: (-len(s[1]), s[0]))[1]
    last = len(bounds)
    bound_ats = [b[_AT] for b in bounds]
    position = {(b[_ID], b[_AGENT]): i for i, b in enumerate(bounds)}
    attempts: list[list[_Obs]] = [[] for _ in range(last + 1)]
    uncounted: set[_Obs] = set()  # broker-copy retries that are not boundaries
    retries_seen: dict[str, int] = {}  # per agent, its broker copies of task.retried so far
    for o in obs:
        at, eid, agent, kind, secondary = o[:5]
        where = position.get((eid, agent)) if kind == "retried" else None
        if secondary:
            seen = retries_seen.get(agent, 0)
            if kind == "retried":
                retries_seen[agent] = seen + 1
                if where is None:
                    uncounted.add(o)
            if where is None:
                where = min(seen, last)
        elif where is None:
            where = bisect_left(bound_ats, at)
        attempts[where].append(o)
    return attempts, uncounted


def _preferred(obs: list[_Obs]) -> _Obs | None:
    """Primary copies first, then the latest."""
    for o in reversed(obs):
        if not o[_SECONDARY]:
            return o
    return obs[-1] if obs else None


def _explains_better(o: _Obs, held: _Obs | None) -> bool:
    """The highest kind (a failure over a retry), then primary copies, then the latest."""
    if held is None or _RANK[o[_KIND]] > _RANK[held[_KIND]]:
        return True
    return o[_KIND] == held[_KIND] and (held[_SECONDARY] or not o[_SECONDARY])


def _attempt(items: list[_Obs], uncounted: Container[_Obs]) -> _Attempt:
    """One attempt from its observations; those in ``uncounted`` only add a
    worker or runtime (see the module's docstring)."""
    firsts: dict[str, _Obs] = {}  # per kind: primary copies first, then the earliest
    worker = timed = failure = None  # primary copies first, then the latest
    for o in items:
        _, _, _, kind, secondary, ran_on, runtime, exception, message = o
        if not uncounted or o not in uncounted:
            first = firsts.get(kind)
            if first is None or (first[_SECONDARY] and not secondary):
                firsts[kind] = o
            if (exception is not None or message is not None) and _explains_better(o, failure):
                failure = o
        if ran_on is not None and (worker is None or worker[_SECONDARY] or not secondary):
            worker = o
        if runtime is not None and (timed is None or timed[_SECONDARY] or not secondary):
            timed = o
    state = max(firsts, key=_RANK.__getitem__, default=None)
    received, started = firsts.get("received"), firsts.get("started")
    ended = firsts[state] if state in _ENDS else None
    started_at = started[_AT] if started else None
    finished_at = ended[_AT] if ended else None
    if timed is not None:
        runtime_ms = timed[_RUNTIME]
    elif started_at is not None and finished_at is not None and finished_at >= started_at:
        runtime_ms = round((finished_at - started_at) * 1000, 3)
    else:
        runtime_ms = None
    return (
        state,
        received[_AT] if received else None,
        started_at,
        finished_at,
        worker[_WORKER] if worker else None,
        runtime_ms,
        failure[_EXCEPTION] if failure else None,
        failure[_MESSAGE] if failure else None,
    )


# -- exceptions ---------------------------------------------------------------------------

_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_TYPE_COLON = re.compile(rf"({_DOTTED}): (.*)", re.S)  # "ValueError: boom"
_REPR = re.compile(rf"({_DOTTED})\((.*)\)", re.S)  # "ValueError('boom')"
_TYPE = re.compile(_DOTTED)
_CELERY_RETRY = re.compile(r"Retry (?:in|at) .+?: (.+)", re.S)  # celery's Retry.__str__
_LITERAL_LIMIT = 8192


def _failure(data: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(exception type, message) from a failed or retried event's data.

    Celery sends the class and a message (its broker copy: the exception's
    repr); the other engines send "Type: message"; a retry may only have a
    reason. Text that does not parse is kept as sent.
    """
    exception, text = data.get("exception"), data.get("exception_message")
    if type(exception) is str and exception:
        if type(text) is str:
            found = _REPR.fullmatch(text)
            if found and found[1].rsplit(".", 1)[-1] == exception:
                inner = _unquote(found[2])
                if inner is not None:
                    return exception, inner or None
            return exception, text or None
        return _parse(exception) or (exception, None)
    reason = data.get("reason")
    if type(reason) is str and reason:
        # Celery's "Retry in 0s: RuntimeError('flaky')", its broker copy's bare
        # repr; huey's words ("timeout") are no type.
        retry = _CELERY_RETRY.fullmatch(reason)
        return _parse(retry[1] if retry else reason, words=False) or (None, reason)
    return None, None


def _parse(text: str, *, words: bool = True) -> tuple[str, str | None] | None:
    """(type, message) from "Type", "Type: message" or "Type('message')"; with
    ``words=False`` only from the last (a reason's words are not a type)."""
    if words:
        if _TYPE.fullmatch(text):
            return text, None
        found = _TYPE_COLON.fullmatch(text)
        if found:
            return found[1], found[2] or None
    found = _REPR.fullmatch(text)
    if found:
        inner = _unquote(found[2])
        if inner is not None:
            return found[1], inner or None
    return None


def _unquote(text: str) -> str | None:
    """The string a repr'd single argument stands for ("" for none), else None."""
    if text == "":
        return ""
    if len(text) > _LITERAL_LIMIT or len(text) < 2 or text[0] != text[-1] or text[0] not in "'\"":
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None
    return value if isinstance(value, str) else None

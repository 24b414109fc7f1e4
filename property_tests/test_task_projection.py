"""Properties of the task projection core (`z4j.tasks`), no database.

Generated task lifecycles per engine, shaped like what the z4j 1.13 adapters
send (research 15, §3): Celery with its broker-monitor doubles in solo,
prefork and eager pools, Dramatiq re-enqueueing through ``.DQ`` under the
first enqueue time, Huey with several received, Taskiq retrying without a
new received; each run may be cut short (a task in flight). Then:

- convergence: any permutation, duplication and batching of the events,
  with the doc stored as JSON between batches, gives the same doc and row
  as one merge of all of them, and the row is the doc's (`task_row`);
- the state is a sequential model's (one feed: no broker copies);
- a late or repeated received never moves a task back, nor adds an attempt;
- a placeholder name never wins over a known one;
- attempts = primary retries + 1 (prefork: the broker copies' retries);
- broker copies add a worker and runtime but no attempt and no other state;
- past the observation cap, the same still converges;
- events of another task are refused.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from z4j.tasks import OBSERVATION_CAP, TaskEvent, TaskRow, merge, task_row

PROJECT = uuid.UUID(int=1).bytes
WORKER_AGENT = uuid.UUID(int=2).bytes
OTHER_AGENT = uuid.UUID(int=3).bytes  # a producer, or a second Celery broker monitor
T0 = 1_800_000_000.0


@attrs.frozen
class Run:
    """A generated lifecycle: its events in the order they happened, and the truth."""

    engine: str
    mode: str  # celery: solo | prefork | eager; other engines: the engine
    events: list[TaskEvent]
    retries: int  # retries that happened
    outcome: str | None  # the state the task ended in, None when cut short
    name: str


class _Builder:
    """Mints events of one task, with unique ids in random order, as time moves on."""

    def __init__(self, rnd: random.Random, engine: str, task_id: str) -> None:
        self.rnd, self.engine, self.task_id = rnd, engine, task_id
        self.now = T0 + rnd.randint(0, 10**6)
        self.events: list[TaskEvent] = []

    def tick(self) -> float:
        """1 ms to 3 s later (whole ms: equal times come from lags and Dramatiq)."""
        self.now += self.rnd.randint(1, 3000) / 1000
        return self.now

    def emit(self, kind: str, at: float, data: dict[str, Any], agent: bytes = WORKER_AGENT) -> None:
        salt = self.rnd.getrandbits(32)
        self.events.append(
            TaskEvent(
                project_id=PROJECT,
                agent_id=agent,
                worker_id="bare-1",
                event_id=f"{salt:08x}-{len(self.events):04d}",
                kind="task." + kind,
                engine=self.engine,
                task_id=self.task_id,
                at=at,
                data=data,
            )
        )


def _cut(draw: Callable[[Any], Any], run: Run) -> Run:
    """Maybe only what had happened by some moment: a task in flight."""
    if run.retries > 10 or not draw(st.booleans()):  # long runs are for the cap
        return run
    ordered = sorted(run.events, key=lambda e: (e.at, e.event_id))
    kept = ordered[: draw(st.integers(1, len(ordered)))]
    return attrs.evolve(run, events=kept, outcome=None)


def _builder(draw: Callable[[Any], Any], engine: str, task_id: str, retries: int) -> _Builder:
    # Long runs take their randomness from one seed: fewer choices to record.
    return _Builder(draw(st.randoms(use_true_random=retries > 10)), engine, task_id)


args_st = st.lists(st.integers(-5, 5) | st.text(max_size=3), max_size=3)
kwargs_st = st.dictionaries(st.sampled_from("abc"), st.integers(0, 9), max_size=2)
few = st.integers(0, 3)


@st.composite
def celery_runs(
    draw: Callable[[Any], Any],
    retries_st: st.SearchStrategy[int] = few,
    modes: tuple[str, ...] = ("solo", "prefork", "eager"),
) -> Run:
    mode = draw(st.sampled_from(modes))
    task_id = draw(st.sampled_from(["c-ok", "5b0c7b0e-8f4c-4b59-9d1c-3f2a1e0d9c8b"]))
    name = draw(st.sampled_from(["r15.ok", "app.tasks.flaky"]))
    args, kwargs = draw(args_st), draw(kwargs_st)
    retries = draw(retries_st)
    outcomes = ["succeeded", "failed"] + ([] if mode == "eager" else ["revoked"])
    outcome = draw(st.sampled_from(outcomes))
    monitors = [] if mode == "eager" else [WORKER_AGENT, OTHER_AGENT][: draw(st.integers(1, 2))]
    placeholder = f"<unknown:{task_id[:8]}>"
    host = "r15@localhost"
    b = _builder(draw, "celery", task_id, retries)

    # The truth, then who reports what of it.
    truth: list[tuple[str, float, dict[str, Any], dict[str, Any]]] = []  # kind, at, signal, broker
    for attempt in range(retries + 1):
        received = {"task_name": name, "queue": "celery", "worker": None}
        received |= {"args": args, "kwargs": kwargs, "root_task_id": task_id}
        if attempt:
            received["parent_task_id"] = task_id  # a retry's re-receipt
        truth.append(("received", b.tick(), received, {}))
        signal = {"task_name": name, "queue": None, "worker": None}
        broker = {"task_name": placeholder, "queue": None, "worker": host}
        if attempt == retries and outcome == "revoked":
            revoked = {"terminated": False, "signum": None, "expired": False}
            truth.append(("revoked", b.tick(), signal | revoked, broker | revoked))
            break
        started = {"args": args, "kwargs": kwargs}
        truth.append(("started", b.tick(), signal | started, broker | dict.fromkeys(started)))
        if attempt < retries:
            copy = "RuntimeError('flaky')" if mode == "prefork" else "Retry(Retry(...), 0)"
            reason = "Retry in 0s: RuntimeError('flaky')"
            truth.append(
                ("retried", b.tick(), signal | {"reason": reason}, broker | {"reason": copy})
            )
        elif outcome == "succeeded":
            result = draw(st.integers(0, 99) | st.none())
            runtime = draw(st.integers(0, 50))
            truth.append(
                (
                    "succeeded",
                    b.tick(),
                    signal | {"result": result, "runtime_ms": None},
                    broker | {"result": repr(result), "runtime_ms": runtime},
                )
            )
        else:
            failure = {"exception": "ValueError", "traceback": "Traceback ...\nValueError: boom"}
            truth.append(
                (
                    "failed",
                    b.tick(),
                    signal | failure | {"exception_message": "boom"},
                    broker | failure | {"exception_message": "ValueError('boom')"},
                )
            )

    lag = {agent: draw(st.integers(0, 2000)) / 1000 for agent in monitors}
    monitor_clock = dict.fromkeys(monitors, 0.0)
    for kind, at, signal, broker in truth:
        if kind == "received":
            if mode != "eager":
                b.emit(kind, at, signal)
            continue
        if mode != "prefork":
            b.emit(kind, at, signal)
        for agent in monitors:
            # A monitor maps events in order, later than they happened.
            monitor_clock[agent] = max(monitor_clock[agent] + 0.001, at + lag[agent])
            b.emit(kind, monitor_clock[agent], broker, agent)
    return _cut(draw, Run("celery", mode, b.events, retries, outcome, name))


@st.composite
def dramatiq_runs(draw: Callable[[Any], Any]) -> Run:
    retries = draw(few)
    outcome = draw(st.sampled_from(["succeeded", "failed"]))
    producer = draw(st.sampled_from([WORKER_AGENT, OTHER_AGENT]))
    data = {"task_name": "flaky", "queue": "default", "worker": "vm@11593"}
    task_id = str(uuid.UUID(int=draw(st.integers(0, 2**128 - 1))))
    b = _builder(draw, "dramatiq", task_id, retries)
    enqueued = b.tick()  # every received repeats the first enqueue time
    b.emit("received", enqueued, data, producer)
    for attempt in range(retries + 1):
        b.emit("started", b.tick(), data)
        if attempt < retries:
            b.emit("received", enqueued, data | {"queue": "default.DQ"})
            b.emit("retried", b.tick(), data | {"exception": "RuntimeError: flaky"})
            b.emit("received", enqueued, data)
        elif outcome == "succeeded":
            b.emit("succeeded", b.tick(), data)
        else:
            b.emit("failed", b.tick(), data | {"exception": "RuntimeError: flaky"})
    return _cut(draw, Run("dramatiq", "dramatiq", b.events, retries, outcome, "flaky"))


@st.composite
def huey_runs(draw: Callable[[Any], Any], retries_st: st.SearchStrategy[int] = few) -> Run:
    retries = draw(retries_st)
    outcome = draw(st.sampled_from(["succeeded", "failed", "revoked"]))
    received = {"task_name": "ok", "args": draw(args_st), "kwargs": draw(kwargs_st)}
    name = {"task_name": "ok"}
    task_id = draw(st.sampled_from(["h-later", "d267a72a-3c4e-4c2d"]))
    b = _builder(draw, "huey", task_id, retries)
    for _ in range(draw(st.integers(1, 3))):  # enqueue, schedule, re-enqueue at run time
        b.emit("received", b.tick(), received)
    for attempt in range(retries + 1):
        if attempt:
            b.emit("received", b.tick(), received)
        if attempt == retries and outcome == "revoked":
            b.emit("revoked", b.tick(), name)
            break
        b.emit("started", b.tick(), name)
        if attempt < retries:
            why = b.rnd.choice([{}, {"exception": "RuntimeError: flaky"}])
            b.emit("retried", b.tick(), name | why)
        elif outcome == "succeeded":
            b.emit("succeeded", b.tick(), name)
        else:
            b.emit("failed", b.tick(), name | {"exception": "ValueError: boom"})
    return _cut(draw, Run("huey", "huey", b.events, retries, outcome, "ok"))


@st.composite
def taskiq_runs(draw: Callable[[Any], Any]) -> Run:
    retries = draw(few)
    outcome = draw(st.sampled_from(["succeeded", "failed"]))
    name = {"task_name": "r15.flaky"}
    task_id = uuid.UUID(int=draw(st.integers(0, 2**128 - 1))).hex
    b = _builder(draw, "taskiq", task_id, retries)
    b.emit("received", b.tick(), name | {"args": draw(args_st), "kwargs": draw(kwargs_st)})
    for attempt in range(retries + 1):
        b.emit("started", b.tick(), name)
        if attempt < retries:
            b.emit("retried", b.tick(), name)  # no new received on a retry
        elif outcome == "succeeded":
            b.emit("succeeded", b.tick(), name)
        else:
            b.emit("failed", b.tick(), name | {"exception": "ValueError: boom"})
    return _cut(draw, Run("taskiq", "taskiq", b.events, retries, outcome, "r15.flaky"))


any_run = celery_runs() | dramatiq_runs() | huey_runs() | taskiq_runs()


# -- helpers ------------------------------------------------------------------------------


def _stored(doc: dict[str, Any]) -> dict[str, Any]:
    """The doc as the database gives it back."""
    loaded: dict[str, Any] = orjson.loads(orjson.dumps(doc))
    return loaded


def _fold(batches: list[list[TaskEvent]]) -> tuple[dict[str, Any], TaskRow]:
    doc: dict[str, Any] | None = None
    row = None
    for batch in batches:
        doc, row = merge(doc, batch)
        doc = _stored(doc)
    assert doc is not None and row is not None
    return doc, row


@st.composite
def deliveries(draw: Callable[[Any], Any], events: list[TaskEvent]) -> list[list[TaskEvent]]:
    """The events in any order, some more than once, cut into non-empty batches."""
    rnd = draw(st.randoms(use_true_random=len(events) > 64))
    stream = [*events, *(rnd.choice(events) for _ in range(rnd.randint(0, len(events))))]
    rnd.shuffle(stream)
    cuts = sorted(rnd.sample(range(1, len(stream)), min(len(stream) - 1, rnd.randint(0, 6))))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def _with_resends(events: list[TaskEvent], data: st.DataObject) -> list[TaskEvent]:
    """Plus re-sends filed at their receipt time (their occurred_at was not sane):
    second versions of the same event ids, at another time."""
    resent = data.draw(st.lists(st.sampled_from(events), max_size=3))
    return [*events, *(e._replace(at=e.at + data.draw(st.integers(1, 10**5))) for e in resent)]


def _primary(event: TaskEvent) -> bool:
    return not event.broker_copy


def _is_placeholder(name: str | None) -> bool:
    return name is not None and name.startswith("<unknown") and name.endswith(">")


# -- properties ---------------------------------------------------------------------------


@given(run=any_run, data=st.data())
def test_any_order_duplicates_and_batches_converge(run: Run, data: st.DataObject) -> None:
    events = _with_resends(run.events, data)
    doc, row = merge(None, events)
    assert _stored(doc) == doc
    assert task_row(_stored(doc)) == row

    again = _fold(data.draw(deliveries(events)))
    assert again == (doc, row)


@given(run=any_run, data=st.data())
def test_late_or_repeated_received_never_moves_a_task_back(run: Run, data: st.DataObject) -> None:
    before = merge(None, run.events)[1]
    received = [e for e in run.events if e.kind == "task.received"] or run.events
    low, high = run.events[0].at - 5, max(e.at for e in run.events) + 5
    extra = [
        data.draw(st.sampled_from(received))._replace(
            kind="task.received",
            event_id=f"late-{n}",
            at=data.draw(st.floats(low, high)),
            agent_id=data.draw(st.sampled_from([WORKER_AGENT, OTHER_AGENT])),
        )
        for n in range(data.draw(st.integers(1, 4)))
    ]
    after = _fold(data.draw(deliveries([*run.events, *extra])))[1]
    assert after.attempts == before.attempts
    if before.state == "retried":  # waiting for its next attempt, which a received may show
        assert after.state in ("retried", "received")
    else:
        assert after.state == before.state


def _sequential_state(events: list[TaskEvent]) -> str:
    """The reference: events in the order they happened, a retry opening an attempt."""
    rank = {k: r for r, k in enumerate(["received", "started", "retried", "succeeded", "failed"])}
    rank["revoked"] = 9
    state = None
    for e in sorted(events, key=lambda e: e.at):
        kind = e.kind.removeprefix("task.")
        if kind == "retried" or state == "retried" or state is None or rank[kind] > rank[state]:
            state = kind
    assert state is not None
    return state


single_feed_runs = celery_runs(modes=("eager",)) | dramatiq_runs() | huey_runs() | taskiq_runs()


@given(run=single_feed_runs)
def test_the_state_is_the_sequential_models(run: Run) -> None:
    """Without broker copies (whose clocks run late), whole runs or cut short."""
    assert merge(None, run.events)[1].state == _sequential_state(run.events)


@given(run=celery_runs())
def test_a_placeholder_name_never_wins_over_a_known_one(run: Run) -> None:
    row = merge(None, run.events)[1]
    names = {e.data["task_name"] for e in run.events}
    assert row.name in names
    if any(not _is_placeholder(n) for n in names):
        assert row.name == run.name


@given(run=any_run)
def test_attempts_are_the_primary_retries_plus_one(run: Run) -> None:
    row = merge(None, run.events)[1]
    retried = [e for e in run.events if e.kind == "task.retried"]
    primary = [e for e in retried if _primary(e)]
    if primary:
        assert row.attempts == len(primary) + 1
    else:  # prefork Celery: its broker copies, one monitor's worth
        per_monitor = Counter(e.agent_id for e in retried)
        assert row.attempts == max(per_monitor.values(), default=0) + 1
    assert len(row.timeline) == row.attempts
    assert [a["attempt"] for a in row.timeline] == list(range(1, row.attempts + 1))
    if run.outcome is not None:  # a whole run
        assert row.attempts == run.retries + 1
        assert row.state == run.outcome
        assert row.name == run.name


@given(run=celery_runs(modes=("solo",)))
def test_broker_copies_add_data_but_no_attempt_nor_state(run: Run) -> None:
    signals = [e for e in run.events if _primary(e)]
    if not signals:
        return
    alone = merge(None, signals)[1]
    both = merge(None, run.events)[1]
    assert both.attempts == alone.attempts
    same = ["name", "queue", "args", "kwargs", "parent_id", "root_id", "received_at"]
    if run.outcome is not None:
        # A run cut short may hold a broker copy whose signal copy, filed at
        # the same time, had not come yet; a whole run holds both.
        same += ["state", "result", "exception", "message", "traceback", "started_at"]
        same += ["finished_at"]
    for field in same:
        assert getattr(both, field) == getattr(alone, field), field
    if any(e.broker_copy and e.kind != "task.received" for e in run.events):
        assert both.worker == "r15@localhost"
    if run.outcome == "succeeded":
        broker_runtime = next(
            e.data["runtime_ms"] for e in run.events if e.broker_copy and e.kind == "task.succeeded"
        )
        assert both.runtime_ms == broker_runtime


@given(
    run=st.one_of(
        celery_runs(st.integers(60, 80), modes=("solo",)), huey_runs(st.integers(90, 120))
    ),
    data=st.data(),
)
def test_past_the_cap_it_still_converges(run: Run, data: st.DataObject) -> None:
    assert len(run.events) > OBSERVATION_CAP
    events = _with_resends(run.events, data)
    doc, row = merge(None, events)
    assert len(doc["obs"]) == OBSERVATION_CAP and doc["truncated"]
    assert _fold(data.draw(deliveries(events))) == (_stored(doc), row)


@pytest.mark.parametrize("field", ["project_id", "engine", "task_id"])
@given(run=any_run, data=st.data())
def test_events_of_another_task_are_refused(field: str, run: Run, data: st.DataObject) -> None:
    stranger = data.draw(st.sampled_from(run.events))._replace(
        **{field: uuid.UUID(int=99).bytes if field == "project_id" else "other"},
    )
    events = data.draw(st.permutations([*run.events, stranger]))
    with pytest.raises(ValueError):
        merge(None, events)
    doc, _ = merge(None, run.events)
    with pytest.raises(ValueError):
        merge(_stored(doc), [stranger])

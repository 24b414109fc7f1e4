"""The task projection (`z4j.tasks`) on events real adapters sent (research 15, §3).

The Celery events are the solo-pool and prefork captures of z4j-celery 1.13:
each started/succeeded/failed/retried comes once from the signal hooks and
once, later and under a ``<unknown:…>`` name, from the broker monitor.
"""

from __future__ import annotations

import itertools
import uuid
from datetime import datetime
from typing import Any

import pytest

from z4j.tasks import OBSERVATION_CAP, TaskEvent, TaskRow, merge, task_event, task_row

PROJECT = uuid.UUID("7d6c1f0e-2b1a-4c3d-9e8f-0a1b2c3d4e5f").bytes
AGENT = uuid.UUID("0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9").bytes


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def events(*raw: dict[str, Any]) -> list[TaskEvent]:
    """Agent events as the drain reads them, received a second after they occurred."""
    out = []
    for event in raw:
        parsed = task_event(PROJECT, AGENT, "bare-1-1", event, ts(event["occurred_at"]) + 1)
        assert parsed is not None
        out.append(parsed)
    return out


def ev(event_id: str, kind: str, task_id: str, at: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": event_id,
        "kind": "task." + kind,
        "engine": "celery",
        "task_id": task_id,
        "occurred_at": "2026-12-06T22:" + at + "+00:00",
        "data": data,
    }


def ok_name(n: str = "r15.ok") -> dict[str, Any]:
    return {"task_name": n, "queue": None, "worker": None}


BROKER = {"task_name": "<unknown:c-ok>", "queue": None, "worker": "r15@localhost"}

C_OK = [
    ev(
        "ad073f2f",
        "received",
        "c-ok",
        "29:45.023674",
        {
            "task_name": "r15.ok",
            "queue": "celery",
            "worker": None,
            "args": [21],
            "kwargs": {},
            "root_task_id": "c-ok",
        },
    ),
    ev("01f28b26", "started", "c-ok", "29:45.024334", ok_name() | {"args": [21], "kwargs": {}}),
    ev(
        "60e84461",
        "succeeded",
        "c-ok",
        "29:45.024756",
        ok_name() | {"result": 42, "runtime_ms": None},
    ),
    ev("68550874", "started", "c-ok", "29:45.983661", BROKER | {"args": None, "kwargs": None}),
    ev("02b16dfa", "succeeded", "c-ok", "29:45.983857", BROKER | {"result": "42", "runtime_ms": 0}),
]


def test_a_celery_signal_and_broker_pair_makes_one_attempt() -> None:
    """Name, args and the native result from the signal copies; worker and
    runtime from the broker copies; the times of the signal copies."""
    doc, row = merge(None, events(*C_OK))
    received, started, finished = (ts(e["occurred_at"]) for e in C_OK[:3])
    assert row == TaskRow(
        project_id=PROJECT,
        engine="celery",
        task_id="c-ok",
        name="r15.ok",
        queue="celery",
        state="succeeded",
        attempts=1,
        agent_id=AGENT,
        worker="r15@localhost",
        args=[21],
        kwargs={},
        result=42,
        exception=None,
        message=None,
        traceback=None,
        runtime_ms=0,
        parent_id=None,
        root_id="c-ok",
        tags=None,
        priority=None,
        first_seen=received,
        received_at=received,
        started_at=started,
        finished_at=finished,
        last_event_at=ts(C_OK[4]["occurred_at"]),
        timeline=[
            {
                "attempt": 1,
                "state": "succeeded",
                "received_at": received,
                "started_at": started,
                "finished_at": finished,
                "worker": "r15@localhost",
                "runtime_ms": 0,
                "exception": None,
                "message": None,
            }
        ],
    )
    assert task_row(doc) == row
    kinds = [(o[3], o[4]) for o in doc["obs"]]  # kind, broker copy
    assert kinds == [
        ("received", False),
        ("started", False),
        ("succeeded", False),
        ("started", True),
        ("succeeded", True),
    ]
    assert doc["reg"]["result"][0] == 42 and doc["reg"]["name"][0] == "r15.ok"


def test_the_pair_gives_the_same_row_in_any_order_and_batching() -> None:
    expected = merge(None, events(*C_OK))
    for order in itertools.permutations(C_OK):
        doc, _ = merge(None, events(*order[:2]))
        assert merge(doc, events(*order[2:], *order[:1])) == expected


def test_the_signal_copys_times_win_over_a_skewed_monitor() -> None:
    """A second agent's monitor, its clock 2 s behind, reports the same pair."""
    skewed = [
        event | {"id": event["id"] + "-b", "occurred_at": f"2026-12-06T22:29:43.98{n}+00:00"}
        for n, event in enumerate(C_OK[3:])
    ]
    other = [e._replace(agent_id=uuid.UUID(int=5).bytes) for e in events(*skewed)]
    _, alone = merge(None, events(*C_OK))
    _, row = merge(None, [*events(*C_OK), *other])
    assert (row.state, row.attempts, row.agent_id) == ("succeeded", 1, AGENT)
    assert (row.started_at, row.finished_at) == (alone.started_at, alone.finished_at)
    assert row.first_seen == ts(skewed[0]["occurred_at"])


def test_a_broker_copy_alone_supplements_until_the_signal_copy_comes() -> None:
    broker_started, broker_succeeded = C_OK[3], C_OK[4]
    _, row = merge(None, events(broker_started, broker_succeeded))
    assert (row.name, row.result, row.state, row.attempts) == (
        "<unknown:c-ok>",
        "42",
        "succeeded",
        1,
    )
    _, row = merge(None, events(*C_OK))
    assert (row.name, row.result) == ("r15.ok", 42)


C_BOOM_FAILED = [
    ev(
        "d94c2d9b",
        "failed",
        "c-boom",
        "29:45.029567",
        ok_name("r15.boom")
        | {
            "exception": "ValueError",
            "exception_message": "boom",
            "traceback": "Traceback (most recent call last):\n  (signal)\nValueError: boom",
        },
    ),
    ev(
        "e80c312a",
        "failed",
        "c-boom",
        "29:45.984588",
        BROKER
        | {
            "task_name": "<unknown:c-boom>",
            "exception": "ValueError",
            "exception_message": "ValueError('boom')",
            "traceback": "Traceback (most recent call last):\n  (broker)\nValueError: boom",
        },
    ),
]
C_BOOM_STARTED = ev("dd50da44", "started", "c-boom", "29:45.026202", ok_name("r15.boom"))


def test_a_celery_failure_pair_keeps_the_signal_copy_message_and_traceback() -> None:
    _, row = merge(None, events(C_BOOM_STARTED, *C_BOOM_FAILED))
    assert (row.state, row.exception, row.message) == ("failed", "ValueError", "boom")
    assert row.traceback is not None and "(signal)" in row.traceback
    assert row.runtime_ms == pytest.approx(3.365)  # no runtime sent: finished - started


def test_a_broker_failure_alone_has_its_repr_read() -> None:
    _, row = merge(None, events(C_BOOM_FAILED[1]))
    assert (row.exception, row.message, row.worker) == ("ValueError", "boom", "r15@localhost")


def _pf(event_id: str, kind: str, at: str, data: dict[str, Any]) -> dict[str, Any]:
    return ev(event_id, kind, "p-flaky", at, data)


PF_BROKER = {"task_name": "<unknown:p-flaky>", "queue": None, "worker": "pf@localhost"}
PF_RECEIVED = {
    "task_name": "pf.flaky",
    "queue": "celery",
    "worker": None,
    "args": [],
    "kwargs": {},
    "root_task_id": "p-flaky",
}
PF_FAILED = PF_BROKER | {
    "exception": "RuntimeError",
    "exception_message": "RuntimeError('flaky')",
    "traceback": "Traceback ...\nRuntimeError: flaky",
}
# Prefork: the signal hooks only see the receipts; the rest comes from the monitor.
P_FLAKY = [
    _pf("fcbf6301", "received", "28:05.251192", PF_RECEIVED),
    _pf("0af63752", "started", "28:06.228746", PF_BROKER | {"args": None, "kwargs": None}),
    _pf("96899984", "retried", "28:06.229014", PF_BROKER | {"reason": "RuntimeError('flaky')"}),
    _pf("23e1b87f", "received", "28:06.266215", PF_RECEIVED | {"parent_task_id": "p-flaky"}),
    _pf("63bdeb73", "started", "28:07.229944", PF_BROKER | {"args": None, "kwargs": None}),
    _pf("1aef90db", "retried", "28:07.230306", PF_BROKER | {"reason": "RuntimeError('flaky')"}),
    _pf("0b73bb4b", "received", "28:07.268509", PF_RECEIVED | {"parent_task_id": "p-flaky"}),
    _pf("515bc0a4", "started", "28:08.232218", PF_BROKER | {"args": None, "kwargs": None}),
    _pf("6378fbd8", "failed", "28:08.233472", PF_FAILED),
]


def test_prefork_attempts_come_from_the_broker_copies() -> None:
    _, row = merge(None, events(*P_FLAKY))
    assert (row.name, row.state, row.attempts) == ("pf.flaky", "failed", 3)
    assert (row.exception, row.message, row.worker) == ("RuntimeError", "flaky", "pf@localhost")
    assert row.parent_id is None  # a re-receipt names the task as its own parent
    assert [(a["state"], a["exception"], a["message"]) for a in row.timeline] == [
        ("retried", "RuntimeError", "flaky"),
        ("retried", "RuntimeError", "flaky"),
        ("failed", "RuntimeError", "flaky"),
    ]
    assert [a["received_at"] for a in row.timeline] == [
        ts(P_FLAKY[i]["occurred_at"]) for i in (0, 3, 6)
    ]


def test_a_retried_task_waits_in_state_retried_with_the_retry_reason() -> None:
    _, row = merge(None, events(*P_FLAKY[:3]))
    assert (row.state, row.attempts, row.started_at, row.finished_at) == ("retried", 2, None, None)
    assert (row.exception, row.message, row.worker) == ("RuntimeError", "flaky", "pf@localhost")
    _, row = merge(None, events(*P_FLAKY[:4]))
    assert (row.state, row.attempts) == ("received", 2)


DQ = "2026-12-06T22:24:46.550000+00:00"  # Dramatiq's every receipt: the first enqueue time


def _dq(event_id: str, kind: str, at: str, queue: str = "default", **extra: str) -> dict[str, Any]:
    return {
        "id": event_id,
        "kind": "task." + kind,
        "engine": "dramatiq",
        "task_id": "ebcc45a8-1614-4518-81c5-229dc41550a8",
        "occurred_at": at,
        "data": {"task_name": "flaky", "queue": queue, "worker": "vm@11593"} | extra,
    }


def test_dramatiq_re_enqueues_through_the_delay_queue() -> None:
    at = "2026-12-06T22:24:46.{}+00:00".format
    _, row = merge(
        None,
        events(
            _dq("c3e2b00e", "received", DQ),
            _dq("d25ff325", "started", at("553016")),
            _dq("14db4808", "received", DQ, "default.DQ"),
            _dq("0207088e", "retried", at("557711"), exception="RuntimeError: flaky"),
            _dq("1b2701a3", "received", DQ),
            _dq("8942c45b", "started", at("657755")),
            _dq("8b106084", "failed", at("763610"), exception="RuntimeError: flaky"),
        ),
    )
    assert (row.queue, row.state, row.attempts) == ("default", "failed", 2)
    assert (row.exception, row.message, row.worker) == ("RuntimeError", "flaky", "vm@11593")
    assert row.received_at == ts(DQ)
    # Every receipt is filed under the first enqueue: the second attempt has none.
    assert [a["received_at"] for a in row.timeline] == [ts(DQ), None]
    # Only the producer's receipts, all at one time: the delay queue still loses.
    _, row = merge(
        None, events(_dq("c3e2b00e", "received", DQ), _dq("14db", "received", DQ, "default.DQ"))
    )
    assert row.queue == "default"


def _huey(event_id: str, kind: str, at: str, **data: Any) -> dict[str, Any]:
    return {
        "id": event_id,
        "kind": "task." + kind,
        "engine": "huey",
        "task_id": "h-later",
        "occurred_at": "2026-12-06T22:29:" + at + "+00:00",
        "data": {"task_name": "ok"} | data,
    }


def test_huey_several_receipts_then_a_revoke() -> None:
    raw = [
        _huey("f1221017", "received", "19.957778", args=[1], kwargs={}),
        _huey("212c263a", "received", "20.065000", args=[1], kwargs={}),
        _huey("1979cf69", "received", "32.956973", args=[1], kwargs={}),
        _huey("d9041664", "revoked", "33.833640", reason="rate_limited"),
    ]
    _, row = merge(None, events(*raw))
    assert (row.state, row.attempts, row.args) == ("revoked", 1, [1])
    assert (row.exception, row.message) == (None, "rate_limited")  # a reason's words are no type
    assert row.received_at == ts(raw[0]["occurred_at"])
    assert row.finished_at == ts(raw[3]["occurred_at"])


@pytest.mark.parametrize(
    ("sent", "exception", "message"),
    [
        ("ValueError: boom", "ValueError", "boom"),
        ("app.errors.Oops: a: b", "app.errors.Oops", "a: b"),
        ("ValueError: ", "ValueError", None),
        ("TaskTimeout", "TaskTimeout", None),
        ("something went wrong", "something went wrong", None),  # kept as sent
    ],
)
def test_other_engines_exception_text_is_split(sent: str, exception: str, message: str) -> None:
    raw = {
        "id": "b7b2b1e0",
        "kind": "task.failed",
        "engine": "taskiq",
        "task_id": "9dd2ddd493b4402096918110ecb2b3ce",
        "occurred_at": "2026-12-06T22:26:35.014364+00:00",
        "data": {"task_name": "r15.boom", "exception": sent},
    }
    _, row = merge(None, events(raw))
    assert (row.exception, row.message) == (exception, message)


def test_an_event_at_the_instant_of_a_retry_belongs_to_the_attempt_it_ends() -> None:
    def taskiq(event_id: str, kind: str) -> dict[str, Any]:
        return {"id": event_id, "kind": "task." + kind, "engine": "taskiq", "task_id": "42dc",
                "occurred_at": "2026-12-06T22:26:35.017694+00:00", "data": {}}  # fmt: skip

    _, row = merge(None, events(taskiq("a", "started"), taskiq("b", "retried")))
    assert [a["state"] for a in row.timeline] == ["retried", None]
    assert row.state == "retried"


def test_task_event_takes_only_task_lifecycle_events() -> None:
    good = C_OK[0]
    now = ts(good["occurred_at"])
    assert task_event(PROJECT, AGENT, None, good, now) is not None
    for bad in (
        good | {"kind": "schedule.snapshot"},
        good | {"kind": "task.sent"},
        good | {"engine": ""},
        good | {"task_id": ""},
        {k: v for k, v in good.items() if k != "task_id"},
        good | {"id": 7},
    ):
        assert task_event(PROJECT, AGENT, None, bad, now) is None
    # An insane occurred_at is replaced by the receipt time, as for the events rows.
    for insane in ("1970-01-01T00:00:00Z", "soon", None):
        filed = task_event(PROJECT, AGENT, None, good | {"occurred_at": insane}, now + 1)
        assert filed is not None and filed.at == now + 1


def test_a_late_received_leaves_a_started_task_started() -> None:
    received, started = C_OK[:2]
    late = received | {"id": "re-enqueued", "occurred_at": "2026-12-06T22:29:46+00:00"}
    for order in itertools.permutations([received, started, late]):
        _, row = merge(None, events(*order))
        assert (row.state, row.attempts) == ("started", 1)


def test_past_the_cap_the_earliest_go_and_a_later_resend_stays() -> None:
    """Observations are kept by (at, id, agent), the latest; of two versions of
    one event (a re-send filed at its receipt time) the later one counts. The
    two rules agree, so folding in either order gives the same doc."""
    many = [
        TaskEvent(PROJECT, AGENT, None, f"e{n:03d}", "task.received", "huey", "h", 100.0 + n, {})
        for n in range(OBSERVATION_CAP + 1)
    ]
    resend = TaskEvent(PROJECT, AGENT, None, "e000", "task.received", "huey", "h", 999.0, {})
    doc, row = merge(None, [*many, resend])
    # 257 keys, the first now filed last: the second goes.
    assert [o[1] for o in doc["obs"]] == [f"e{n:03d}" for n in range(2, len(many))] + ["e000"]
    assert doc["truncated"] and row.first_seen == 100.0
    assert merge(merge(None, many)[0], [resend]) == (doc, row)
    assert merge(merge(None, [resend])[0], many) == (doc, row)


def test_merge_refuses_nothing_at_all_and_unknown_docs() -> None:
    with pytest.raises(ValueError, match="at least one event"):
        merge(None, [])
    doc, row = merge(None, events(*C_OK))
    assert merge(doc, []) == (doc, row)
    # A version 1 doc (an object per observation, agents by index) reads as the same task.
    agents = sorted({o[2] for o in doc["obs"]})
    v1 = doc | {
        "v": 1,
        "agents": agents,
        "obs": [
            {
                "at": o[0],
                "id": o[1],
                "a": agents.index(o[2]),
                "k": o[3],
                **({"s": 1} if o[4] else {}),
                **{
                    key: value
                    for key, value in zip(("w", "rt", "ex", "msg"), o[5:], strict=True)
                    if value is not None
                },
            }
            for o in doc["obs"]
        ],
    }
    assert agents and merge(v1, []) == (doc, row)
    with pytest.raises(ValueError, match="version"):
        merge(doc | {"v": 3}, [])

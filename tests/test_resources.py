"""The API JSON and the OpenAPI components follow the attrs records (z4j/brain/http/resources.py).

A record is the one source of its resource's shape: these tests fail if
the served document's component, the JSON a route sends, and the record's
fields disagree, and show that a field added to a record reaches both.
"""

from __future__ import annotations

import uuid
from typing import Any

import attrs
import openapi_schema_validator
import orjson
import pytest

from z4j.brain.http import resources
from z4j.brain.http.api import _agent_json
from z4j.brain.http.events_api import event_json
from z4j.brain.http.opamp_api import opamp_agent_json
from z4j.brain.http.openapi import OPENAPI
from z4j.brain.http.resources import RESOURCES, Resource, component, to_json
from z4j.brain.http.workers_api import engine_worker_json
from z4j.store.base import (
    Agent,
    AuditRecord,
    CommandRecord,
    EngineWorker,
    EventRecord,
    InstanceInfo,
    OpampAgent,
    OpampConfig,
    OpampHistoryEntry,
    OpampRollout,
    Project,
    ScheduleRecord,
    TaskRecord,
    WorkerInfo,
)

T = 1_765_000_000.25
ID = uuid.UUID("12345678-1234-5678-1234-567812345678")

PENDING = CommandRecord(
    id=ID,
    project_id=ID,
    agent_id=ID,
    action="restart",
    target={"a": 1},
    parameters={},
    timeout_seconds=60,
    issued_by=None,
    state="pending",
    worker_id=None,
    delivery_claim_token="lease",
    created_at=T,
    dispatched_at=None,
    finished_at=None,
    result=None,
    error=None,
)
OPAMP_AGENT = OpampAgent(
    project_id=ID,
    instance_uid="ab" * 16,
    identifying={"service.name": "checkout"},
    non_identifying={"host.name": "web-1", "process.pid": 42},
    capabilities=["REPORTS_STATUS", "REPORTS_HEALTH"],
    health={"healthy": True, "status": "running", "last_error": ""},
    effective_config=None,
    remote_config_status=None,
    sequence_num=3,
    transport="http",
    first_seen=T,
    last_seen=T + 1,
    disconnected_at=None,
    state=b"internal",
    full_state_requests=1,
)
SAMPLES: dict[type, list[Any]] = {
    Project: [Project(ID, "p")],
    Agent: [Agent(ID, ID, "a", False, T)],
    WorkerInfo: [
        WorkerInfo(
            agent_id=ID,
            worker_id="w1",
            role=None,
            instance_id=ID,
            connected_at=T,
            last_seen=T,
            disconnected_at=None,
            status={"load": [1, 2]},
        ),
        WorkerInfo(
            agent_id=ID,
            worker_id="w2",
            role="web",
            instance_id=None,
            connected_at=T,
            last_seen=T,
            disconnected_at=T + 1,
            status=None,
            capabilities={"celery": ["cancel_task", "retry_task"]},
            health={"celery.queue_depths": '{"default": 3}', "celery.broker_connected": "True"},
            schedulers=["celery-beat"],
            runtime_features=["external_schedule_protocol_v1"],
        ),
    ],
    InstanceInfo: [
        InstanceInfo(id=ID, name="a", host="h", pid=7, buffer_id=ID, started_at=T, last_seen=T),
    ],
    EventRecord: [
        EventRecord(
            id=3,
            key="ab" * 16,
            received_at=T,
            source="agent",
            kind="task.done",
            project_id=ID,
            agent_id=None,
            worker_id=None,
            body={"x": [1, "y", None]},
        ),
    ],
    CommandRecord: [
        PENDING,
        attrs.evolve(
            PENDING,
            parameters={"p": 2},
            timeout_seconds=5,
            issued_by="admin",
            state="failed",
            worker_id="w1",
            delivery_claim_token=None,
            dispatched_at=T + 1,
            finished_at=T + 2,
            result={"ok": False},
            error="boom",
        ),
    ],
    AuditRecord: [
        AuditRecord(id=1, at=T, actor=None, action="command.created", subject="x", details={}),
    ],
    TaskRecord: [
        # As a list shows it: the details left out.
        TaskRecord(
            project_id=ID,
            engine="celery",
            task_id="t-1",
            name="app.add",
            queue="celery",
            state="failed",
            attempts=2,
            agent_id=ID,
            worker="w@host",
            exception="ValueError",
            message="boom",
            runtime_ms=12.5,
            first_seen=T,
            received_at=T,
            started_at=T + 1,
            finished_at=T + 2,
            last_event_at=T + 2,
        ),
        # As the task itself: inputs, result, lineage and timeline.
        TaskRecord(
            project_id=ID,
            engine="huey",
            task_id="t-2",
            name=None,
            queue=None,
            state="received",
            attempts=1,
            agent_id=None,
            worker=None,
            exception=None,
            message=None,
            runtime_ms=None,
            first_seen=T,
            received_at=None,
            started_at=None,
            finished_at=None,
            last_event_at=T,
            args=[1, {"k": "***"}],
            kwargs={},
            result=None,
            traceback="Traceback ...",
            parent_id="p",
            root_id="r",
            tags=["a"],
            priority=5,
            timeline=[{"attempt": 1, "state": "received"}],
        ),
    ],
    OpampAgent: [
        OPAMP_AGENT,
        attrs.evolve(
            OPAMP_AGENT,
            health=None,
            effective_config={"config_hash": "00", "files": []},
            remote_config_status={"status": "applied"},
            disconnected_at=T + 2,
        ),
    ],
    OpampConfig: [
        OpampConfig(
            project_id=ID,
            instance_uid="00" * 16,
            config_hash="ab" * 32,
            files={"collector.yaml": {"body": "receivers: {}\n", "content_type": "text/yaml"}},
            created_at=T,
            created_by="api",
            status="failed",
            error_message="bad receiver",
            status_at=T + 1,
        ),
        OpampConfig(
            project_id=ID,
            instance_uid="00" * 16,
            config_hash="cd" * 32,
            files={"a.json": {"body": "{}", "content_type": "application/json"}},
            created_at=T,
            created_by=None,
            status="pending",
            error_message="",
            status_at=T,
        ),
    ],
    OpampRollout: [
        OpampRollout(
            id=ID,
            project_id=ID,
            selector={"service.name": "checkout"},
            config_hash="ab" * 32,
            canary_percent=10,
            batch_size=100,
            failure_threshold_percent=10,
            state="running",
            stage=1,
            stages=3,
            targets=25,
            assigned=3,
            accepted_failures=0,
            counts={"pending": 1, "applying": 1, "applied": 1, "failed": 0, "superseded": 0},
            halted_reason=None,
            created_at=T,
            created_by="api",
            updated_at=T + 1,
        ),
        OpampRollout(
            id=ID,
            project_id=ID,
            selector={},
            config_hash="cd" * 32,
            canary_percent=0,
            batch_size=10,
            failure_threshold_percent=0,
            state="halted",
            stage=2,
            stages=2,
            targets=20,
            assigned=20,
            accepted_failures=1,
            counts={"pending": 0, "applying": 0, "applied": 17, "failed": 2, "superseded": 1},
            halted_reason="2 of 20 assigned agents failed (threshold 0%)",
            created_at=T,
            created_by=None,
            updated_at=T + 2,
        ),
    ],
    OpampHistoryEntry: [
        OpampHistoryEntry(
            id=7,
            project_id=ID,
            instance_uid="0f" * 16,
            at=T,
            changes=["connected", "health", "config_status"],
            details={
                "health": {"healthy": True, "status": "ok"},
                "config_status": {
                    "config_hash": "ab" * 32,
                    "status": "applied",
                    "error_message": "",
                },
            },
        ),
        OpampHistoryEntry(
            id=8,
            project_id=ID,
            instance_uid="0f" * 16,
            at=T + 1,
            changes=["effective_config"],
            details={"truncated": True, "bytes": 70000},
        ),
    ],
    EngineWorker: [
        EngineWorker(
            engine="celery",
            worker="w@host",
            agent_id=ID,
            last_seen=T,
            tasks=3,
            states={"failed": 1, "succeeded": 2},
        ),
        EngineWorker(
            engine="dramatiq", worker="host@42", agent_id=None, last_seen=T, tasks=0, states={}
        ),
    ],
    ScheduleRecord: [
        ScheduleRecord(
            project_id=ID,
            scheduler="huey-periodic",
            source_key="app.every5",
            engine="huey",
            name="every5",
            task_name="app.every5",
            kind="cron",
            expression="*/5 * * * *",
            timezone="UTC",
            queue=None,
            priority="normal",
            args=[1, "x"],
            kwargs={"k": None},
            is_enabled=True,
            last_run_at=None,
            next_run_at=T + 300,
            total_runs=0,
            external_id="app.every5",
            catch_up="skip",
            source="huey-periodic:code",
            source_hash=None,
            agent_id=ID,
            worker_id="w1",
            stream_id=str(ID),
            epoch_number=2,
            sequence=7,
            snapshot_id=None,
            updated_at=T,
        ),
    ],
}


def test_every_resource_has_samples() -> None:
    assert set(SAMPLES) == set(RESOURCES)


@pytest.mark.parametrize("resource", RESOURCES.values(), ids=lambda r: r.name)
def test_the_served_component_is_the_record(resource: Resource) -> None:
    schema = OPENAPI["components"]["schemas"][resource.name]
    assert schema == component(resource)
    fields = [a.name for a in attrs.fields(resource.cls) if a.name not in resource.hidden]
    extras = [x.name for x in resource.extra]
    assert sorted(schema["properties"]) == sorted(fields + extras)
    assert schema["required"] == list(schema["properties"])


@pytest.mark.parametrize("resource", RESOURCES.values(), ids=lambda r: r.name)
def test_the_json_matches_the_component(resource: Resource) -> None:
    validator_module = openapi_schema_validator
    schema = OPENAPI["components"]["schemas"][resource.name]
    for record in SAMPLES[resource.cls]:
        item = orjson.loads(orjson.dumps(to_json(record)))
        assert list(item) == list(schema["properties"])  # the same keys, in the same order
        validator_module.validate(
            item,
            schema,
            cls=validator_module.OAS30Validator,
            format_checker=validator_module.oas30_format_checker,
        )


def test_times_uuids_and_hidden_fields_on_the_wire() -> None:
    command = to_json(SAMPLES[CommandRecord][1])
    assert command["id"] == str(ID)
    assert command["created_at"] == "2025-12-06T05:46:40.250000+00:00"
    assert command["dispatched_at"] == "2025-12-06T05:46:41.250000+00:00"
    assert command["timeout_seconds"] == 5
    assert "delivery_claim_token" not in command
    worker = to_json(SAMPLES[WorkerInfo][0])
    assert worker["connected"] is True
    assert worker["instance_id"] == str(ID)
    assert "agent_id" not in worker
    assert to_json(SAMPLES[WorkerInfo][1])["connected"] is False
    instance = to_json(SAMPLES[InstanceInfo][0])
    assert instance["ingest_rate"] == 0.0  # a rate stays a number, not a time
    assert "buffer_id" not in instance


def test_an_agent_as_the_route_sends_it_matches_its_component() -> None:
    """The route fills in the project's name and the workers after the record."""
    validator_module = openapi_schema_validator
    item = _agent_json(SAMPLES[Agent][0], "p", [to_json(w) for w in SAMPLES[WorkerInfo]], 1e9)
    assert list(item) == [
        "id",
        "project_id",
        "project",
        "name",
        "revoked",
        "created_at",
        "workers",
        "last_seen",
        "versions",
        "token_grace_until",
    ]
    assert item["last_seen"] == max(w["last_seen"] for w in item["workers"])
    assert item["token_grace_until"] == "2001-09-09T01:46:40+00:00"
    assert item["created_at"] == "2025-12-06T05:46:40.250000+00:00"
    validator_module.validate(
        item,
        {**OPENAPI["components"]["schemas"]["Agent"], "components": OPENAPI["components"]},
        cls=validator_module.OAS30Validator,
        format_checker=validator_module.oas30_format_checker,
    )


def test_an_engine_worker_as_the_route_sends_it_matches_its_component() -> None:
    """The route adds its agent's workers and the controls they advertise for the engine."""
    validator_module = openapi_schema_validator
    item = engine_worker_json(SAMPLES[EngineWorker][0], SAMPLES[WorkerInfo])
    assert item["last_seen"] == "2025-12-06T05:46:40.250000+00:00"
    assert item["states"] == {"failed": 1, "succeeded": 2}
    assert item["agent_workers"] == [
        {"worker_id": "w1", "connected": True, "last_seen": "2025-12-06T05:46:40.250000+00:00"},
        {"worker_id": "w2", "connected": False, "last_seen": "2025-12-06T05:46:40.250000+00:00"},
    ]
    assert item["actions"] == []  # w2 advertises task actions only
    advertising = attrs.evolve(
        SAMPLES[WorkerInfo][0], capabilities={"celery": ["rate_limit", "pool_grow", "retry_task"]}
    )
    item = engine_worker_json(SAMPLES[EngineWorker][0], [advertising])
    assert item["actions"] == ["pool_grow", "rate_limit"]  # in WORKER_ACTIONS' order
    validator_module.validate(
        orjson.loads(orjson.dumps(item)),
        OPENAPI["components"]["schemas"]["EngineWorker"],
        cls=validator_module.OAS30Validator,
        format_checker=validator_module.oas30_format_checker,
    )


def test_a_large_event_body_is_left_out() -> None:
    event = SAMPLES[EventRecord][0]
    size = len(orjson.dumps(event.body))
    assert event_json(event)["body"] == event.body
    small = event_json(event, body_max_bytes=size - 1)
    assert (small["body"], small["body_bytes"], small["body_truncated"]) == (None, size, True)
    kept = event_json(event, body_max_bytes=size)
    assert (kept["body"], kept["body_truncated"]) == (event.body, False)


def test_a_field_added_to_the_record_reaches_json_and_openapi(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one edit: a new field on Command (here a subclass standing in for it)."""

    @attrs.frozen
    class Command(CommandRecord):
        priority: int | None = None
        deadline_at: float | None = None

    monkeypatch.setitem(RESOURCES, Command, attrs.evolve(RESOURCES[CommandRecord], cls=Command))
    record = Command(*attrs.astuple(SAMPLES[CommandRecord][0], recurse=False), 3, T)
    item = resources.to_json(record)
    assert (item["priority"], item["deadline_at"]) == (3, "2025-12-06T05:46:40.250000+00:00")
    properties = component(RESOURCES[Command])["properties"]
    assert properties["priority"] == {"type": "integer", "nullable": True}
    assert properties["deadline_at"] == {"type": "string", "format": "date-time", "nullable": True}
    assert list(item) == list(properties)


def test_an_opamp_agent_keeps_its_core_state_internal() -> None:
    """The route adds the project's name and ``online``; the state blob stays in."""
    item = opamp_agent_json(OPAMP_AGENT, "p", online=True)
    assert "state" not in item and "full_state_requests" not in item
    assert list(item)[:4] == ["project_id", "project", "instance_uid", "online"]
    assert item["last_seen"] == "2025-12-06T05:46:41.250000+00:00"
    openapi_schema_validator.validate(
        orjson.loads(orjson.dumps(item)),
        OPENAPI["components"]["schemas"]["OpampAgent"],
        cls=openapi_schema_validator.OAS30Validator,
        format_checker=openapi_schema_validator.oas30_format_checker,
    )

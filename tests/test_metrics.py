"""/metrics parses as Prometheus text, matches its reference in docs/operations.md
both ways (names, types, labels), follows Prometheus' conventions, and counts.

And /health/ready follows Postgres: not ready within 5 s of it stopping,
ready again within 5 s of its return.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import z4j.ingest
from z4j.config import Config
from z4j.protocol.agent import frames as f
from z4j.testing.agents import admin_token, provision, raw_agent
from z4j.testing.brain import http_get, make_config, running_brain, wait_until
from z4j.testing.http import http_request
from z4j.testing.postgres import PostgresCluster

OPERATIONS = Path(__file__).parent.parent / "docs" / "operations.md"
POSTGRES_ONLY = {"z4j_db_pool_connections", "z4j_db_pool_size", "z4j_db_pool_waiting"}
# Exposed only with Z4J_DATABASE_READ_URL: tests/test_read_replica.py checks them.
READ_REPLICA_ONLY = {
    "z4j_read_replica_serving",
    "z4j_read_replica_lag_seconds",
    "z4j_read_replica_reads_total",
    "z4j_read_replica_fallbacks_total",
}
# Labels the exposition adds to a family's samples: histogram buckets.
SAMPLE_LABELS = {"le"}


@attrs.frozen
class Documented:
    type: str
    labels: frozenset[str]


def documented_metrics() -> dict[str, Documented]:
    """The metrics table of docs/operations.md: name (counters with ``_total``) -> type, labels."""
    text = OPERATIONS.read_text(encoding="utf-8")
    table = text.split("<!-- metrics table")[1].split("<!-- end metrics table -->")[0]
    rows = re.findall(
        r"^\| `((?:z4j|process|python)_[a-z_]+)` \| (\w+) \|([^|]*)\|", table, flags=re.M
    )
    return {
        name: Documented(kind, frozenset(re.findall(r"`(\w+)`", labels)))
        for name, kind, labels in rows
    }


@attrs.frozen
class Exposed:
    families: dict[str, Documented]  # as documented: counters with ``_total``
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]]  # by sample name, labels


def exposed(text: str) -> Exposed:
    families: dict[str, Documented] = {}
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        labels = {k for sample in family.samples for k in sample.labels} - SAMPLE_LABELS
        name = family.name + ("_total" if family.type == "counter" else "")
        families[name] = Documented(family.type, frozenset(labels))
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return Exposed(families, samples)


SAMPLE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})?'
    r" (-?[0-9.e+-]+|[+-]Inf|NaN)$"
)
SUFFIXES = {
    "counter": ("",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}


def check_exposition(text: str) -> None:
    """The text format, read strictly: one HELP and TYPE per family before its
    samples, each sample line well formed and of a declared family, no series twice."""
    helped: set[str] = set()
    types: dict[str, str] = {}
    series: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in helped, line
            helped.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in helped and name not in types, line
            assert kind in SUFFIXES, line
            types[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name = match[1]
            assert any(
                name.removesuffix(suffix) in types
                and suffix in SUFFIXES[types[name.removesuffix(suffix)]]
                for suffix in ("", "_bucket", "_sum", "_count")
                if name.endswith(suffix)
            ), f"a sample of no declared family: {line!r}"
            key = line.rsplit(" ", 1)[0]
            assert key not in series, f"a series twice: {line!r}"
            series.add(key)


async def answer_commands(agent: Any) -> None:
    """Act as a worker: acknowledge and complete every command that arrives."""
    while True:
        frame = await agent.receive()
        if isinstance(frame.payload, f.Command):
            claim = frame.payload.delivery_claim_token
            await agent.send(f.CommandAck(delivery_claim_token=claim), frame_id=frame.id)
            await agent.send(
                f.CommandResult(status="success", delivery_claim_token=claim), frame_id=frame.id
            )


async def test_metrics_match_their_reference_and_the_conventions(config: Config) -> None:
    token, secret, agent_id = await provision(config)
    admin = await admin_token(config)
    bearer = {"Authorization": f"Bearer {admin}"}
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            client = await z4j.ingest.open_trio(*brain.ingest)
            async with client:
                assert await client.send_many([[{"t": "log"}, {"t": "log"}]]) == [True]
            async with raw_agent(http, token, secret) as agent, trio.open_nursery() as nursery:
                await agent.send(
                    f.EventBatch(
                        events=(f.AgentEvent(id="e1", kind="k", raw={"id": "e1", "kind": "k"}),)
                    ),
                    frame_id="b1",
                )
                assert isinstance((await agent.receive()).payload, f.EventBatchAck)
                await wait_until(lambda: brain.stats.drain_records_stored >= 3)
                nursery.start_soon(answer_commands, agent)
                body = orjson.dumps({"agent": str(agent_id), "action": "ping"})
                minted = await http_request(
                    http, "POST", "/api/v1/commands", body=body, headers=bearer
                )
                assert minted.status == 201
                command = minted.json()["id"]
                for path in (f"/api/v1/commands/{command}", "/api/v1/commands/not-a-uuid"):
                    await http_request(http, "GET", path, headers=bearer)
                await http_request(http, "GET", "/no/such/path")
                await http_request(http, "BREW", "/no/such/path")  # 405, an unusual method
                await http_request(http, "GET", "/login")  # a dashboard file
                await http_request(http, "DELETE", "/api/v1/commands")  # 405
                await wait_until(lambda: brain.stats.commands_finished["completed"] >= 1)
                status, text = await http_get(http, "/metrics")
                nursery.cancel_scope.cancel()
    assert status == 200
    check_exposition(text)
    found = exposed(text)
    documented = {k: v for k, v in documented_metrics().items() if k not in READ_REPLICA_ONLY}
    if not config.database_url:
        documented = {k: v for k, v in documented.items() if k not in POSTGRES_ONLY}
    assert documented.keys() == found.families.keys(), (
        f"documented only: {documented.keys() - found.families.keys()}; "
        f"exposed only: {found.families.keys() - documented.keys()}"
    )
    for name, family in found.families.items():
        assert family.type == documented[name].type, name
        if family.labels:  # a labelled family with no samples yet shows none
            assert family.labels == documented[name].labels, name

    # Prometheus' conventions: target labels stay Prometheus', rates stay PromQL's.
    for name, family in found.families.items():
        assert not family.labels & {"instance", "job"}, name
        assert not re.search(r"per_second|_rate$", name), name
    assert not any(name.startswith("z4j_process_") for name in found.families)

    s = found.samples
    assert s["z4j_ingest_payloads_total"][(("outcome", "ok"),)] == 1
    assert s["z4j_ingest_records_total"][()] == 2
    assert s["z4j_agent_sessions"][()] == 1
    assert s["z4j_agent_events_total"][()] == 1
    assert s["z4j_agent_frames_received_total"][(("type", "event_batch"),)] == 1
    assert s["z4j_agent_frames_received_total"][(("type", "hello"),)] == 1
    assert s["z4j_drain_records_total"][()] >= 3
    assert s["z4j_drain_batch_duration_seconds_count"][()] >= 1
    assert s["z4j_buffer_appended_rows_total"][()] >= 2
    assert s["z4j_buffer_completed_rows_total"][()] >= 2
    assert s["z4j_db_query_duration_seconds_count"][(("operation", "write_events"),)] >= 1
    assert s["z4j_db_query_duration_seconds_count"][(("operation", "create_command"),)] == 1
    assert s["z4j_command_dispatch_total"][(("route", "local"),)] == 1
    assert s["z4j_commands_finished_total"][(("state", "completed"),)] == 1
    assert s["z4j_commands_finished_total"][(("state", "failed"),)] == 0
    assert s["z4j_command_duration_seconds_count"][(("state", "completed"),)] == 1
    assert s["z4j_ready"][()] == 1
    assert s["z4j_ready_check"][(("check", "store"),)] == 1
    assert s["process_resident_memory_bytes"][()] > 10_000_000
    (build,) = s["z4j_build_info"]
    assert dict(build)["replica_id"] and dict(build)["version"]

    # Requests by route template, not by the path asked for.
    requests = {
        (labels["route"], labels["method"], labels["status"]): n
        for labels, n in ((dict(k), v) for k, v in s["z4j_http_requests_total"].items())
    }
    assert requests[("/api/v1/commands", "POST", "201")] == 1
    assert requests[("/api/v1/commands/{id}", "GET", "200")] == 1
    assert requests[("/api/v1/commands/{id}", "GET", "400")] == 1
    assert requests[("/api/v1/commands", "DELETE", "405")] == 1
    assert requests[("unmatched", "GET", "404")] == 1
    assert requests[("unmatched", "other", "405")] == 1
    assert requests[("/{file}", "GET", "200")] == 1
    assert not any(command in route for route, _, _ in requests)
    duration = s["z4j_http_request_duration_seconds_count"]
    assert duration[(("method", "POST"), ("route", "/api/v1/commands"))] == 1


async def test_ready_follows_postgres_within_five_seconds(
    tmp_path: Path, own_postgres: PostgresCluster
) -> None:
    config = make_config(tmp_path / "data", own_postgres.url)

    async def ready(brain_http: tuple[str, int]) -> tuple[int, dict[str, object]]:
        status, body = await http_get(brain_http, "/health/ready")
        return status, orjson.loads(body)

    with trio.fail_after(90):
        async with running_brain(config) as brain:
            await wait_until(lambda: brain.stats is not None)

            async def is_ready() -> bool:
                return (await ready(brain.addresses.http))[0] == 200

            await wait_until(is_ready, timeout=20)
            await trio.to_thread.run_sync(own_postgres.stop, "immediate")
            stopped = trio.current_time()

            async def not_ready() -> bool:
                return (await ready(brain.addresses.http))[0] == 503

            await wait_until(not_ready, timeout=5)
            assert trio.current_time() - stopped <= 5
            status, body = await ready(brain.addresses.http)
            assert status == 503
            checks = body["checks"]
            assert isinstance(checks, dict) and checks["store"] != "ok"
            assert checks["buffer"] == "ok"

            await trio.to_thread.run_sync(own_postgres.start)
            started = trio.current_time()
            await wait_until(is_ready, timeout=5)
            assert trio.current_time() - started <= 5


async def test_with_a_metrics_token_a_scrape_must_bring_it(tmp_path: Path) -> None:
    """Z4J_METRICS_TOKEN: /metrics (whose labels name tasks and queues) answers
    401 without the token or with another, and the metrics with it; health
    stays open for probes."""
    token = "m" * 40
    config = make_config(tmp_path / "data", metrics_token=token)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            for headers in (
                (),
                (("Authorization", "Bearer " + "x" * 40),),
                (("Authorization", f"Basic {token}"),),
                (("Authorization", f"Bearer {token}x"),),
            ):
                reply = await http_request(http, "GET", "/metrics", headers=headers)
                assert reply.status == 401, (headers, reply)
                assert b"z4j_" not in reply.body
                assert reply.headers.get("www-authenticate", "").startswith("Bearer")
            reply = await http_request(
                http, "GET", "/metrics", headers=(("Authorization", f"Bearer {token}"),)
            )
            assert reply.status == 200
            names = {family.name for family in text_string_to_metric_families(reply.body.decode())}
            assert "z4j_ready" in names
            status, _ = await http_get(http, "/health/live")
            assert status == 200


def test_a_metrics_token_is_at_least_32_characters(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 32 characters"):
        make_config(tmp_path / "data", metrics_token="short")

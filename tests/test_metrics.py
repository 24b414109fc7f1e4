"""/metrics parses as Prometheus text, carries every documented metric, and counts.

And /health/ready follows Postgres: not ready within 5 s of it stopping,
ready again within 5 s of its return.
"""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import trio
from prometheus_client.parser import text_string_to_metric_families

import z4j.ingest
from z4j.config import Config
from z4j.protocol.agent import frames as f
from z4j.testing.agents import provision, raw_agent
from z4j.testing.brain import http_get, make_config, running_brain, wait_until
from z4j.testing.postgres import PostgresCluster

OPERATIONS = Path(__file__).parent.parent / "docs" / "operations.md"
POSTGRES_ONLY = {"z4j_db_pool_connections", "z4j_db_pool_size", "z4j_db_pool_waiting"}


def documented_metrics() -> set[str]:
    text = OPERATIONS.read_text(encoding="utf-8")
    table = text.split("<!-- metrics table")[1].split("<!-- end metrics table -->")[0]
    return set(re.findall(r"^\| `(z4j_[a-z_]+)` \|", table, flags=re.M))


def exposed(text: str) -> tuple[set[str], dict[str, dict[tuple[tuple[str, str], ...], float]]]:
    """The metric names as documented (counters with ``_total``), and samples by name and labels."""
    names: set[str] = set()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return names, samples


async def test_metrics_parse_list_every_documented_metric_and_count(config: Config) -> None:
    token, secret, _ = await provision(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            client = await z4j.ingest.open_trio(*brain.ingest)
            async with client:
                assert await client.send_many([[{"t": "log"}, {"t": "log"}]]) == [True]
            async with raw_agent(brain.addresses.http, token, secret) as agent:
                await agent.send(
                    f.EventBatch(
                        events=(f.AgentEvent(id="e1", kind="k", raw={"id": "e1", "kind": "k"}),)
                    ),
                    frame_id="b1",
                )
                assert isinstance((await agent.receive()).payload, f.EventBatchAck)
                await wait_until(lambda: brain.stats.drain_records_stored >= 3)
                status, text = await http_get(brain.addresses.http, "/metrics")
    assert status == 200
    names, samples = exposed(text)
    expected = documented_metrics()
    if not config.database_url:
        expected -= POSTGRES_ONLY
    assert expected == names, (
        f"documented only: {expected - names}; exposed only: {names - expected}"
    )

    assert samples["z4j_ingest_payloads_total"][(("outcome", "ok"),)] == 1
    assert samples["z4j_ingest_records_total"][(("outcome", "ok"),)] == 2
    assert samples["z4j_agent_sessions"][()] == 1
    assert samples["z4j_agent_events_total"][()] == 1
    assert samples["z4j_agent_frames_received_total"][(("type", "event_batch"),)] == 1
    assert samples["z4j_agent_frames_received_total"][(("type", "hello"),)] == 1
    assert samples["z4j_drain_records_total"][()] >= 3
    assert samples["z4j_drain_batch_duration_seconds_count"][()] >= 1
    assert samples["z4j_db_query_duration_seconds_count"][()] >= 1
    assert samples["z4j_process_resident_memory_bytes"][()] > 10_000_000


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

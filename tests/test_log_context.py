"""JSON logs of a running brain: the context of each line, the access log,
and per-logger levels.

Every test reads what a brain really wrote: one in this process, logging
through `configure_logging` to a captured stderr, or ``z4j brain`` in its
own process. Lines are parsed as JSON, one object each.
"""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

import z4j.ingest
from z4j.logs import configure_logging, log_context, parse_log_levels
from z4j.protocol.agent import frames as f
from z4j.testing.agents import provision, raw_agent
from z4j.testing.brain import BrainProcess, make_config, run_z4j, running_brain, wait_until
from z4j.testing.http import http_request


class Captured:
    """What the root logger's JSON handler wrote, parsed line by line."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.stream.getvalue().splitlines()]

    def find(self, logger: str, contains: str = "") -> list[dict[str, Any]]:
        return [e for e in self.lines() if e["logger"] == logger and contains in e["message"]]


@pytest.fixture
def json_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Captured]:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    touched = ["hypercorn", "z4j.http.access", "z4j.ingest"]
    levels = {name: logging.getLogger(name).level for name in touched}
    try:
        # Here, in the fixture: pytest gives the test's own phase a stderr of its own.
        configure_logging("INFO", "json")
        yield Captured(stream)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for name, old in levels.items():
            logging.getLogger(name).setLevel(old)


async def test_an_agent_connection_line_carries_agent_worker_project_and_peer(
    tmp_path: Path, json_logs: Captured
) -> None:
    config = make_config(tmp_path / "data")
    token, secret, agent_id = await provision(config)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            async with raw_agent(brain.addresses.http, token, secret, worker_id="w-7", prove=True):
                await wait_until(lambda: json_logs.find("z4j.agents", "connected"))
            await wait_until(lambda: json_logs.find("z4j.agents", "disconnected"))
    for line in json_logs.find("z4j.agents", "connected"):  # both, and nothing else needed
        assert line["agent"] == str(agent_id)
        assert line["worker"] == "w-7"
        assert len(line["project"]) == 36  # a UUID
        host, _, port = line["peer"].rpartition(":")
        assert host == "127.0.0.1" and port.isdigit()
        assert "request_id" not in line  # a WebSocket session is not a request
    # A line of the brain's own, not a peer's, carries no peer context.
    (ready,) = json_logs.find("z4j.brain", "ready:")
    assert not {"peer", "agent", "worker", "project"} & ready.keys()


async def test_an_http_line_carries_the_request_id_and_peer(
    tmp_path: Path, json_logs: Captured
) -> None:
    config = make_config(tmp_path / "data")
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            reply = await http_request(
                brain.addresses.http,
                "POST",
                "/api/v1/session",
                body=b'{"token": "z4j_admin_not-a-token"}',
                headers={"X-Request-ID": "req-42.a", "Content-Type": "application/json"},
            )
            fresh = await http_request(brain.addresses.http, "GET", "/health/live")
            junk = await http_request(
                brain.addresses.http, "GET", "/health/live", headers={"X-Request-ID": "a b\x7f"}
            )
    assert reply.status == 401
    assert reply.headers["x-request-id"] == "req-42.a"  # a proxy's id, passed through
    assert len(fresh.headers["x-request-id"]) == 32  # made here when none came
    assert len(junk.headers["x-request-id"]) == 32  # junk is not echoed
    (warning,) = json_logs.find("z4j.auth", "failed sign-in from")
    assert warning["request_id"] == "req-42.a"
    assert warning["peer"].startswith("127.0.0.1:")
    assert warning["level"] == "WARNING"
    # The access log is off by default.
    assert json_logs.find("z4j.http.access") == []


async def test_the_access_log_has_one_structured_line_per_request(
    tmp_path: Path, json_logs: Captured
) -> None:
    config = make_config(tmp_path / "data", http_access_log=True)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            live = await http_request(
                brain.addresses.http, "GET", "/health/live", headers={"X-Request-ID": "probe-1"}
            )
            missing = await http_request(brain.addresses.http, "GET", "/no/such/page")
            posted = await http_request(
                brain.addresses.http,
                "POST",
                "/api/v1/session",
                body=b"{}",
                headers={"Content-Type": "application/json"},
            )
            await wait_until(lambda: len(json_logs.find("z4j.http.access")) == 3)
    lines = json_logs.find("z4j.http.access")
    by_path = {line["path"]: line for line in lines}
    assert set(by_path) == {"/health/live", "/no/such/page", "/api/v1/session"}
    probe = by_path["/health/live"]
    assert probe["method"] == "GET"
    assert probe["status"] == 200
    assert probe["bytes"] == len(live.body)
    assert isinstance(probe["duration_ms"], float) and probe["duration_ms"] >= 0
    assert probe["request_id"] == "probe-1"
    assert probe["peer"].startswith("127.0.0.1:")
    assert probe["level"] == "INFO"
    assert probe["message"].startswith("GET /health/live 200 ")
    assert by_path["/no/such/page"]["status"] == missing.status
    assert by_path["/api/v1/session"]["method"] == "POST"
    assert by_path["/api/v1/session"]["status"] == posted.status == 400
    assert by_path["/api/v1/session"]["bytes"] == len(posted.body)
    # Each request its own id.
    assert len({line["request_id"] for line in lines}) == 3


def test_per_logger_levels_are_honoured_by_a_brain_process(tmp_path: Path) -> None:
    env = {
        "Z4J_DATA_DIR": str(tmp_path / "data"),
        "Z4J_INGEST_BIND": "127.0.0.1:0",
        "Z4J_HTTP_BIND": "127.0.0.1:0",
        "Z4J_LOG_FORMAT": "json",
        "Z4J_LOG_LEVEL": "INFO",
        # Louder than the root for one logger, quieter for two others.
        "Z4J_LOG_LEVELS": "z4j.drain=debug, z4j.ingest=WARNING,z4j.http.access=ERROR",
        "Z4J_HTTP_ACCESS_LOG": "true",
        "Z4J_DRAIN_LINGER_MS": "0",
    }
    brain = BrainProcess(env, log_path=tmp_path / "brain.log")
    try:
        with z4j.ingest.connect(*brain.ingest) as client:
            client.send([{"t": "log", "message": "hello"}])
        deadline = time.monotonic() + 30
        while "stored a batch" not in brain.log_text():  # the drain's DEBUG line
            assert time.monotonic() < deadline, brain.log_text()[-3000:]
            time.sleep(0.05)
        assert trio.run(_get, brain.http, "/health/live") == 200
    finally:
        brain.stop()
    lines = [orjson.loads(line) for line in brain.log_text().splitlines() if line.strip()]
    loggers = {(line["logger"], line["level"]) for line in lines}
    assert ("z4j.drain", "DEBUG") in loggers  # louder than the root
    assert ("z4j.http", "INFO") in loggers  # the root's level for the rest
    assert not any(name == "z4j.ingest" for name, _ in loggers)  # "ingest listening" is INFO
    assert not any(name == "z4j.http.access" for name, _ in loggers)  # INFO, under ERROR
    assert not any(level == "DEBUG" for name, level in loggers if name != "z4j.drain")


async def _get(address: tuple[str, int], path: str) -> int:
    return (await http_request(address, "GET", path)).status


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("z4j.drain=LOUD", "level of 'z4j.drain' must be one of DEBUG, INFO"),
        ("z4j.drain", "must be LOGGER=LEVEL pairs"),
        ("=DEBUG", "must be LOGGER=LEVEL pairs"),
    ],
)
def test_a_bad_level_spec_is_a_clear_configuration_error(spec: str, says: str) -> None:
    result = run_z4j("config", env={"Z4J_LOG_LEVELS": spec})
    assert result.returncode == 2
    assert result.stderr.startswith("z4j: configuration error: Z4J_LOG_LEVELS: ")
    assert says in result.stderr


def test_level_specs_parse_case_and_spaces_alike() -> None:
    assert parse_log_levels(" z4j.drain=debug , hypercorn=WARNING,") == {
        "z4j.drain": "DEBUG",
        "hypercorn": "WARNING",
    }


def test_context_nests_and_an_extra_field_wins(json_logs: Captured) -> None:
    log = logging.getLogger("z4j.test")
    with log_context(peer="10.0.0.1:5", agent="a"):
        with log_context(worker="w"):
            log.info("inner", extra={"command_id": "c-1", "agent": "b"})
        log.info("outer")
    log.info("none")
    inner, outer, none = json_logs.find("z4j.test")
    assert (inner["peer"], inner["agent"], inner["worker"], inner["command_id"]) == (
        "10.0.0.1:5",
        "b",
        "w",
        "c-1",
    )
    assert "worker" not in outer and outer["agent"] == "a"
    assert not {"peer", "agent"} & none.keys()
    with pytest.raises(ValueError, match="not log context fields"):
        with log_context(user="x"):
            pass


async def test_an_ingest_line_carries_the_peer(tmp_path: Path, json_logs: Captured) -> None:
    config = make_config(tmp_path / "data")
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            async with await z4j.ingest.open_trio(*brain.ingest) as client:
                with pytest.raises(z4j.ingest.IngestRejected):
                    await client.send(b'{"not": "an array"}')
                await wait_until(lambda: json_logs.find("z4j.ingest", "rejected"))
    (line,) = json_logs.find("z4j.ingest", "rejected")
    assert line["peer"].startswith("127.0.0.1:")
    assert "not_array" in line["message"]


async def test_a_command_line_carries_the_command_id(tmp_path: Path, json_logs: Captured) -> None:
    config = make_config(tmp_path / "data")
    _, _, agent_id = await provision(config)
    token, secret, mallory_id = await provision(config, project="other", agent="mallory")
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            record = await brain.addresses.commands.send(agent_id, "ping")
            async with raw_agent(
                brain.addresses.http, token, secret, worker_id="m-1", prove=True
            ) as agent:
                # Another agent answers a command that is not its own: refused, logged.
                await agent.send(
                    f.CommandResult(status="failed", error="mine now"), frame_id=str(record.id)
                )
                await wait_until(lambda: json_logs.find("z4j.commands", "refused"))
    (line,) = json_logs.find("z4j.commands", "refused")
    assert line["command_id"] == str(record.id)
    assert (line["agent"], line["worker"]) == (str(mallory_id), "m-1")
    assert line["peer"].startswith("127.0.0.1:")

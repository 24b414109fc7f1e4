"""The REST API over real HTTP: sign-in, every route, bad input, and a schemathesis run.

The schemathesis run generates requests from our OpenAPI document and
checks that none gets a 500 and every response matches the document.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import trio

import z4j.ingest
from z4j.auth import Auth
from z4j.brain import check_bind_is_safe
from z4j.config import Config, ConfigError
from z4j.store import store_for
from z4j.testing.agents import admin_token, provision, raw_agent
from z4j.testing.brain import make_config, running_brain, wait_until


async def call(
    address: tuple[str, int],
    method: str,
    path: str,
    *,
    body: Any = None,
    token: str | None = None,
    cookie: str | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request on a fresh connection: (status, headers, parsed JSON or None)."""
    payload = b"" if body is None else (body if isinstance(body, bytes) else orjson.dumps(body))
    head = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close"]
    head.append(f"Content-Length: {len(payload)}")
    if token:
        head.append(f"Authorization: Bearer {token}")
    if cookie:
        head.append(f"Cookie: {cookie}")
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    raw_head, _, raw_body = data.partition(b"\r\n\r\n")
    lines = raw_head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, orjson.loads(raw_body) if raw_body else None


async def test_sign_in_with_a_token_or_a_session_and_out_again(config: Config) -> None:
    token = await admin_token(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            status, _, body = await call(http, "GET", "/api/v1/instances")
            assert status == 401 and body["error"] == "unauthorized"
            assert (await call(http, "GET", "/api/v1/instances", token="z4j_admin_nope"))[0] == 401
            assert (await call(http, "GET", "/api/v1/instances", token=token))[0] == 200
            # The dashboard page is not readable without signing in.
            status, headers, _ = await call(http, "GET", "/")
            assert status == 303 and headers["location"] == "/login"

            status, _, body = await call(http, "POST", "/api/v1/session", body={"token": "bad"})
            assert status == 401
            status, _, body = await call(http, "POST", "/api/v1/session", body=b"{nope")
            assert status == 400 and body["error"] == "bad_json"
            status, headers, _ = await call(http, "POST", "/api/v1/session", body={"token": token})
            assert status == 204
            cookie = headers["set-cookie"].split(";")[0]
            assert (
                "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
            )
            assert (await call(http, "GET", "/api/v1/projects", cookie=cookie))[0] == 200
            assert (await call(http, "DELETE", "/api/v1/session", cookie=cookie))[0] == 204
            assert (await call(http, "GET", "/api/v1/projects", cookie=cookie))[0] == 401


async def test_instances_agents_and_events_with_filters_and_pages(config: Config) -> None:
    token = await admin_token(config)
    agent_token, secret, agent_id = await provision(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            client = await z4j.ingest.open_trio(*brain.ingest)
            async with client:
                for n in range(5):
                    kind = "deploy" if n % 2 else "log"
                    assert await client.send_many([[{"t": kind, "n": n}]]) == [True]
            async with raw_agent(http, agent_token, secret, worker_id="w-7"):
                await wait_until(lambda: brain.stats.drain_records_stored >= 5)
                _, _, agents = await call(http, "GET", "/api/v1/agents", token=token)
                [agent] = agents["items"]
                assert agent["id"] == str(agent_id) and agent["project"] == "demo"
                assert [(w["worker_id"], w["connected"]) for w in agent["workers"]] == [
                    ("w-7", True)
                ]
                status, _, one = await call(http, "GET", f"/api/v1/agents/{agent_id}", token=token)
                assert status == 200 and one == agent

            _, _, instances = await call(http, "GET", "/api/v1/instances", token=token)
            assert [i["id"] for i in instances["items"]] == [str(brain.addresses.instance_id)]

            _, _, page1 = await call(http, "GET", "/api/v1/events?limit=3", token=token)
            assert [e["body"]["n"] for e in page1["items"]] == [4, 3, 2]
            cursor = page1["next_cursor"]
            _, _, page2 = await call(
                http, "GET", f"/api/v1/events?limit=3&cursor={cursor}", token=token
            )
            assert [e["body"]["n"] for e in page2["items"]] == [1, 0]
            assert page2["next_cursor"] is None
            _, _, deploys = await call(http, "GET", "/api/v1/events?kind=deploy", token=token)
            assert [e["body"]["n"] for e in deploys["items"]] == [3, 1]
            _, _, none = await call(http, "GET", "/api/v1/events?since=2999-01-01", token=token)
            assert none["items"] == []

            for bad in ("limit=0", "limit=x", "agent_id=nope", "since=yesterday", "cursor=zz"):
                status, _, body = await call(http, "GET", f"/api/v1/events?{bad}", token=token)
                assert status == 400 and body["error"] == "bad_request", bad
            status, _, body = await call(http, "GET", f"/api/v1/agents/{'0' * 8}", token=token)
            assert status == 400
            assert (await call(http, "PUT", "/api/v1/events", token=token))[0] == 405
            assert (await call(http, "GET", "/api/v1/nothing", token=token))[0] == 404


async def test_commands_create_list_get_cancel_and_audit(config: Config) -> None:
    token = await admin_token(config)
    _, _, agent_id = await provision(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            new = {"agent": str(agent_id), "action": "ping", "parameters": {"n": 1}}
            status, _, command = await call(http, "POST", "/api/v1/commands", body=new, token=token)
            assert status == 201 and command["state"] == "pending"  # no worker is live
            assert command["issued_by"] == "api" and command["parameters"] == {"n": 1}
            path = f"/api/v1/commands/{command['id']}"
            assert (await call(http, "GET", path, token=token))[2] == command
            _, _, listed = await call(http, "GET", "/api/v1/commands?state=pending", token=token)
            assert [c["id"] for c in listed["items"]] == [command["id"]]
            status, _, cancelled = await call(http, "POST", path + "/cancel", token=token)
            assert status == 200 and cancelled["state"] == "cancelled"
            status, _, body = await call(http, "POST", path + "/cancel", token=token)
            assert status == 409 and body["error"] == "already_final"

            for bad, code in [
                ({"action": "ping"}, 400),
                ({"agent": str(agent_id), "action": ""}, 400),
                ({"agent": str(agent_id), "action": "x", "timeout_seconds": 0}, 400),
                ({"agent": str(agent_id), "action": "x", "parameters": []}, 400),
                ({"agent": "no-such-agent", "action": "x"}, 404),
            ]:
                status, _, _ = await call(http, "POST", "/api/v1/commands", body=bad, token=token)
                assert status == code, bad
            status, _, _ = await call(
                http, "POST", "/api/v1/commands", body=b"x" * (1024 * 1024 + 1), token=token
            )
            assert status == 413

            _, _, audit = await call(http, "GET", "/api/v1/audit?limit=2", token=token)
            assert [a["action"] for a in audit["items"]] == ["command.cancelled", "command.created"]


def test_serving_beyond_loopback_needs_a_chosen_secret(tmp_path: Path) -> None:
    check_bind_is_safe(make_config(tmp_path, http_bind="127.0.0.1:0"))
    check_bind_is_safe(make_config(tmp_path, http_bind="[::1]:0"))
    check_bind_is_safe(make_config(tmp_path, http_bind="0.0.0.0:0", secret="s" * 32))
    with pytest.raises(ConfigError, match=r"Z4J_HTTP_BIND=0\.0\.0\.0:0 is reachable beyond"):
        check_bind_is_safe(make_config(tmp_path, http_bind="0.0.0.0:0"))


@pytest.mark.skipif(
    shutil.which("schemathesis") is None, reason="schemathesis is a test dependency"
)
async def test_schemathesis_finds_no_500_and_no_response_off_the_document(
    config: Config, tmp_path: Path
) -> None:
    token = await admin_token(config)
    _, _, agent_id = await provision(config)
    with trio.fail_after(600):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            base = f"http://{http[0]}:{http[1]}/api/v1"
            client = await z4j.ingest.open_trio(*brain.ingest)
            async with client:
                assert await client.send_many([[{"t": "log", "n": n}] for n in range(3)])
            new = {"agent": str(agent_id), "action": "ping"}
            assert (await call(http, "POST", "/api/v1/commands", body=new, token=token))[0] == 201
            result = await trio.run_process(
                [
                    shutil.which("schemathesis") or "schemathesis",
                    "run",
                    f"{base}/openapi.json",
                    "--url",
                    base,
                    "-H",
                    f"Authorization: Bearer {token}",
                    "--checks",
                    "not_a_server_error,response_schema_conformance,"
                    "content_type_conformance,status_code_conformance",
                    "--max-examples",
                    "25",
                    "--generation-database",
                    "none",
                    "--no-color",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, output[-6000:]
    assert " passed" in output and "failed" not in output.split("SUMMARY")[-1], output[-3000:]


async def test_brains_starting_together_on_a_fresh_store_make_one_admin_token(
    config: Config,
) -> None:
    """Each brain checks for an admin token at start and makes the first one:
    started together (`--instances`, replicas), exactly one of them does."""
    stores = [store_for(config) for _ in range(4)]  # a connection each, as processes
    with trio.fail_after(30):
        try:
            await stores[0].migrate()
            made: list[str | None] = []

            async def start(store: Any) -> None:
                made.append(await Auth(store, b"m" * 32).ensure_admin_token())

            async with trio.open_nursery() as nursery:
                for store in stores:
                    nursery.start_soon(start, store)
            assert len([t for t in made if t is not None]) == 1
            assert _api_token_rows(config) == 1
            assert await Auth(stores[1], b"m" * 32).ensure_admin_token() is None
        finally:
            for store in stores:
                await store.aclose()


def _api_token_rows(config: Config) -> int:
    """Rows in api_tokens, counted on a connection outside the stores under test."""
    if config.database_url is not None:
        with psycopg.connect(config.database_url) as conn:
            row = conn.execute("SELECT count(*) FROM api_tokens").fetchone()
    else:
        with contextlib.closing(sqlite3.connect(config.sqlite_store_path)) as db:
            row = db.execute("SELECT count(*) FROM api_tokens").fetchone()
    assert row is not None
    return int(row[0])

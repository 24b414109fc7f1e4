"""The REST API over real HTTP: sign-in, every route, bad input, and a schemathesis run.

The schemathesis run generates requests from our OpenAPI document and
checks that none gets a 500 and every response matches the document.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import trio

import z4j.brain.http.api
import z4j.brain.http.events_api
import z4j.ingest
from z4j import keys
from z4j.brain.commands import Commands
from z4j.brain.http.api import Api
from z4j.brain.http.auth import SETUP_LINK_FILE, Auth, SignInThrottle, announce_setup
from z4j.config import Config, ConfigError, check_bind_is_safe
from z4j.store import Store, StoreUnavailable, store_for
from z4j.store.base import User
from z4j.testing.agents import admin_token, provision, raw_agent
from z4j.testing.brain import make_config, running_brain, wait_until
from z4j.testing.http import http_request
from z4j.testing.schedules import (
    answer_activation,
    publish_events,
    schedule_row,
    snapshot_events,
)

OWNER = "huey-periodic"


async def call(
    address: tuple[str, int],
    method: str,
    path: str,
    *,
    body: Any = None,
    token: str | None = None,
    cookie: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request on a fresh connection: (status, headers, parsed JSON or None).

    A JSON body is sent as application/json unless ``headers`` say otherwise.
    Set-Cookie headers are joined with a newline."""
    payload = b"" if body is None else (body if isinstance(body, bytes) else orjson.dumps(body))
    extra = dict(headers or {})
    if body is not None and not any(k.lower() == "content-type" for k in extra):
        extra["Content-Type"] = "application/json"
    if token:
        extra["Authorization"] = f"Bearer {token}"
    if cookie:
        extra["Cookie"] = cookie
    reply = await http_request(address, method, path, body=payload, headers=extra)
    return reply.status, dict(reply.headers), reply.json()


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
            status, headers, body = await call(
                http, "POST", "/api/v1/session", body={"token": token}
            )
            assert status == 200 and set(body) == {"csrf_token", "expires_in"}
            session_cookie, csrf_cookie = headers["set-cookie"].split("\n")
            cookie = session_cookie.split(";")[0]
            assert "HttpOnly" in session_cookie and "SameSite=Strict" in session_cookie
            assert "Secure" not in session_cookie  # plain HTTP: a Secure cookie would be lost
            assert csrf_cookie.split(";")[0] == f"z4j_csrf={body['csrf_token']}"
            assert (await call(http, "GET", "/api/v1/projects", cookie=cookie))[0] == 200
            csrf = {"X-CSRF-Token": body["csrf_token"], "Content-Type": "application/json"}
            assert (await call(http, "DELETE", "/api/v1/session", cookie=cookie, headers=csrf))[
                0
            ] == 204
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
            async with raw_agent(http, agent_token, secret, worker_id="w-7", prove=True):
                await wait_until(lambda: brain.stats.drain_records_stored >= 5)
                _, _, agents = await call(http, "GET", "/api/v1/agents", token=token)
                [agent] = agents["items"]
                assert agent["id"] == str(agent_id) and agent["project"] == "demo"
                assert [(w["worker_id"], w["connected"]) for w in agent["workers"]] == [
                    ("w-7", True)
                ]
                status, _, one = await call(http, "GET", f"/api/v1/agents/{agent_id}", token=token)

                # The same agent, but for when it was last seen: its live worker
                # may have been heard from between the two reads.
                def steady(a: dict[str, Any]) -> dict[str, Any]:
                    workers = [{**w, "last_seen": None} for w in a["workers"]]
                    return {**a, "last_seen": None, "workers": workers}

                assert status == 200 and steady(one) == steady(agent)

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
            assert command["issued_by"] == "token:test" and command["parameters"] == {"n": 1}
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
    agent_token, secret, agent_id = await provision(config)
    with trio.fail_after(600):
        async with (
            running_brain(config) as brain,
            raw_agent(
                brain.addresses.http,
                agent_token,
                secret,
                prove=True,
                capabilities={OWNER: ["external_schedule_stable_snapshot_v1", "trigger_now"]},
                schedulers=(OWNER,),
                runtime_features=("external_schedule_protocol_v1",),
            ) as agent,
        ):
            http = brain.addresses.http
            base = f"http://{http[0]}:{http[1]}/api/v1"
            client = await z4j.ingest.open_trio(*brain.ingest)
            async with client:
                assert await client.send_many([[{"t": "log", "n": n}] for n in range(3)])
            new = {"agent": str(agent_id), "action": "ping"}
            assert (await call(http, "POST", "/api/v1/commands", body=new, token=token))[0] == 201
            # Schedules too, published by a scheduler the brain activated.
            grant = await answer_activation(agent)
            rows = [schedule_row(OWNER, f"app.job{n}", is_enabled=n != 1) for n in range(3)]
            await publish_events(agent, snapshot_events(grant, 1, rows))

            async def schedules_listed() -> bool:
                _, _, body = await call(http, "GET", "/api/v1/schedules", token=token)
                return len(body["items"]) == 3

            await wait_until(schedules_listed)
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
                    # It would revoke its own token (GET /tokens?all=true links to
                    # it) and leave the rest untested: test_accounts_api.py covers it.
                    "--exclude-operation-id",
                    "revokeToken",
                    # A federation token's routes, which refuse every user (403):
                    # test_federation_api.py checks their answers against the document.
                    "--exclude-path-regex",
                    "^/federation/peer/",
                    "--no-color",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, output[-6000:]
    assert " passed" in output and "failed" not in output.split("SUMMARY")[-1], output[-3000:]


# -- browser-facing hardening: CSRF, cookies, revocation, sign-in throttle -------------------


async def _sign_in(http: tuple[str, int], token: str) -> tuple[str, str]:
    """(the session cookie as a Cookie header value, the CSRF token)."""
    status, headers, body = await call(http, "POST", "/api/v1/session", body={"token": token})
    assert status == 200, body
    return headers["set-cookie"].split(";")[0], body["csrf_token"]


async def test_cookie_writes_need_json_the_csrf_token_and_no_foreign_origin(
    config: Config,
) -> None:
    """A foreign page can make a browser send the cookie with a text/plain form
    POST (no preflight): such writes must be refused, while the dashboard's
    own JSON request with the session's CSRF token goes through."""
    token = await admin_token(config)
    _, _, agent_id = await provision(config)
    new = {"agent": str(agent_id), "action": "ping"}
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            host = f"{http[0]}:{http[1]}"
            cookie, csrf = await _sign_in(http, token)

            async def post(headers: dict[str, str]) -> tuple[int, Any]:
                status, _, body = await call(
                    http, "POST", "/api/v1/commands", body=new, cookie=cookie, headers=headers
                )
                return status, body

            form = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
            assert (await post({**form, "X-CSRF-Token": csrf}))[0] == 415
            assert (await post({"Content-Type": "text/plain", "X-CSRF-Token": csrf}))[0] == 415
            status, body = await post({"Origin": "http://evil.example", "X-CSRF-Token": csrf})
            assert (status, body["error"]) == (403, "foreign_origin")
            status, body = await post({})  # JSON, but no CSRF token
            assert (status, body["error"]) == (403, "csrf")
            altered = csrf[:-1] + ("A" if csrf[-1] != "A" else "B")  # never the token itself
            assert (await post({"X-CSRF-Token": altered}))[0] == 403
            _, other_csrf = await _sign_in(http, token)  # another session's token
            assert (await post({"X-CSRF-Token": other_csrf}))[0] == 403
            _, _, commands = await call(http, "GET", "/api/v1/commands", token=token)
            assert commands["items"] == []  # none of those was processed
            status, _ = await post({"X-CSRF-Token": csrf, "Origin": f"http://{host}", "Host": host})
            assert status == 201
            # Cancelling (no body) is a write too.
            _, _, commands = await call(http, "GET", "/api/v1/commands", token=token)
            cancel = f"/api/v1/commands/{commands['items'][0]['id']}/cancel"
            assert (await call(http, "POST", cancel, cookie=cookie))[0] == 415
            ok = {"Content-Type": "application/json", "X-CSRF-Token": csrf}
            assert (await call(http, "POST", cancel, cookie=cookie, headers=ok))[0] == 200
            # Signing in from a form or a foreign page is refused too (login CSRF).
            status, _, _ = await call(
                http, "POST", "/api/v1/session", body={"token": token}, headers=form
            )
            assert status == 415
            status, _, _ = await call(
                http,
                "POST",
                "/api/v1/session",
                body={"token": token},
                headers={"Origin": "http://evil.example"},
            )
            assert status == 403
            # So is signing a browser out from elsewhere.
            assert (await call(http, "DELETE", "/api/v1/session", cookie=cookie))[0] == 415
            assert (await call(http, "GET", "/api/v1/projects", cookie=cookie))[0] == 200


async def test_revoking_a_token_ends_its_sessions_at_once(config: Config) -> None:
    """A session carries its token: `z4j admin token revoke` ends it on the next request."""
    keep = await admin_token(config, name="keep")
    gone = await admin_token(config, name="gone")
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            cookie, _ = await _sign_in(http, gone)
            kept_cookie, _ = await _sign_in(http, keep)
            assert (await call(http, "GET", "/api/v1/projects", cookie=cookie))[0] == 200
            result = await trio.run_process(
                [sys.executable, "-m", "z4j", "admin", "token", "revoke", "gone"],
                env=_cli_env(config),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            assert (await call(http, "GET", "/api/v1/projects", cookie=cookie))[0] == 401
            assert (await call(http, "GET", "/api/v1/projects", token=gone))[0] == 401
            assert (await call(http, "GET", "/", cookie=cookie))[0] == 303
            assert (await call(http, "GET", "/api/v1/projects", cookie=kept_cookie))[0] == 200


def _cli_env(config: Config) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("Z4J_")}
    env["Z4J_DATA_DIR"] = str(config.data_dir)
    if config.database_url is not None:
        env["Z4J_DATABASE_URL"] = config.database_url
    return env


async def test_failed_sign_ins_are_throttled_per_address_and_logged(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    token = await admin_token(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            with caplog.at_level(logging.WARNING, logger="z4j.auth"):
                for _ in range(10):
                    status, _, _ = await call(
                        http, "POST", "/api/v1/session", body={"token": "z4j_admin_guess"}
                    )
                    assert status == 401
                status, headers, body = await call(
                    http, "POST", "/api/v1/session", body={"token": token}
                )
    assert (status, body["error"]) == (429, "too_many_attempts")
    assert 1 <= int(headers["retry-after"]) <= 60
    logged = [r.getMessage() for r in caplog.records if r.name == "z4j.auth"]
    logged = [line for line in logged if "sign-in" in line]  # not the setup link's line
    assert len(logged) == 2 and all("127.0.0.1" in line for line in logged), logged


def test_the_sign_in_throttle_forgets_after_its_window_and_stays_bounded() -> None:
    now = [0.0]
    throttle = SignInThrottle(max_failures=3, window=60, max_sources=100, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.retry_after("a") is None
        throttle.failed("a")
    assert throttle.retry_after("a") == 60
    now[0] = 30.5
    assert throttle.retry_after("a") == 30
    now[0] = 60.0
    assert throttle.retry_after("a") is None
    for n in range(1000):
        throttle.failed(f"10.0.{n // 256}.{n % 256}")
    assert len(throttle._sources) == 100


async def test_the_session_cookie_is_secure_over_tls(tmp_path: Path) -> None:
    """Behind TLS (scope scheme https) the cookies get Secure: never sent back in clear."""
    config = make_config(tmp_path)
    token = await admin_token(config)
    store = store_for(config)
    try:
        api = Api(store, cast(Commands, None), Auth(store, keys.master_secret(config)))
        for scheme, secure in (("https", True), ("http", False)):
            status, headers, _ = await asgi(
                api, "POST", "/api/v1/session", body={"token": token}, scheme=scheme
            )
            cookies = [v.decode() for k, v in headers if k == b"set-cookie"]
            assert status == 200 and len(cookies) == 2
            assert all(("; Secure" in c) is secure for c in cookies), cookies
    finally:
        await store.aclose()


async def asgi(
    app: Any,
    method: str,
    path: str,
    *,
    body: Any = None,
    scheme: str = "http",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, list[tuple[bytes, bytes]], Any]:
    """Call an ASGI app in memory: (status, headers, parsed JSON or None)."""
    payload = b"" if body is None else orjson.dumps(body)
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "scheme": scheme,
        "query_string": b"",
        "client": ("192.0.2.1", 50000),
        "headers": [(b"host", b"x"), (b"content-type", b"application/json"), *(headers or [])],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": payload, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, response = sent
    raw = response["body"]
    return start["status"], start["headers"], orjson.loads(raw) if raw else None


async def test_store_errors_reach_the_log_not_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 503 body must not show file paths or libpq's host and user to callers."""
    detail = "sqlite store /srv/secret/store.sqlite3: disk I/O error (user=z4j host=db)"

    class Down:
        async def api_token_known(self, token_hash: bytes) -> bool:
            return True

        async def api_token_used(self, token_hash: bytes, *, now: float) -> None:
            pass

        async def list_api_tokens(self) -> list[Any]:
            return []

        async def list_projects(self) -> list[Any]:
            raise StoreUnavailable(detail)

    store = cast(Store, Down())
    api = Api(store, cast(Commands, None), Auth(store, b"m" * 32))
    auth = [(b"authorization", b"Bearer z4j_admin_x")]
    with caplog.at_level(logging.WARNING, logger="z4j.api"):
        for _ in range(3):
            status, _, body = await asgi(api, "GET", "/api/v1/projects", headers=auth)
            assert status == 503 and body["error"] == "store_unavailable"
            assert "/srv" not in body["message"] and "user" not in body["message"]
    logged = [r.getMessage() for r in caplog.records if r.name == "z4j.api"]
    assert len(logged) == 1 and detail in logged[0]  # in the log, once (throttled)


async def test_event_listings_cap_each_body_and_the_page(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored records can be large: a listing leaves big bodies out (unless asked
    for) and stops a page at a byte budget, with a cursor that loses nothing."""
    monkeypatch.setattr(z4j.brain.http.events_api, "EVENT_BODY_BYTES", 1800)
    monkeypatch.setattr(z4j.brain.http.events_api, "EVENTS_PAGE_BYTES", 5000)
    token = await admin_token(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            client = await z4j.ingest.open_trio(*brain.ingest)
            async with client:
                for n in range(8):
                    record = {"t": "log", "n": n, "pad": "x" * (2000 if n == 7 else 1500)}
                    assert await client.send_many([[record]]) == [True]
            await wait_until(lambda: brain.stats.drain_records_stored >= 8)

            _, _, page = await call(http, "GET", "/api/v1/events?limit=500", token=token)
            newest, older = page["items"][0], page["items"][1]
            assert newest["body"] is None and newest["body_truncated"] is True
            assert newest["body_bytes"] > 2000
            assert older["body"]["n"] == 6 and older["body_truncated"] is False
            assert len(orjson.dumps(page)) < 5000 + 2000  # the budget, plus at most one item
            assert len(page["items"]) < 8 and page["next_cursor"] is not None
            seen = [e["id"] for e in page["items"]]
            cursor = page["next_cursor"]
            while cursor is not None:
                _, _, page = await call(
                    http, "GET", f"/api/v1/events?limit=500&cursor={cursor}", token=token
                )
                seen += [e["id"] for e in page["items"]]
                cursor = page["next_cursor"]
            assert len(seen) == len(set(seen)) == 8

            _, _, full = await call(
                http, "GET", "/api/v1/events?limit=1&body_max_bytes=100000", token=token
            )
            assert full["items"][0]["body"]["n"] == 7
            assert full["items"][0]["body_truncated"] is False
            for bad in ("body_max_bytes=-1", "body_max_bytes=x", "body_max_bytes=16777217"):
                status, _, _ = await call(http, "GET", f"/api/v1/events?{bad}", token=token)
                assert status == 400, bad


@pytest.mark.parametrize(
    "path", ["/", "/index.html", "/static/index.html", "//index.html", "///static/index.html"]
)
async def test_the_dashboard_html_needs_a_session_whatever_the_path(
    tmp_path: Path, path: str
) -> None:
    config = make_config(tmp_path)
    token = await admin_token(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            for method in ("GET", "HEAD"):
                status, headers, _ = await _raw(http, method, path)
                assert status == 303 and headers["location"] == "/login", (method, path)
            cookie, _ = await _sign_in(http, token)
            status, headers, _ = await _raw(http, "GET", path, cookie=cookie)
            assert status == 200 and headers["content-type"].startswith("text/html")
            # The sign-in page and the page's assets stay public.
            for public in ("/login", "/static/login.js", "/static/app.css"):
                assert (await _raw(http, "GET", public))[0] == 200, public


async def _raw(
    address: tuple[str, int], method: str, path: str, *, cookie: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    reply = await http_request(address, method, path, headers={"Cookie": cookie} if cookie else {})
    return reply.status, dict(reply.headers), reply.body


async def test_the_setup_link_goes_to_a_private_file_not_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path / "data")
    store = store_for(config)
    try:
        await store.migrate()
        auth = Auth(store, keys.master_secret(config))
        ready = trio.Event()
        ready.set()
        with caplog.at_level(logging.INFO):
            await announce_setup(auth, ready, config, "http://brain.test:7700/login")
        path = config.data_dir / SETUP_LINK_FILE
        link = path.read_text().strip()
        assert link == f"http://brain.test:7700/setup#code={auth.setup_code()}"
        assert path.stat().st_mode & 0o777 == 0o600
        assert auth.setup_code() not in caplog.text and str(path) in caplog.text
        # Once a user exists, nothing is written.
        path.unlink()
        await store.create_user(
            User(
                id=uuid.uuid4(),
                name="a",
                role="admin",
                projects=None,
                disabled=False,
                created_at=1.0,
                updated_at=1.0,
            ),
            "x",
        )
        await announce_setup(auth, ready, config, "http://brain.test:7700/login")
        assert not path.exists()
    finally:
        await store.aclose()

"""Accounts through the API: first-run setup, password sign-in, sessions
(expiry, idleness, sign-out everywhere), the sign-in throttle per account,
personal tokens (shown once, last use, scope, revocation down to the
dashboard socket), legacy admin tokens listed and revoked, and the audit
rows all of it leaves."""

from __future__ import annotations

import re
import uuid
from typing import Any, cast

import orjson
import pytest
import trio
from test_api import call
from test_dashboard_hub import viewer
from wsproto.events import CloseConnection

from z4j import keys
from z4j.brain.commands import Commands
from z4j.brain.dashboard_hub import RECHECK_SECONDS
from z4j.brain.http.accounts_api import AccountThrottle
from z4j.brain.http.api import Api
from z4j.brain.http.auth import SESSION_COOKIE, SETUP_LINK_FILE, Auth
from z4j.brain.http.passwords import hash_password
from z4j.config import Config
from z4j.store import store_for
from z4j.store.base import User
from z4j.testing.agents import admin_token, provision
from z4j.testing.brain import running_brain, wait_until
from z4j.testing.http import http_request

PASSWORD = "correct horse battery"

sqlite_only = pytest.mark.parametrize("store_kind", ["sqlite"], indirect=True)


async def _user(
    http: tuple[str, int], legacy: str, name: str, role: str = "viewer"
) -> dict[str, Any]:
    status, _, body = await call(
        http,
        "POST",
        "/api/v1/users",
        token=legacy,
        body={"name": name, "password": PASSWORD, "role": role},
    )
    assert status == 201, body
    return cast(dict[str, Any], body)


async def _sign_in(
    http: tuple[str, int], name: str, password: str = PASSWORD
) -> tuple[str, dict[str, str]]:
    """(the session Cookie header value, headers carrying its CSRF token)."""
    status, headers, body = await call(
        http, "POST", "/api/v1/session", body={"name": name, "password": password}
    )
    assert status == 200, body
    return headers["set-cookie"].split(";")[0], {
        "X-CSRF-Token": body["csrf_token"],
        "Content-Type": "application/json",
    }


async def _audit(http: tuple[str, int], legacy: str) -> list[dict[str, Any]]:
    _, _, body = await call(http, "GET", "/api/v1/audit?limit=200", token=legacy)
    return cast(list[dict[str, Any]], body["items"])


async def test_the_first_run_setup_link_creates_the_first_admin_once(config: Config) -> None:
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            link_file = config.data_dir / SETUP_LINK_FILE
            await wait_until(link_file.exists)
            link = link_file.read_text().strip()
            code = re.fullmatch(r"http://[^/]+/setup#code=([\w-]+)", link)
            assert code is not None, link
            assert (await call(http, "GET", "/api/v1/setup"))[2] == {"needed": True}
            first = {"code": code[1], "name": "root", "password": PASSWORD}
            status, _, body = await call(
                http, "POST", "/api/v1/setup", body={**first, "code": "guess"}
            )
            assert (status, body["error"]) == (401, "unauthorized")
            status, headers, body = await call(http, "POST", "/api/v1/setup", body=first)
            assert status == 201 and body["user"]["role"] == "admin", body
            cookie = headers["set-cookie"].split(";")[0]
            status, _, me = await call(http, "GET", "/api/v1/session", cookie=cookie)
            assert status == 200 and (me["name"], me["role"], me["kind"]) == (
                "root",
                "admin",
                "user",
            )
            # Once: the same link cannot make a second admin.
            again = {**first, "name": "intruder"}
            status, _, body = await call(http, "POST", "/api/v1/setup", body=again)
            assert (status, body["error"]) == (409, "setup_done")
            assert (await call(http, "GET", "/api/v1/setup"))[2] == {"needed": False}
            status, _, _ = await call(
                http, "POST", "/api/v1/session", body={"name": "intruder", "password": PASSWORD}
            )
            assert status == 401
            # The page the link opens is served without signing in.
            page = await http_request(http, "GET", "/setup", body=b"", headers={})
            assert page.status == 200 and b"setup.js" in page.body


async def test_password_sign_in_sign_out_everywhere_and_the_audit(config: Config) -> None:
    legacy = await admin_token(config)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            await _user(http, legacy, "alice", "operator")
            status, _, body = await call(
                http, "POST", "/api/v1/session", body={"name": "alice", "password": "wrong one!"}
            )
            assert (status, body["error"]) == (401, "unauthorized")
            status, _, body = await call(
                http, "POST", "/api/v1/session", body={"name": "nobody", "password": PASSWORD}
            )
            assert status == 401 and body["message"] == "unknown name or wrong password"
            first, csrf = await _sign_in(http, "alice")
            second, _ = await _sign_in(http, "alice")
            status, _, me = await call(http, "GET", "/api/v1/session", cookie=first)
            assert status == 200 and (me["name"], me["role"], me["by_cookie"]) == (
                "alice",
                "operator",
                True,
            )
            # A cookie write without the session's CSRF token is refused.
            status, _, body = await call(
                http,
                "DELETE",
                "/api/v1/sessions",
                cookie=first,
                headers={**csrf, "X-CSRF-Token": "x"},
            )
            assert (status, body["error"]) == (403, "csrf")
            status, _, body = await call(
                http, "DELETE", "/api/v1/sessions", cookie=first, headers=csrf
            )
            assert status == 200 and body == {"sessions_ended": 2}
            for cookie in (first, second):
                assert (await call(http, "GET", "/api/v1/session", cookie=cookie))[0] == 401
            rows = await _audit(http, legacy)
            sign_ins = [r for r in rows if r["action"] == "session.sign_in"]
            refused = [r for r in sign_ins if r["details"]["outcome"] == "refused"]
            ok = [r for r in sign_ins if r["details"]["outcome"] == "ok"]
            assert {r["subject"] for r in refused} == {"user:alice", "user:nobody"}
            assert len(ok) == 2 and all(r["actor"] == "alice" for r in ok)
            assert all(r["details"]["source"] == "127.0.0.1" for r in sign_ins)
            created = [r for r in rows if r["action"] == "user.created"]
            assert created[0]["actor"] == "token:test" and created[0]["subject"] == "user:alice"
            assert any(r["action"] == "session.sign_out_everywhere" for r in rows)


async def _asgi(app: Any, path: str, body: Any, client: str) -> tuple[int, dict[str, Any] | None]:
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "scheme": "http",
        "query_string": b"",
        "client": (client, 50000),
        "headers": [(b"host", b"x"), (b"content-type", b"application/json")],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": orjson.dumps(body), "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, response = sent
    return start["status"], orjson.loads(response["body"]) if response["body"] else None


async def _store_user(config: Config, name: str, role: str = "viewer") -> User:
    store = store_for(config)
    try:
        await store.migrate()
        user = User(
            id=uuid.uuid4(),
            name=name,
            role=role,
            projects=None,
            disabled=False,
            created_at=1.0,
            updated_at=1.0,
        )
        await store.create_user(user, await hash_password(PASSWORD))
        return user
    finally:
        await store.aclose()


@sqlite_only
async def test_sign_in_is_throttled_per_account_whatever_the_address(config: Config) -> None:
    """Guessing one account's password from many addresses is stopped too,
    and the account's owner is not locked out of other accounts' addresses."""
    await _store_user(config, "alice")
    await _store_user(config, "bob")
    store = store_for(config)
    try:
        api = Api(
            store,
            cast(Commands, None),
            Auth(store, keys.master_secret(config)),
            account_throttle=AccountThrottle(max_failures=3, window=300.0),
        )
        guess = {"name": "alice", "password": "not the password"}
        for n in range(3):
            status, _ = await _asgi(api, "/api/v1/session", guess, f"192.0.2.{n}")
            assert status == 401
        right = {"name": "alice", "password": PASSWORD}
        status, body = await _asgi(api, "/api/v1/session", right, "198.51.100.7")
        assert status == 429 and body is not None and body["error"] == "too_many_attempts"
        other = {"name": "bob", "password": PASSWORD}
        assert (await _asgi(api, "/api/v1/session", other, "198.51.100.7"))[0] == 200
    finally:
        await store.aclose()


async def test_a_session_ends_at_its_limit_however_active_and_when_idle(
    config: Config,
) -> None:
    user = await _store_user(config, "alice")
    now = [1_000_000.0]
    store = store_for(config)
    try:
        auth = Auth(
            store,
            keys.master_secret(config),
            clock=lambda: now[0],
            session_seconds=300.0,
            idle_seconds=100.0,
        )

        def cookie(session: str) -> list[tuple[bytes, bytes]]:
            return [(b"cookie", f"{SESSION_COOKIE}={session}".encode())]

        busy = await auth.open_user_session(user)
        for _ in range(3):  # a request every 90 s: never idle
            now[0] += 90.0
            assert await auth.principal(cookie(busy)) is not None
        now[0] += 90.0  # 360 s after sign-in, past the 300 s limit
        assert await auth.principal(cookie(busy)) is None

        quiet = await auth.open_user_session(user)
        now[0] += 99.0
        assert await auth.principal(cookie(quiet)) is not None
        now[0] += 101.0  # 101 s without a request
        assert await auth.principal(cookie(quiet)) is None

        # A session opened with a legacy admin token keeps the same limits.
        legacy = await auth.new_token("old")
        for busy_or_quiet in ("busy", "quiet"):
            opened = await auth.open_session(legacy)
            assert opened is not None
            session, _ = opened
            if busy_or_quiet == "busy":
                for _ in range(3):
                    now[0] += 90.0
                    assert await auth.principal(cookie(session)) is not None
                now[0] += 90.0
            else:
                now[0] += 101.0
            assert await auth.principal(cookie(session)) is None, busy_or_quiet
    finally:
        await store.aclose()


async def test_personal_tokens_shown_once_scoped_used_and_revoked(config: Config) -> None:
    legacy = await admin_token(config)
    _, _, agent_id = await provision(config)
    with trio.fail_after(90):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            await _user(http, legacy, "olga", "operator")
            cookie, csrf = await _sign_in(http, "olga")
            new = {"name": "ci", "scope": "commands", "expires_in_days": 30}
            status, _, body = await call(http, "POST", "/api/v1/tokens", cookie=cookie, body=new)
            assert (status, body["error"]) == (403, "csrf")
            status, _, body = await call(
                http, "POST", "/api/v1/tokens", cookie=cookie, headers=csrf, body=new
            )
            assert status == 201 and body["token"].startswith("z4j_pat_"), body
            token, token_id = body["token"], body["id"]
            assert body["expires_at"] is not None and body["last_used_at"] is None
            # An operator cannot make an admin-scoped token.
            status, _, _ = await call(
                http,
                "POST",
                "/api/v1/tokens",
                cookie=cookie,
                headers=csrf,
                body={"name": "x", "scope": "admin"},
            )
            assert status == 403
            status, _, me = await call(http, "GET", "/api/v1/session", token=token)
            assert (me["kind"], me["scope"], me["actor"]) == ("token", "commands", "olga/token:ci")
            # Commands carry who issued them.
            status, _, command = await call(
                http,
                "POST",
                "/api/v1/commands",
                token=token,
                body={"agent": str(agent_id), "action": "ping"},
            )
            assert status == 201 and command["issued_by"] == "olga/token:ci"
            _, _, listed = await call(http, "GET", "/api/v1/tokens", cookie=cookie)
            [mine] = listed["items"]
            assert "token" not in mine and mine["last_used_at"] is not None  # shown once
            # An admin sees it, and the legacy admin token, listed as legacy.
            _, _, everyone = await call(http, "GET", "/api/v1/tokens?all=true", token=legacy)
            kinds = {(t["kind"], t["name"]) for t in everyone["items"]}
            assert kinds == {("legacy", "test"), ("personal", "ci")}
            async with viewer(http, token) as socket:
                await socket.next_message("hello")
                status, _, body = await call(
                    http, "DELETE", f"/api/v1/tokens/{token_id}", cookie=cookie, headers=csrf
                )
                assert status == 200 and body["revoked_at"] is not None
                # The next request is refused, and the socket closes at its next recheck.
                assert (await call(http, "GET", "/api/v1/projects", token=token))[0] == 401
                with trio.fail_after(10 * RECHECK_SECONDS + 10):
                    while not isinstance(event := await socket.next_event(), CloseConnection):
                        pass
                assert event.code == 4401
            rows = await _audit(http, legacy)
            actions = {(r["action"], r["actor"]) for r in rows}
            assert {("token.created", "olga"), ("token.revoked", "olga")} <= actions


async def test_legacy_admin_tokens_are_revocable_from_the_api(config: Config) -> None:
    legacy = await admin_token(config)
    other = await admin_token(config, name="old-ci")
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            await _user(http, legacy, "ada", "admin")
            await _user(http, legacy, "vic", "viewer")
            _, _, everyone = await call(http, "GET", "/api/v1/tokens?all=true", token=legacy)
            [old] = [t for t in everyone["items"] if t["name"] == "old-ci"]
            assert old["kind"] == "legacy" and old["scope"] == "admin"
            viewer_cookie, viewer_csrf = await _sign_in(http, "vic")
            status, _, _ = await call(
                http,
                "DELETE",
                f"/api/v1/tokens/{old['id']}",
                cookie=viewer_cookie,
                headers=viewer_csrf,
            )
            assert status == 403
            cookie, csrf = await _sign_in(http, "ada")
            status, _, body = await call(
                http, "DELETE", f"/api/v1/tokens/{old['id']}", cookie=cookie, headers=csrf
            )
            assert status == 200 and body["kind"] == "legacy"
            assert (await call(http, "GET", "/api/v1/projects", token=other))[0] == 401
            assert (await call(http, "GET", "/api/v1/projects", token=legacy))[0] == 200
            rows = await _audit(http, legacy)
            assert any(r["action"] == "admin.token.revoked" and r["actor"] == "ada" for r in rows)


async def test_disabling_a_user_ends_their_sessions_and_tokens(config: Config) -> None:
    legacy = await admin_token(config)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            user = await _user(http, legacy, "dan", "viewer")
            cookie, csrf = await _sign_in(http, "dan")
            status, _, body = await call(
                http, "POST", "/api/v1/tokens", cookie=cookie, headers=csrf, body={"name": "r"}
            )
            token = body["token"]
            assert (await call(http, "GET", "/api/v1/projects", token=token))[0] == 200
            status, _, body = await call(
                http, "POST", f"/api/v1/users/{user['id']}/disable", token=legacy, body={}
            )
            assert status == 200 and body["disabled"] is True
            assert (await call(http, "GET", "/api/v1/projects", token=token))[0] == 401
            assert (await call(http, "GET", "/api/v1/projects", cookie=cookie))[0] == 401
            status, _, _ = await call(
                http, "POST", "/api/v1/session", body={"name": "dan", "password": PASSWORD}
            )
            assert status == 401
            await call(http, "POST", f"/api/v1/users/{user['id']}/enable", token=legacy, body={})
            new = {"password": "another long one"}
            status, _, _ = await call(
                http, "POST", f"/api/v1/users/{user['id']}/password", token=legacy, body=new
            )
            assert status == 200
            await _sign_in(http, "dan", "another long one")

"""The OpenAPI document's bounds are the server's: read back, and one past each refused.

The limits live in z4j/brain/http/limits.py; the document and the route
checks both read them. The bounds are HTTP-level, so one store (SQLite) is
enough here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import trio

from z4j._decimal import parse_decimal
from z4j.brain.http import limits
from z4j.brain.http.openapi import OPENAPI
from z4j.protocol.agent import frames
from z4j.testing.agents import admin_token
from z4j.testing.brain import make_config, running_brain
from z4j.testing.http import http_request


def _schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = OPENAPI["components"]["schemas"][name]
    return schema


def _param(path: str, name: str) -> dict[str, Any]:
    for param in OPENAPI["paths"][path]["get"]["parameters"]:
        if param["name"] == name:
            schema: dict[str, Any] = param["schema"]
            return schema
    raise AssertionError(f"no parameter {name} on GET {path}")


def test_the_document_publishes_the_servers_bounds() -> None:
    command = _schema("NewCommand")["properties"]
    assert command["action"]["maxLength"] == limits.COMMAND_ACTION_CHARS == frames.ACTION_MAX_CHARS
    assert (command["timeout_seconds"]["minimum"], command["timeout_seconds"]["maximum"]) == (
        limits.COMMAND_TIMEOUT_SECONDS
    )
    for path in ("/commands", "/audit", "/events"):
        assert _param(path, "limit")["maximum"] == limits.PAGE_LIMIT
    assert _param("/audit", "actor")["maxLength"] == limits.FILTER_TEXT_CHARS
    assert _param("/events", "kind")["maxLength"] == limits.FILTER_TEXT_CHARS
    for name in ("NewUser", "Setup"):
        props = _schema(name)["properties"]
        assert props["name"]["maxLength"] == limits.ACCOUNT_NAME_CHARS
        assert (props["password"]["minLength"], props["password"]["maxLength"]) == (
            limits.PASSWORD_CHARS
        )


async def _call(
    address: tuple[str, int], method: str, path: str, token: str, body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    payload = b""
    if body is not None:
        headers["Content-Type"] = "application/json"
        payload = orjson.dumps(body)
    reply = await http_request(address, method, path, body=payload, headers=headers)
    return reply.status, reply.json()


async def test_the_server_takes_each_bound_and_refuses_one_past_it(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")
    token = await admin_token(config)
    longest = "a" * limits.COMMAND_ACTION_CHARS
    low, high = limits.COMMAND_TIMEOUT_SECONDS
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http

            async def command(action: str, timeout: int) -> tuple[int, Any]:
                body = {"agent": "nobody", "project": "none", "action": action}
                body["timeout_seconds"] = timeout  # type: ignore[assignment]
                return await _call(http, "POST", "/api/v1/commands", token, body)

            # At the bound the input passes (the unknown agent is what fails).
            assert (await command(longest, high))[0] == 404
            assert (await command("a", low))[0] == 404
            status, body = await command(longest + "a", high)
            assert status == 400 and body["message"].startswith("action:"), body
            status, body = await command("a", high + 1)
            assert status == 400 and body["message"].startswith("timeout_seconds:"), body
            assert (await command("a", low - 1))[0] == 400

            edge = limits.PAGE_LIMIT
            assert (await _call(http, "GET", f"/api/v1/commands?limit={edge}", token))[0] == 200
            assert (await _call(http, "GET", f"/api/v1/commands?limit={edge + 1}", token))[0] == 400
            text = "x" * limits.FILTER_TEXT_CHARS
            assert (await _call(http, "GET", f"/api/v1/audit?actor={text}", token))[0] == 200
            assert (await _call(http, "GET", f"/api/v1/audit?actor={text}x", token))[0] == 400
            assert (await _call(http, "GET", f"/api/v1/events?kind={text}", token))[0] == 200
            assert (await _call(http, "GET", f"/api/v1/events?kind={text}x", token))[0] == 400

            name = "n" * limits.ACCOUNT_NAME_CHARS
            password = "p" * limits.PASSWORD_CHARS[1]
            user = {"name": name + "n", "password": password, "role": "viewer"}
            assert (await _call(http, "POST", "/api/v1/users", token, user))[0] == 400
            user = {"name": name, "password": password + "p", "role": "viewer"}
            assert (await _call(http, "POST", "/api/v1/users", token, user))[0] == 400
            user = {"name": name, "password": password, "role": "viewer"}
            assert (await _call(http, "POST", "/api/v1/users", token, user))[0] == 201


def test_parse_decimal_takes_ascii_digits_only() -> None:
    assert parse_decimal("0") == 0 and parse_decimal("9" * 20) == int("9" * 20)
    for text in ("", "³", "٣", "1²", "-1", "+1", " 1", "1_0", "9" * 21, "9" * 5000):
        assert parse_decimal(text) is None, text


async def test_odd_digits_in_any_query_parameter_are_a_400_not_a_500(tmp_path: Path) -> None:
    """Schemathesis once found ``/dead-letters?cursor=³`` answered 500.

    ``"³".isdigit()`` holds while ``int("³")`` raises; so do 5,000 digits. Every GET
    route's every query parameter gets both: a text filter may take them, a number
    must refuse them (4xx); nothing may fail (5xx).
    """
    config = make_config(tmp_path / "data")
    token = await admin_token(config)
    odd = ("%C2%B3", "9" * 5000)
    tried = 0
    with trio.fail_after(120):
        async with running_brain(config) as brain:
            for path, operations in OPENAPI["paths"].items():
                get = operations.get("get")
                if get is None or "{" in path:
                    continue
                for param in get.get("parameters", []):
                    if param["in"] != "query":
                        continue
                    for value in odd:
                        url = f"/api/v1{path}?{param['name']}={value}"
                        status, body = await _call(brain.addresses.http, "GET", url, token)
                        assert status < 500, (url[:80], status, body)
                        tried += 1
    assert tried >= 40, tried

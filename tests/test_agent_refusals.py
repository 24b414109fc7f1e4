"""A refused agent learns why: every close carries a short reason, and a wrong
URL path is a 404 the agent library reports as such (not as bad credentials).

Real brain (SQLite: these are the HTTP and WebSocket layers), raw agents
from z4j.testing and the z4j.agent library.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from z4j.agent import Agent, Backoff
from z4j.brain.agents import CLOSE_REASONS, close_message
from z4j.protocol.close import CloseCode
from z4j.testing.agents import provision, raw_agent
from z4j.testing.brain import make_config, running_brain, wait_until
from z4j.testing.http import http_request


def test_every_code_the_endpoint_sends_has_a_reason_that_fits_a_close_frame() -> None:
    for code in CLOSE_REASONS:
        assert close_message(code)["reason"]
    long = close_message(CloseCode.PROTOCOL_ERROR, "é" * 200)["reason"]
    assert 0 < len(long.encode()) <= 123


async def test_a_bad_token_is_closed_4401_with_a_reason_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path / "data")
    _, secret, _ = await provision(config)
    with trio.fail_after(30), caplog.at_level(logging.INFO, logger="z4j"):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            async with raw_agent(http, "z4j_agent_nope", secret, hello=False) as agent:
                code, reason = await agent.closed_because()
            assert code == CloseCode.UNAUTHORIZED
            assert reason is not None and reason.startswith("bad token")
    assert any(
        "refused" in r.getMessage() and "bad_token" in r.getMessage() for r in caplog.records
    )


async def test_replaced_and_capped_connections_say_why(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", ws_per_agent_concurrency_cap=1)
    token, secret, _ = await provision(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            async with raw_agent(http, token, secret, worker_id="same", prove=True) as old:
                async with raw_agent(http, token, secret, worker_id="same", prove=True):
                    code, reason = await old.closed_because()
                    assert code == CloseCode.REPLACED
                    assert reason is not None and "replaced" in reason
                    async with raw_agent(
                        http, token, secret, worker_id="other", protocol_version="none"
                    ) as third:
                        code, reason = await third.closed_because()
                        assert (code, reason) == (CloseCode.RATE_LIMITED, "worker cap full")


async def test_an_upgrade_to_an_unknown_path_is_404(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            reply = await http_request(
                brain.addresses.http,
                "GET",
                "/ws/agnet",
                headers={
                    "Upgrade": "websocket",
                    "Connection": "Upgrade",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                    "Sec-WebSocket-Version": "13",
                },
            )
            assert reply.status == 404
            assert "/ws/agent" in reply.json()["message"]


async def test_the_agent_library_reports_a_wrong_path_as_a_wrong_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path / "data")
    token, secret, _ = await provision(config)
    with trio.fail_after(30), caplog.at_level(logging.ERROR, logger="z4j.agent"):
        async with running_brain(config) as brain:
            host, port = brain.addresses.http
            # A common slip: the agent endpoint's URL where the brain's base URL goes.
            agent = Agent(
                f"http://{host}:{port}/ws/agent",
                token=token,
                secret=secret,
                incompatible_backoff=Backoff(base=30, cap=30),
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(agent.run)
                await wait_until(lambda: agent.statistics().last_disconnect is not None)
                await agent.aclose()
    last = agent.statistics().last_disconnect or ""
    assert last.startswith("incompatible: no agent endpoint at ws://"), last
    assert "/ws/agent/ws/agent: HTTP 404" in last and "credentials" not in last
    assert any("no agent endpoint" in r.getMessage() for r in caplog.records)


async def test_a_wrong_signing_secret_is_closed_4403_naming_the_check(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")
    token, _, _ = await provision(config)
    _, other_secret, _ = await provision(config, project="other", agent="x")
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            async with raw_agent(brain.addresses.http, token, other_secret, prove=True) as agent:
                code, reason = await agent.closed_because()
            assert code == CloseCode.FORBIDDEN
            assert reason is not None and "signature" in reason, reason

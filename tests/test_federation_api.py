"""Federation in process: a hub and its regions as brains of one Trio run, and fake peers.

- The hub's view: every region's summary, agents and events labelled by
  region; events paged across regions in time order, and agents newest
  first by creation, each once; a region that stops answering is named
  unreachable and the answer partial.
- Cross-region commands: refused without the peer's grant (a read-only
  token), refused without the operator's explicit intent (confirm_region),
  delivered once with both, audited in both regions with the operator.
- Hostile peers: one that trickles an answer forever costs a request its
  deadline and no more; one that sends without end is cut at the byte cap;
  a malformed page is a failed region, not a 500. Answers are cached
  briefly. No token reaches a log line.

tests/test_federation.py runs the same across processes, each region on
its own Postgres cluster, with real z4j-bare agents.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openapi_schema_validator
import orjson
import pytest
import trio

import z4j.brain.http.events_api
import z4j.ingest
from z4j.agent import Agent
from z4j.brain import serve_brain
from z4j.brain.http.openapi import OPENAPI
from z4j.config import Config
from z4j.testing.agents import admin_token, provision
from z4j.testing.brain import RunningBrain, make_config, running_brain, wait_until
from z4j.testing.federation import federation_token, write_peers_file
from z4j.testing.http import http_request

# The brains here run on SQLite (make_config's default): the federation does
# not care which store a region has; tests/test_federation.py runs Postgres.


async def get(http: tuple[str, int], path: str, token: str) -> tuple[int, Any]:
    reply = await http_request(http, "GET", path, headers={"Authorization": f"Bearer {token}"})
    return reply.status, reply.json()


async def every_page(
    http: tuple[str, int], path: str, token: str, most: int = 20
) -> list[dict[str, Any]]:
    """``path`` (with its query) and each page its ``next_cursor`` leads to,
    every one 200, until the last (at most ``most`` pages)."""
    pages: list[dict[str, Any]] = []
    cursor = ""
    for _ in range(most):
        status, page = await get(http, path + cursor, token)
        assert status == 200, page
        pages.append(page)
        if page["next_cursor"] is None:
            return pages
        cursor = f"&cursor={page['next_cursor']}"
    raise AssertionError(f"{path}: still more after {most} pages")


async def post(http: tuple[str, int], path: str, token: str, body: Any) -> tuple[int, Any]:
    reply = await http_request(
        http,
        "POST",
        path,
        body=orjson.dumps(body),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    return reply.status, reply.json()


def conforms(item: Any, schema: dict[str, Any]) -> None:
    """``item`` is what the OpenAPI document says (a schema, or a component by $ref)."""
    openapi_schema_validator.validate(
        item,
        {**schema, "components": OPENAPI["components"]},
        cls=openapi_schema_validator.OAS30Validator,
        format_checker=openapi_schema_validator.oas30_format_checker,
    )


def answer_schema(path: str, method: str = "get", status: str = "200") -> dict[str, Any]:
    operation = OPENAPI["paths"][path][method]
    return dict(operation["responses"][status]["content"]["application/json"]["schema"])


async def audit_rows(brain: RunningBrain, token: str, action: str) -> list[dict[str, Any]]:
    status, page = await get(brain.addresses.http, f"/api/v1/audit?action={action}", token)
    assert status == 200, page
    return list(page["items"])


@asynccontextmanager
async def hub_of(
    tmp_path: Path, peers: dict[str, dict[str, str]], **settings: Any
) -> AsyncIterator[tuple[RunningBrain, str]]:
    """A hub brain (region "hub") federating ``peers``; with an admin token."""
    file = write_peers_file(tmp_path / "peers.toml", peers)
    config = make_config(
        tmp_path / "hub", region_name="hub", federation_peers_file=file, **settings
    )
    admin = await admin_token(config)
    async with running_brain(config) as hub:
        yield hub, admin


@asynccontextmanager
async def region(
    tmp_path: Path, name: str, *, allow_commands: bool = False
) -> AsyncIterator[tuple[RunningBrain, str, str]]:
    """A region's brain: (it, the federation token it gave the hub, an admin token)."""
    config = make_config(tmp_path / name, region_name=name)
    token = await federation_token(config, "hub", allow_commands=allow_commands)
    admin = await admin_token(config)
    async with running_brain(config) as brain:
        yield brain, token, admin


async def connect_agent(
    config: Config, brain: RunningBrain, nursery: trio.Nursery, name: str
) -> Agent:
    token, secret, _ = await provision(config, project=f"{name}-project", agent=f"{name}-agent")
    agent = Agent(brain.addresses.http_url, token=token, secret=secret, worker_id=f"{name}-1")
    await nursery.start(agent.run)
    await wait_until(lambda: agent.connected)
    return agent


async def ingest(brain: RunningBrain, region: str, n: int, start: int = 0) -> None:
    client = await z4j.ingest.open_trio(*brain.ingest)
    async with client:
        for i in range(start, start + n):  # one payload each: distinct times
            assert await client.send_many([[{"t": "log", "region": region, "n": i}]]) == [True]


# -- the hub's view ----------------------------------------------------------------------


async def test_the_hub_shows_every_region_labelled_and_a_dead_one_as_partial(
    tmp_path: Path,
) -> None:
    with trio.fail_after(120):
        async with (
            region(tmp_path, "east") as (east, east_token, _),
            region(tmp_path, "west") as (west, west_token, _),
            trio.open_nursery() as nursery,
        ):
            await connect_agent(east.config, east, nursery, "east")
            await connect_agent(west.config, west, nursery, "west")
            # Interleaved, so the merge has to put them in order.
            for round_ in range(3):
                await ingest(east, "east", 4, start=4 * round_)
                await ingest(west, "west", 3, start=3 * round_)
            peers = {
                "east": {"url": east.addresses.http_url, "token": east_token},
                "west": {"url": west.addresses.http_url, "token": west_token},
            }
            async with hub_of(
                tmp_path, peers, federation_timeout_ms=2000, federation_cache_ms=0
            ) as (hub, admin):
                await ingest(hub, "hub", 2)
                http = hub.addresses.http

                async def stored() -> bool:
                    _, page = await get(http, "/api/v1/federation/events?kind=log&limit=100", admin)
                    return len(page["items"]) == 12 + 9 + 2

                await wait_until(stored)

                status, regions = await get(http, "/api/v1/federation/regions", admin)
                assert status == 200, regions
                assert [r["name"] for r in regions["items"]] == ["hub", "east", "west"]
                assert all(r["reachable"] for r in regions["items"]), regions
                assert regions["partial"] is False and regions["unreachable"] == []
                by_name = {r["name"]: r for r in regions["items"]}
                assert by_name["east"]["summary"]["workers_connected"] == 1
                assert by_name["east"]["summary"]["region"] == "east"
                assert by_name["east"]["round_trip_ms"] > 0
                assert by_name["hub"]["local"] and by_name["hub"]["summary"]["ready"]

                status, agents = await get(http, "/api/v1/federation/agents", admin)
                assert status == 200 and agents["partial"] is False
                labelled = {(a["region"], a["name"]) for a in agents["items"]}
                assert labelled == {("east", "east-agent"), ("west", "west-agent")}
                (east_agent,) = [a for a in agents["items"] if a["region"] == "east"]
                assert east_agent["workers"][0]["worker_id"] == "east-1"
                assert east_agent["workers"][0]["connected"]

                # Paged across the regions, 5 at a time: each event once, newest
                # first, each labelled with the region it was sent to.
                pages = await every_page(http, "/api/v1/federation/events?kind=log&limit=5", admin)
                for page in pages:
                    assert page["partial"] is False, page
                    assert len(page["items"]) <= 5
                seen = [event for page in pages for event in page["items"]]
                assert len(seen) == 23
                assert all(e["body"]["region"] == e["region"] for e in seen)
                keys = [(e["region"], e["body"]["n"]) for e in seen]
                assert len(set(keys)) == 23
                times = [e["received_at"] for e in seen]
                assert times == sorted(times, reverse=True)

                # Each answer is what the OpenAPI document says, the hub's and a peer's.
                for route in ("regions", "agents", "events", "commands", "audit"):
                    _, answer = await get(http, f"/api/v1/federation/{route}", admin)
                    conforms(answer, answer_schema(f"/federation/{route}"))
                for route in ("summary", "agents", "events", "commands", "audit"):
                    _, answer = await get(
                        east.addresses.http, f"/api/v1/federation/peer/{route}?limit=3", east_token
                    )
                    conforms(answer, answer_schema(f"/federation/peer/{route}"))

                status, only = await get(http, "/api/v1/federation/events?region=west", admin)
                assert {e["region"] for e in only["items"]} == {"west"}
                status, bad = await get(http, "/api/v1/federation/events?region=nowhere", admin)
                assert status == 400, bad
                status, bad = await get(http, "/api/v1/federation/events?cursor=zz", admin)
                assert status == 400, bad

                # West stops: named, partial, the others still served.
                west.cancel_scope.cancel()

                async def west_gone() -> bool:
                    _, page = await get(http, "/api/v1/federation/agents", admin)
                    return bool(page["partial"])

                await wait_until(west_gone)
                status, agents = await get(http, "/api/v1/federation/agents", admin)
                assert status == 200
                assert agents["partial"] is True and agents["unreachable"] == ["west"]
                assert agents["errors"]["west"]
                assert {a["region"] for a in agents["items"]} == {"east"}
                status, page = await get(http, "/api/v1/federation/events?kind=log", admin)
                assert page["partial"] is True and page["unreachable"] == ["west"]
                assert {e["region"] for e in page["items"]} == {"hub", "east"}
                status, regions = await get(http, "/api/v1/federation/regions", admin)
                reach = {r["name"]: r["reachable"] for r in regions["items"]}
                assert reach == {"hub": True, "east": True, "west": False}

                fed = hub.stats.federation
                assert fed.peer_up == {"east": 1, "west": 0}
                assert fed.partial["/api/v1/federation/agents"] >= 1
                assert fed.request_seconds["east"].count >= 3
            nursery.cancel_scope.cancel()


async def test_agents_are_paged_across_regions_newest_first_each_once(
    tmp_path: Path,
) -> None:
    with trio.fail_after(120):
        async with (
            region(tmp_path, "east") as (east, east_token, _),
            region(tmp_path, "west") as (west, west_token, _),
            trio.open_nursery() as nursery,
        ):
            # Created in turn, 7 in east and 5 in west: the newest last.
            made: list[tuple[str, str]] = []
            for n in range(7):
                for name, brain in (("east", east), ("west", west)):
                    if name == "east" or n < 5:
                        agent = f"{name}-agent-{n}"
                        await provision(brain.config, project=f"{name}-p{n}", agent=agent)
                        made.append((name, agent))
            # One agent with two workers connected: the summary counts both, and it once.
            token, secret, _ = await provision(east.config, project="live", agent="live")
            for worker in ("live-1", "live-2"):
                live = Agent(east.addresses.http_url, token=token, secret=secret, worker_id=worker)
                await nursery.start(live.run)
                await wait_until(lambda live=live: live.connected)
            made.append(("east", "live"))
            peers = {
                "east": {"url": east.addresses.http_url, "token": east_token},
                "west": {"url": west.addresses.http_url, "token": west_token},
            }
            async with hub_of(tmp_path, peers, federation_cache_ms=0) as (hub, admin):
                http = hub.addresses.http
                _, regions = await get(http, "/api/v1/federation/regions", admin)
                summaries = {r["name"]: r["summary"] for r in regions["items"]}
                assert summaries["east"]["workers_connected"] == 2
                assert summaries["east"]["agents_connected"] == 1
                assert summaries["west"]["workers_connected"] == 0
                assert summaries["west"]["agents_connected"] == 0

                # 4 at a time across the regions: every agent once, newest first.
                pages = await every_page(http, "/api/v1/federation/agents?limit=4", admin, most=10)
                for page in pages:
                    assert page["partial"] is False, page
                    assert len(page["items"]) <= 4
                    conforms(page, answer_schema("/federation/agents"))
                    assert all("cursor" not in a and "sort_at" not in a for a in page["items"])
                seen = [agent for page in pages for agent in page["items"]]
                assert [(a["region"], a["name"]) for a in seen] == made[::-1]
                (live_agent,) = [a for a in seen if a["name"] == "live"]
                assert sorted(w["worker_id"] for w in live_agent["workers"]) == ["live-1", "live-2"]
                assert all(a["workers"] == [] for a in seen if a["name"] != "live")

                # A region's own page never holds more than its limit.
                pages = await every_page(
                    east.addresses.http, "/api/v1/federation/peer/agents?limit=3", east_token, 10
                )
                for page in pages:
                    assert len(page["items"]) <= 3
                    conforms(page, answer_schema("/federation/peer/agents"))
                peer_seen = [agent for page in pages for agent in page["items"]]
                assert [a["name"] for a in peer_seen] == [n for r, n in made[::-1] if r == "east"]
                times = [a["sort_at"] for a in peer_seen]
                assert times == sorted(times, reverse=True)

                # A cursor neither made is refused, by the region and by the hub.
                for bad in ("zz", "1.5_zz", "nan_" + str(uuid.uuid4()), "-1_" + str(uuid.uuid4())):
                    status, body = await get(
                        east.addresses.http,
                        f"/api/v1/federation/peer/agents?cursor={bad}",
                        east_token,
                    )
                    assert status == 400 and body["error"] == "bad_request", (bad, body)
                status, body = await get(http, "/api/v1/federation/agents?cursor=zz", admin)
                assert status == 400 and body["error"] == "bad_request", body
                status, body = await get(http, "/api/v1/federation/agents?limit=0", admin)
                assert status == 400, body
            nursery.cancel_scope.cancel()


async def test_a_regions_agents_page_is_bounded_in_bytes_and_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the page's bytes a region stops (at least one agent a page) and
    its cursor continues after the last agent kept: every agent once."""
    monkeypatch.setattr(z4j.brain.http.events_api, "EVENTS_PAGE_BYTES", 1)
    with trio.fail_after(60):
        async with region(tmp_path, "east") as (east, east_token, _):
            names = [f"agent-{n}" for n in range(5)]
            for name in names:
                await provision(east.config, project=f"p-{name}", agent=name)
            pages = await every_page(
                east.addresses.http, "/api/v1/federation/peer/agents?limit=3", east_token, 10
            )
            assert all(len(page["items"]) == 1 for page in pages)
            assert [a["name"] for page in pages for a in page["items"]] == names[::-1]


# -- cross-region commands ---------------------------------------------------------------


async def test_cross_region_commands_need_the_grant_and_the_operators_intent(
    tmp_path: Path,
) -> None:
    with trio.fail_after(120):
        async with (
            region(tmp_path, "east") as (east, east_token, east_admin),
            region(tmp_path, "west", allow_commands=True) as (west, west_token, west_admin),
            trio.open_nursery() as nursery,
        ):
            east_agent = await connect_agent(east.config, east, nursery, "east")
            west_agent = await connect_agent(west.config, west, nursery, "west")
            pings: dict[str, list[dict[str, Any]]] = {"east": [], "west": []}
            for name, agent in (("east", east_agent), ("west", west_agent)):

                def handler(name: str) -> Callable[..., Awaitable[dict[str, Any]]]:
                    async def ping(target: dict[str, Any], parameters: dict[str, Any]) -> Any:
                        pings[name].append(parameters)
                        return {"pong": name}

                    return ping

                agent.on_command("ping", handler(name))
            peers = {
                "east": {"url": east.addresses.http_url, "token": east_token},
                "west": {"url": west.addresses.http_url, "token": west_token},
            }
            async with hub_of(tmp_path, peers) as (hub, admin):
                http = hub.addresses.http
                command = {"agent": "west-agent", "project": "west-project", "action": "ping"}

                # No intent: refused at the hub; the region never hears of it.
                status, refused = await post(
                    http, "/api/v1/federation/regions/west/commands", admin, command
                )
                assert status == 403 and refused["error"] == "not_confirmed", refused
                assert "confirm_region" in refused["message"]
                wrong = {**command, "confirm_region": "east"}
                status, refused = await post(
                    http, "/api/v1/federation/regions/west/commands", admin, wrong
                )
                assert status == 403 and refused["error"] == "not_confirmed", refused

                # No grant: east gave a read-only token; east refuses, and says why.
                to_east = {**command, "agent": "east-agent", "project": "east-project"}
                status, refused = await post(
                    http,
                    "/api/v1/federation/regions/east/commands",
                    admin,
                    {**to_east, "confirm_region": "east"},
                )
                assert status == 403 and refused["error"] == "not_granted", refused
                assert "read-only" in refused["message"] and refused["region"] == "east"

                # Both: delivered once, answered, audited in both regions.
                status, sent = await post(
                    http,
                    "/api/v1/federation/regions/west/commands",
                    admin,
                    {**command, "parameters": {"n": 1}, "confirm_region": "west"},
                )
                assert status == 201, sent
                assert sent["region"] == "west"
                command_id = sent["command"]["id"]
                assert sent["command"]["issued_by"] == "federation:hub/token:test"
                conforms(sent, answer_schema("/federation/regions/{name}/commands", "post", "201"))
                conforms(
                    refused, answer_schema("/federation/regions/{name}/commands", "post", "403")
                )

                async def completed() -> bool:
                    _, found = await get(
                        west.addresses.http, f"/api/v1/commands/{command_id}", west_admin
                    )
                    return bool(found["state"] == "completed")

                await wait_until(completed)
                assert pings == {"east": [], "west": [{"n": 1}]}
                _, commands = await get(west.addresses.http, "/api/v1/commands", west_admin)
                assert [c["id"] for c in commands["items"]] == [command_id]
                _, east_commands = await get(east.addresses.http, "/api/v1/commands", east_admin)
                assert east_commands["items"] == []
                # The hub's federated history shows it, labelled.
                _, history = await get(http, "/api/v1/federation/commands", admin)
                assert [(c["region"], c["id"]) for c in history["items"]] == [("west", command_id)]

                hub_rows = await audit_rows(hub, admin, "federation.command")
                outcomes = sorted(
                    (r["details"]["region"], r["details"]["outcome"], r["actor"]) for r in hub_rows
                )
                assert outcomes == [
                    ("east", "refused", "token:test"),
                    ("west", "ok", "token:test"),
                    ("west", "refused", "token:test"),
                    ("west", "refused", "token:test"),
                ]
                (west_row,) = await audit_rows(west, west_admin, "federation.command")
                assert west_row["actor"] == "federation:hub/token:test"
                assert west_row["details"]["operator"] == "token:test"
                assert west_row["subject"] == f"command:{command_id}"
                (east_row,) = await audit_rows(east, east_admin, "federation.command")
                assert east_row["details"]["outcome"] == "refused"
                assert east_row["details"]["reason"] == "not_granted"

                # The hub's federated audit: every region's rows, labelled, in time order.
                _, merged = await get(
                    http, "/api/v1/federation/audit?action=federation.command", admin
                )
                assert merged["partial"] is False
                regions = sorted(r["region"] for r in merged["items"])
                assert regions == ["east", "hub", "hub", "hub", "hub", "west"]
                assert all(isinstance(r["at"], str) for r in merged["items"])
                ats = [r["at"] for r in merged["items"]]
                assert ats == sorted(ats, reverse=True)

                # The region checks the intent itself too: a hub that forgot is refused.
                status, refused = await post(
                    west.addresses.http,
                    "/api/v1/federation/peer/commands",
                    west_token,
                    {**command, "operator": "mallory", "confirm_region": "elsewhere"},
                )
                assert status == 403 and refused["error"] == "not_confirmed", refused
                assert len(pings["west"]) == 1

                assert hub.stats.federation.refused_writes == {
                    "not_confirmed": 2,
                    "peer_refused": 1,
                }
                assert east.stats.federation.refused_writes == {"not_granted": 1}
                assert west.stats.federation.refused_writes == {"not_confirmed": 1}
            nursery.cancel_scope.cancel()


async def test_a_federation_token_stops_at_its_revocation(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with region(tmp_path, "east") as (east, token, admin):
            http = east.addresses.http
            status, summary = await get(http, "/api/v1/federation/peer/summary", token)
            assert status == 200 and summary["region"] == "east"
            # Nothing else: not the API, not a session, not the dashboard page.
            assert (await get(http, "/api/v1/agents", token))[0] == 403
            status, _ = await post(http, "/api/v1/session", "", {"token": token})
            assert status == 401
            page = await http_request(
                http, "GET", "/", headers={"Authorization": f"Bearer {token}"}
            )
            assert page.status == 303 and page.headers["location"] == "/login"
            # An admin's bearer token gets the page: the refusal is the token's kind.
            page = await http_request(
                http, "GET", "/", headers={"Authorization": f"Bearer {admin}"}
            )
            assert page.status == 200
            from z4j.store import store_for

            store = store_for(east.config)
            try:
                (record,) = await store.list_federation_tokens()
                assert await store.revoke_federation_token(record.id, now=1e10) is not None
            finally:
                await store.aclose()
            status, _ = await get(http, "/api/v1/federation/peer/summary", token)
            assert status == 401


# -- hostile and failing peers -----------------------------------------------------------


class FakePeer:
    """A TCP server answering HTTP the way ``mode`` says: ``trickle`` (a byte
    every 50 ms, forever), ``flood`` (an endless body), ``garbage`` (a page of
    the wrong shape), ``summary`` (a good answer). Counts requests."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0
        self.port = 0

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await self._answer(stream)  # the hub may hang up (its deadline, its byte cap)

    async def _answer(self, stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                head += chunk
            self.requests += 1
            if self.mode == "trickle":
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
                await stream.send_all(b"transfer-encoding: chunked\r\n\r\n")
                while True:
                    await stream.send_all(b"1\r\n \r\n")
                    await trio.sleep(0.05)
            if self.mode == "flood":
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
                await stream.send_all(b"connection: close\r\n\r\n[")
                block = b"1," * 32768
                while True:
                    await stream.send_all(block)
            body = (
                {"items": [{"no": "time"}], "next_cursor": None}
                if self.mode == "garbage"
                else {"region": "fake", "version": "x", "items": [], "ready": True}
            )
            data = orjson.dumps(body)
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(data)}\r\n\r\n".encode()
                + data
            )


async def test_hostile_peers_cost_a_request_its_deadline_and_their_byte_cap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fakes = {mode: FakePeer(mode) for mode in ("trickle", "flood", "garbage")}
    tokens = {mode: f"z4j_fed_secret-of-{mode}-0123456789" for mode in fakes}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for fake in fakes.values():
                await nursery.start(fake.serve)
            peers = {m: {"url": f.url, "token": tokens[m]} for m, f in fakes.items()}
            async with hub_of(
                tmp_path,
                peers,
                federation_timeout_ms=1000,
                federation_max_response_bytes=64 * 1024,
                federation_cache_ms=0,
            ) as (hub, admin):
                http = hub.addresses.http
                started = trio.current_time()
                status, page = await get(http, "/api/v1/federation/events", admin)
                took = trio.current_time() - started
                assert status == 200, page
                assert page["partial"] is True
                assert page["unreachable"] == ["trickle", "flood", "garbage"]
                errors = page["errors"]
                # The trickler never ends its answer: only the deadline stops it.
                assert errors["trickle"] == "no answer within 1000 ms", errors
                assert errors["flood"] == "answer larger than 65536 bytes", errors
                assert errors["garbage"].startswith("a malformed page"), errors
                assert took < 1.0 + 10.0  # the deadline, and a backstop for a busy machine
                assert page["items"] == [] or {e["region"] for e in page["items"]} == {"hub"}

                status, regions = await get(http, "/api/v1/federation/regions", admin)
                assert [r["reachable"] for r in regions["items"]] == [True, False, False, True]
                assert hub.stats.federation.peer_up == {"trickle": 0, "flood": 0, "garbage": 1}
            nursery.cancel_scope.cancel()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "federation: peer trickle" in logged  # failures are logged...
    for token in tokens.values():  # ...never the token, at any level
        assert token not in logged
        assert token not in caplog.text


async def test_fanouts_in_flight_are_bounded_hub_wide(tmp_path: Path) -> None:
    """Each fan-out may hold an answer of Z4J_FEDERATION_MAX_RESPONSE_BYTES per
    peer: the hub runs FANOUT_BYTES worth at once (here 2), and a request that
    finds them all taken by a slow peer's callers gets a 503 with Retry-After
    within half the deadline, not another share of memory; once they end,
    requests are served again."""
    from z4j.brain.http.federation_api import FANOUT_BYTES

    fake = FakePeer("trickle")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(fake.serve)
            peers = {"slow": {"url": fake.url, "token": "z4j_fed_x"}}
            async with hub_of(
                tmp_path,
                peers,
                federation_timeout_ms=4000,
                federation_max_response_bytes=FANOUT_BYTES // 2,
                federation_cache_ms=0,
            ) as (hub, admin):
                http = hub.addresses.http
                held: list[int] = []

                async def hold() -> None:
                    held.append((await get(http, "/api/v1/federation/events", admin))[0])

                async with trio.open_nursery() as holders:
                    holders.start_soon(hold)
                    holders.start_soon(hold)
                    await wait_until(lambda: fake.requests == 2)  # both slots taken
                    started = trio.current_time()
                    reply = await http_request(
                        http,
                        "GET",
                        "/api/v1/federation/regions",
                        headers={"Authorization": f"Bearer {admin}"},
                    )
                    assert reply.status == 503, reply.body
                    assert reply.json()["error"] == "federation_busy"
                    assert dict(reply.headers).get("retry-after") == "1"
                    assert trio.current_time() - started < 4.0  # before the holders' deadline
                    assert fake.requests == 2  # the refused request asked no peer
                assert held == [200, 200]  # partial: the slow peer missed its deadline
                assert hub.stats.federation.busy == 1
                status, regions = await get(http, "/api/v1/federation/regions", admin)
                assert status == 200 and regions["partial"] is True
                metrics = (await http_request(http, "GET", "/metrics")).body
                assert b"z4j_federation_busy_total 1.0" in metrics
            nursery.cancel_scope.cancel()


async def test_peer_answers_are_reused_within_the_cache_time(tmp_path: Path) -> None:
    fake = FakePeer("summary")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(fake.serve)
            peers = {"fake": {"url": fake.url, "token": "z4j_fed_x"}}
            async with hub_of(tmp_path, peers, federation_cache_ms=500) as (hub, admin):
                http = hub.addresses.http
                for _ in range(3):
                    status, regions = await get(http, "/api/v1/federation/regions", admin)
                    assert status == 200 and regions["partial"] is False, regions
                assert fake.requests == 1
                assert regions["items"][1]["cached"] is True
                assert regions["items"][1]["round_trip_ms"] is None
                await trio.sleep(0.6)
                await get(http, "/api/v1/federation/regions", admin)
                assert fake.requests == 2
            nursery.cancel_scope.cancel()


async def test_a_hub_stops_gracefully_while_a_peer_call_hangs(tmp_path: Path) -> None:
    """The peers' connections belong to the brain's tree: a graceful stop
    with a call in flight to a peer that never finishes ends within the grace."""
    fake = FakePeer("trickle")
    with trio.fail_after(60):
        async with trio.open_nursery() as outer:
            await outer.start(fake.serve)
            file = write_peers_file(
                tmp_path / "peers.toml", {"slow": {"url": fake.url, "token": "z4j_fed_x"}}
            )
            config = make_config(
                tmp_path / "hub",
                federation_peers_file=file,
                federation_timeout_ms=30_000,  # longer than the grace: only the stop ends it
                shutdown_grace_seconds=2.0,
            )
            admin = await admin_token(config)
            shutdown = trio.Event()
            answers: list[int] = []
            async with trio.open_nursery() as nursery:
                brain = await nursery.start(
                    functools.partial(serve_brain, config, shutdown=shutdown)
                )

                async def ask() -> None:
                    # Cut off (an empty reply: IndexError in the helper), or answered.
                    with contextlib.suppress(OSError, trio.BrokenResourceError, IndexError):
                        status, _ = await get(brain.http, "/api/v1/federation/regions", admin)
                        answers.append(status)

                nursery.start_soon(ask)
                await wait_until(lambda: fake.requests == 1)
                shutdown.set()
                stopping = trio.current_time()
            took = trio.current_time() - stopping
            assert took < 2.0 + 10.0  # the grace, and a backstop for a busy machine
            assert answers in ([], [200])  # cut off, or answered without the peer
            outer.cancel_scope.cancel()

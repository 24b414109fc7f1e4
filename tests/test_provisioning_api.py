"""Provisioning through ``/api/v1`` on both stores, with raw agents on the wire.

The brain runs on a clock the test moves (`Clock`): a grace period ends
when the test says so, never by sleeping through it. Covered: projects
created, listed and archived; an agent created with its token, secret and
z4j-bare configuration shown once (and they open a session); the agents
list with last seen and workers; revocation; a token rotation during which
old and new tokens both work, after which the old token's live session
closes 4401 and it is refused; a secret rotation during which a live
session keeps streaming and the previous secret still connects, after
which sessions on it close 4403; the audit rows (actor, source, outcome);
hostile input gets a clear 4xx.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import openapi_schema_validator
import orjson
import trio

from z4j import keys
from z4j.brain.http.openapi import OPENAPI
from z4j.brain.http.queues_api import purge_token
from z4j.config import Config
from z4j.protocol.agent import frames as f
from z4j.protocol.agent.signing import decode_secret
from z4j.protocol.close import CloseCode
from z4j.testing.agents import RawAgent, admin_token, raw_agent
from z4j.testing.brain import read_events, running_brain, wait_until
from z4j.testing.http import http_request
from z4j.testing.store import json_of, query

HOUR = 3600


class Clock:
    """The wall clock, moved on by the test."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def call(
    http: tuple[str, int], method: str, path: str, token: str, body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}", "Host": "brain.example:7700"}
    if method == "POST":
        headers["Content-Type"] = "application/json"
    payload = b"{}" if body is None and method == "POST" else orjson.dumps(body)
    reply = await http_request(
        http, method, "/api/v1" + path, body=payload if method == "POST" else None, headers=headers
    )
    return reply.status, reply.json()


def conforms(item: Any, schema: str) -> None:
    """``item`` is what the OpenAPI document says ``schema`` is."""
    openapi_schema_validator.validate(
        item,
        {**OPENAPI["components"]["schemas"][schema], "components": OPENAPI["components"]},
        cls=openapi_schema_validator.OAS30Validator,
        format_checker=openapi_schema_validator.oas30_format_checker,
    )


def config_env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


def audit(config: Config, prefix: str) -> list[tuple[str, str, dict[str, Any]]]:
    rows = query(
        config,
        "SELECT action, actor, details FROM audit_events WHERE action LIKE ? ORDER BY id",
        prefix + "%",
    )
    return [(action, actor, json_of(config, details)) for action, actor, details in rows]


def agent_event_ids(config: Config) -> set[str]:
    return {e["body"]["id"] for e in read_events(config) if e["source"] == "agent"}


async def stream_one(agent: RawAgent, n: int) -> None:
    """One event, acknowledged: the session is alive and its signatures verify."""
    event = f.AgentEvent(id=f"e-{n}", kind="k", raw={"id": f"e-{n}", "kind": "k"})
    await agent.send(f.EventBatch(events=(event,)), frame_id=f"b-{n}")
    while True:
        frame = await agent.receive()
        if isinstance(frame.payload, f.EventBatchAck):
            assert frame.payload.acked_id == f"b-{n}"
            return


async def test_projects_and_agents_are_provisioned_listed_and_archived(config: Config) -> None:
    admin = await admin_token(config)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            status, project = await call(http, "POST", "/projects", admin, {"name": "shop"})
            assert status == 201 and project["name"] == "shop" and project["archived_at"] is None
            assert (await call(http, "POST", "/projects", admin, {"name": "shop"}))[0] == 409
            for bad in ("", " x", "a\nb", str(uuid.uuid4()), 7, "x" * 201):
                status, body = await call(http, "POST", "/projects", admin, {"name": bad})
                assert status == 400 and body["error"] == "bad_request", bad
            status, listed = await call(http, "GET", "/projects", admin)
            assert [p["name"] for p in listed["items"]] == ["shop"]

            status, made = await call(
                http, "POST", "/agents", admin, {"project": "shop", "name": "web"}
            )
            assert status == 201, made
            conforms(made, "AgentCredentials")
            conforms(project, "Project")
            env = config_env(made["config"])
            assert env == {
                "Z4J_BRAIN_URL": "http://brain.example:7700",
                "Z4J_TOKEN": made["token"],
                "Z4J_PROJECT_ID": project["id"],
                "Z4J_HMAC_SECRET": made["signing_secret"],
            }
            master = keys.master_secret(config)
            assert made["signing_secret"] == keys.project_secret_text(
                master, uuid.UUID(project["id"])
            )
            agent_id = made["agent"]["id"]
            status, again = await call(
                http, "POST", "/agents", admin, {"project": "shop", "name": "web"}
            )
            assert status == 409 and again["error"] == "name_taken"
            status, _ = await call(http, "POST", "/agents", admin, {"project": "nope", "name": "x"})
            assert status == 404
            status, _ = await call(
                http,
                "POST",
                "/agents",
                admin,
                {"project": "shop", "name": "x", "brain_url": "javascript:alert(1)"},
            )
            assert status == 400

            # What was shown opens a session; the list then shows it live.
            async with raw_agent(http, made["token"], made["signing_secret"], prove=True) as live:
                await stream_one(live, 1)
                status, agents = await call(http, "GET", "/agents", admin)
                (item,) = agents["items"]
                assert item["id"] == agent_id and item["project"] == "shop"
                assert [w["worker_id"] for w in item["workers"]] == ["w-1"]
                assert item["last_seen"] == item["workers"][0]["last_seen"] is not None
                assert item["token_grace_until"] is None

                # Revoked: the live session closes 4003.
                status, revoked = await call(http, "POST", f"/agents/{agent_id}/revoke", admin)
                assert status == 200 and revoked["revoked"] is True
                conforms(revoked, "Agent")
                assert await live.closed_with() == CloseCode.REVOKED
            status, body = await call(http, "POST", f"/agents/{agent_id}/revoke", admin)
            assert status == 409 and body["error"] == "revoked"
            status, body = await call(http, "POST", f"/agents/{agent_id}/rotate-token", admin)
            assert status == 409
            status, _ = await call(http, "POST", f"/agents/{uuid.uuid4()}/revoke", admin)
            assert status == 404
            status, _ = await call(http, "POST", "/agents/not-an-id/revoke", admin)
            assert status == 400

            # Archived: its agents are revoked, it takes no new ones.
            status, other = await call(
                http, "POST", "/agents", admin, {"project": "shop", "name": "worker"}
            )
            assert status == 201
            status, archived = await call(http, "POST", f"/projects/{project['id']}/archive", admin)
            assert status == 200 and archived["archived_at"] is not None
            conforms(archived, "Project")
            status, agent = await call(http, "GET", f"/agents/{other['agent']['id']}", admin)
            assert agent["revoked"] is True
            status, body = await call(
                http, "POST", "/agents", admin, {"project": "shop", "name": "late"}
            )
            assert status == 409 and body["error"] == "archived"
            status, body = await call(http, "POST", f"/projects/{project['id']}/archive", admin)
            assert status == 409
            status, body = await call(
                http, "POST", f"/projects/{project['id']}/rotate-secret", admin
            )
            assert status == 409

    rows = audit(config, "project.") + audit(config, "agent.")
    assert {(action, details["outcome"]) for action, _, details in rows} == {
        ("project.create", "ok"),
        ("project.create", "refused:name_taken"),
        ("project.archive", "ok"),
        ("project.archive", "refused:archived"),
        ("project.secret.rotate", "refused:archived"),
        ("agent.create", "ok"),
        ("agent.create", "refused:name_taken"),
        ("agent.create", "refused:archived"),
        ("agent.revoke", "ok"),
        ("agent.revoke", "refused:revoked"),
        ("agent.token.rotate", "refused:revoked"),
    }
    assert all(
        actor == "token:test" and details["source"] == "127.0.0.1" for _, actor, details in rows
    )
    archive = next(d for a, _, d in rows if a == "project.archive" and d["outcome"] == "ok")
    assert archive["agents_revoked"] == [other["agent"]["id"]]


async def test_a_token_rotation_keeps_both_tokens_until_the_grace_ends(config: Config) -> None:
    admin = await admin_token(config)
    clock = Clock()
    with trio.fail_after(60):
        async with running_brain(config, clock=clock) as brain:
            http = brain.addresses.http
            await call(http, "POST", "/projects", admin, {"name": "shop"})
            _, made = await call(http, "POST", "/agents", admin, {"project": "shop", "name": "w"})
            old, secret, agent_id = made["token"], made["signing_secret"], made["agent"]["id"]
            for bad in (-1, HOUR * 24 * 31, "60", True, 1.5):
                status, _ = await call(
                    http, "POST", f"/agents/{agent_id}/rotate-token", admin, {"grace_seconds": bad}
                )
                assert status == 400, bad
            async with raw_agent(http, old, secret, worker_id="old", prove=True) as before:
                await stream_one(before, 1)
                status, rotated = await call(
                    http,
                    "POST",
                    f"/agents/{agent_id}/rotate-token",
                    admin,
                    {"grace_seconds": HOUR, "brain_url": "https://z4j.example/"},
                )
                assert status == 200, rotated
                conforms(rotated, "AgentCredentials")
                assert [w["worker_id"] for w in rotated["agent"]["workers"]] == ["old"]
                assert rotated["agent"]["token_grace_until"] == rotated["old_tokens_expire_at"]
                new = rotated["token"]
                assert new != old and rotated["signing_secret"] == secret
                assert config_env(rotated["config"])["Z4J_TOKEN"] == new
                assert config_env(rotated["config"])["Z4J_BRAIN_URL"] == "https://z4j.example"
                _, listed = await call(http, "GET", f"/agents/{agent_id}", admin)
                assert listed["token_grace_until"] == rotated["old_tokens_expire_at"]

                # Within the grace: the live session streams on, the old token
                # still opens sessions, and so does the new one.
                await stream_one(before, 2)
                async with raw_agent(http, old, secret, worker_id="old2", prove=True) as second:
                    await stream_one(second, 3)
                    async with raw_agent(http, new, secret, worker_id="new", prove=True) as after:
                        await stream_one(after, 4)
                        clock.offset = HOUR + 1  # the grace is over
                        assert await before.closed_with() == CloseCode.UNAUTHORIZED
                        assert await second.closed_with() == CloseCode.UNAUTHORIZED
                        await stream_one(after, 5)  # the new token's session lives on
            async with raw_agent(http, old, secret, hello=False) as refused:
                assert await refused.closed_with() == CloseCode.UNAUTHORIZED
            assert brain.stats.agent_rejected["token_expired"] == 2
    ((_, _, details),) = audit(config, "agent.token.rotate")
    assert details == {
        "project_id": made["agent"]["project_id"],
        "grace_seconds": HOUR,
        "source": "127.0.0.1",
        "outcome": "ok",
    }


async def test_a_secret_rotation_keeps_live_agents_streaming(config: Config) -> None:
    admin = await admin_token(config)
    clock = Clock()
    with trio.fail_after(60):
        async with running_brain(config, clock=clock) as brain:
            http = brain.addresses.http
            _, project = await call(http, "POST", "/projects", admin, {"name": "shop"})
            _, made = await call(http, "POST", "/agents", admin, {"project": "shop", "name": "w"})
            token, old = made["token"], made["signing_secret"]
            path = f"/projects/{project['id']}/rotate-secret"
            async with raw_agent(http, token, old, worker_id="a", prove=True) as live:
                await stream_one(live, 1)
                status, rotated = await call(http, "POST", path, admin, {"grace_seconds": HOUR})
                assert status == 200, rotated
                conforms(rotated, "SecretRotated")
                new = rotated["signing_secret"]
                assert new != old and rotated["project"]["secret_generation"] == 1
                assert rotated["previous_secret_expires_at"] is not None
                await stream_one(live, 2)  # mid-stream, on the previous secret
                async with raw_agent(http, token, old, worker_id="b", prove=True) as late_old:
                    await stream_one(late_old, 3)
                    async with raw_agent(http, token, new, worker_id="c", prove=True) as moved:
                        await stream_one(moved, 4)
                        clock.offset = HOUR + 1
                        assert await live.closed_with() == CloseCode.FORBIDDEN
                        assert await late_old.closed_with() == CloseCode.FORBIDDEN
                        await stream_one(moved, 5)
            async with raw_agent(http, token, old, worker_id="d", prove=True) as refused:
                assert await refused.closed_with() == CloseCode.FORBIDDEN
            await wait_until(lambda: brain.stats.agent_sessions_open == 0)
            # Every acknowledged event is stored, whichever key signed it.
            await wait_until(lambda: len(agent_event_ids(config)) >= 5)
    assert agent_event_ids(config) == {f"e-{n}" for n in range(1, 6)}
    ((_, _, details),) = audit(config, "project.secret.rotate")
    assert details["generation"] == 1 and details["outcome"] == "ok"


async def test_purge_tokens_are_signed_with_the_rotated_secret(config: Config) -> None:
    """A queue purge's confirmation token is keyed with the project's current
    secret: the one the agents are moving to."""
    admin = await admin_token(config)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            _, project = await call(http, "POST", "/projects", admin, {"name": "shop"})
            _, made = await call(http, "POST", "/agents", admin, {"project": "shop", "name": "w"})
            _, rotated = await call(
                http, "POST", f"/projects/{project['id']}/rotate-secret", admin, {}
            )
            new = rotated["signing_secret"]
            async with raw_agent(
                http, made["token"], new, prove=True, capabilities={"celery": ["purge_queue"]}
            ):
                # The worker's row is written after its proof.
                await wait_until(lambda: bool(query(config, "SELECT 1 FROM workers")))
                status, command = await call(
                    http,
                    "POST",
                    "/queues/celery/emails/purge",
                    admin,
                    {"agent_id": made["agent"]["id"], "confirm_depth": 7},
                )
    assert status == 201, command
    key = decode_secret(new)
    assert command["parameters"]["confirm_token"] == purge_token(key, "emails", 7)

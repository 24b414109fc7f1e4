"""``GET /api/v1/audit``: filters and keyset pages, on both stores.

Rows are written through the store (as routes and the CLI write them); what
each filter should return is computed here from the full, unfiltered list,
so the test holds whatever the clock did between the writes. Time bounds
are taken halfway between two rows' times, so no rounding of a stored time
decides the answer.
"""

from __future__ import annotations

import sqlite3
import uuid
from typing import Any
from urllib.parse import urlencode

import psycopg
import trio

from z4j.config import Config
from z4j.testing.agents import admin_token
from z4j.testing.brain import running_brain
from z4j.testing.http import http_request
from z4j.testing.store import open_store, query

PROJECT = uuid.uuid4()


def _execute(config: Config, statements: list[str]) -> None:
    """Write outside the store under test (blocking)."""
    if config.database_url is not None:
        with psycopg.connect(config.database_url, autocommit=True) as conn:
            for sql in statements:
                conn.execute(sql.encode())
        return
    db = sqlite3.connect(config.sqlite_store_path, isolation_level=None)
    try:
        for sql in statements:
            db.execute(sql)
    finally:
        db.close()


ROWS: list[tuple[str, str, str, dict[str, Any]]] = [  # actor, action, subject, details
    ("alice", "project.create", f"project:{PROJECT}", {"name": "shop"}),
    ("bob", "session.sign_in", "user:bob", {"outcome": "refused:bad_password"}),
    ("bob", "session.sign_in", "user:bob", {"outcome": "ok"}),
    ("cli:root", "dead_letter.requeued", "b1/4", {"row_id": 9}),
    ("alice", "dead_letter.discarded", "b1/5", {}),
    ("alice", "command.created", "cmd-1", {"project_id": str(PROJECT), "outcome": "ok"}),
    ("carol", "agent.create", "agent:x", {"outcome": "refused:conflict"}),
    ("alice", "dead_letter.requeued", "b2/1", {"row_id": 3}),
]


async def get(http: tuple[str, int], token: str, **params: str) -> tuple[int, Any]:
    path = "/api/v1/audit" + (f"?{urlencode(params)}" if params else "")
    reply = await http_request(http, "GET", path, headers={"Authorization": f"Bearer {token}"})
    return reply.status, reply.json()


async def every_page(http: tuple[str, int], token: str, **params: str) -> list[dict[str, Any]]:
    """All matching rows, walked two at a time through next_cursor."""
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(50):
        extra = {"cursor": cursor} if cursor else {}
        status, body = await get(http, token, limit="2", **params, **extra)
        assert status == 200, body
        rows += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return rows
    raise AssertionError("more pages than rows")


async def test_audit_filters_and_pages(config: Config) -> None:
    async with open_store(config) as store:
        for actor, action, subject, details in ROWS:
            await store.audit(action, subject, details, actor=actor)
        stored = await store.list_audit(limit=500)  # newest first, with their times
    token = await admin_token(config)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            everything = await every_page(http, token)
            # The brain's own rows (its first admin token, say) come too.
            ours = [r for r in everything if r["id"] in {s.id for s in stored}]
            assert [r["action"] for r in ours] == [a for _, a, _, _ in reversed(ROWS)]
            at = {s.id: s.at for s in stored}

            def ids(rows: list[dict[str, Any]]) -> list[int]:
                return [r["id"] for r in rows]

            def expect(keep: Any) -> list[int]:
                return ids([r for r in everything if keep(r)])

            outcome = lambda r: r["details"].get("outcome")  # noqa: E731
            cases: list[tuple[dict[str, str], Any]] = [
                ({"actor": "alice"}, lambda r: r["actor"] == "alice"),
                ({"actor": "cli:root"}, lambda r: r["actor"] == "cli:root"),
                ({"action": "session.sign_in"}, lambda r: r["action"] == "session.sign_in"),
                ({"action": "dead_letter.*"}, lambda r: r["action"].startswith("dead_letter.")),
                ({"action": "Dead_letter.*"}, lambda r: False),  # case counts, on both stores
                ({"action": "*"}, lambda r: True),
                ({"subject": "b1/*"}, lambda r: r["subject"].startswith("b1/")),
                ({"subject": "user:bob"}, lambda r: r["subject"] == "user:bob"),
                ({"outcome": "refused"}, lambda r: str(outcome(r)).startswith("refused")),
                ({"outcome": "ok"}, lambda r: outcome(r) in (None, "ok")),
                (
                    {"project_id": str(PROJECT)},
                    lambda r: (
                        r["subject"] == f"project:{PROJECT}"
                        or r["details"].get("project_id") == str(PROJECT)
                    ),
                ),
                (
                    {"actor": "alice", "action": "dead_letter.*"},
                    lambda r: r["actor"] == "alice" and r["action"].startswith("dead_letter."),
                ),
                ({"actor": "nobody"}, lambda r: False),
            ]

            # A time range: bounds halfway between distinct stored times; the
            # brain's rows were written after ours were read, so later than all.
            def when(r: dict[str, Any]) -> float:
                return at.get(r["id"], float("inf"))

            times = sorted(set(at.values()))
            assert len(times) >= 3  # eight writes, each a transaction of its own
            since = (times[0] + times[1]) / 2
            until = (times[-2] + times[-1]) / 2
            cases += [
                ({"since": repr(since), "until": repr(until)}, lambda r: since <= when(r) < until),
                ({"until": repr(since)}, lambda r: when(r) < since),
                (
                    {"since": repr(until), "actor": "alice"},
                    lambda r: when(r) >= until and r["actor"] == "alice",
                ),
            ]
            for params, keep in cases:
                got = await every_page(http, token, **params)
                assert ids(got) == expect(keep), params

            for params in (
                {"outcome": "maybe"},
                {"actor": "x" * 201},
                {"action": "a\x00b"},
                {"since": "yesterday"},
                {"until": "-1"},
                {"project_id": "nope"},
                {"cursor": "x"},
            ):
                status, body = await get(http, token, **params)
                assert status == 400 and body["error"] == "bad_request", params


async def test_audit_filters_read_their_indexes(config: Config) -> None:
    """Over 20,000 rows, an exact actor, action or subject is an index search
    (migration 17), not a walk of the table in id order."""
    from z4j.store.audit_query import AuditFilter, audit_where
    from z4j.store.postgres import PG
    from z4j.store.sqlite import SQ

    async with open_store(config):
        pass
    pg = config.database_url is not None
    fill = (
        "INSERT INTO audit_events (at, actor, action, subject, details)"
        " SELECT now(), 'bulk', 'bulk.step', 'step:' || n, '{}' FROM generate_series(1, 20000) n"
        if pg
        else "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)"
        " INSERT INTO audit_events (at, actor, action, subject, details)"
        " SELECT 0, 'bulk', 'bulk.step', 'step:' || i, '{}' FROM n"
    )
    await trio.to_thread.run_sync(_execute, config, [fill, "ANALYZE"])
    for where, index in (
        (AuditFilter(actor="rare"), "audit_events_by_actor"),
        (AuditFilter(action="rare.action"), "audit_events_by_action"),
        (AuditFilter(subject="step:7"), "audit_events_by_subject"),
    ):
        clause = audit_where(PG if pg else SQ, where, None)
        sql = f"SELECT id FROM audit_events{clause} ORDER BY id DESC LIMIT 51"
        explain = "EXPLAIN " if pg else "EXPLAIN QUERY PLAN "
        plan = " ".join(
            str(row) for row in query(config, explain + sql.replace("%s", "?"), *clause.params)
        )
        assert index in plan, (where, plan)

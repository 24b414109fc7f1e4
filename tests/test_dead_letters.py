"""Dead letters: payloads the store refused, set aside, then re-queued or discarded.

The store refuses for real (z4j.testing.dead_letters: a CHECK constraint on
Postgres, an ABORT trigger on SQLite) a payload that came in through the
ingest port like any other; the drain sets it aside; the API lists,
inspects, re-queues (refused again: set aside again; accepted: stored) and
discards it, each counted in /metrics and written to the audit log.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

import z4j.ingest
from z4j.buffer import Buffer, BufferFile, BufferFull, NewRow
from z4j.config import Config
from z4j.protocol.agent import frames as f
from z4j.stats import BrainStats
from z4j.testing.agents import admin_token, provision, raw_agent
from z4j.testing.brain import read_events, running_brain, wait_until
from z4j.testing.dead_letters import accept_kind, refuse_kind
from z4j.testing.drain import draining
from z4j.testing.http import http_get, http_request
from z4j.testing.store import open_store, query


def _row(body: bytes) -> NewRow:
    return NewRow(received_at=time.time(), source="tcp", body=body)


def test_the_buffer_sets_aside_requeues_and_discards(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    buf = BufferFile(path)
    try:
        buf.append([_row(b'[{"t": "a"}]'), _row(b'[{"t": "b", "x": "' + b"y" * 1000 + b'"}]')])
        claim = buf.claim(10, 60)
        assert claim is not None
        assert buf.quarantine(claim, 1, "refused: one") == 1
        assert buf.quarantine(claim, 2, "refused: two") == 1
        assert (buf.depth, buf.dead_letter_rows) == (0, 2)

        page = buf.dead_letter_page(before=None, limit=1, body_bytes=10)
        assert [d.id for d in page] == [2]  # newest first
        assert (page[0].body, page[0].body_bytes) == (b'[{"t": "b"', 1021)
        assert [d.id for d in buf.dead_letter_page(before=2, limit=10, body_bytes=10)] == [1]
        one = buf.dead_letter(1, body_bytes=1000)
        assert one is not None and (one.body, one.error) == (b'[{"t": "a"}]', "refused: one")
        assert buf.dead_letter(3, body_bytes=10) is None

        # Re-queued: back in payloads under a new id, claimable like a new row.
        moved = buf.requeue([1, 99])
        assert list(moved) == [1] and moved[1] > 2
        again = buf.claim(10, 60)
        assert again is not None and [r.id for r in again.rows] == [moved[1]]
        assert again.rows[0].body == b'[{"t": "a"}]'
        assert (buf.depth, buf.dead_letter_rows) == (1, 1)
        with pytest.raises(BufferFull):  # no room: nothing moves
            buf.requeue([2], max_rows=1)
        assert buf.dead_letter_rows == 1

        assert buf.discard([2, 2, 5]) == [2]
        assert buf.dead_letter_rows == 0 and buf.dead_letters() == 0
    finally:
        buf.close()
    buf = BufferFile(path)  # the totals are kept in the file
    try:
        assert buf.dead_letter_totals == {"dead_letters_requeued": 1, "dead_letters_discarded": 1}
        assert buf.dead_letter_rows == 0
    finally:
        buf.close()


async def test_the_drain_sets_aside_what_the_store_refuses_and_takes_it_back(
    config: Config, tmp_path: Path
) -> None:
    """The drain over a real store: refused, set aside; re-queued and refused
    again, set aside again; re-queued once the store takes it, stored."""
    stats = BrainStats()
    buffer = await Buffer.open(tmp_path / "b.sqlite3", max_rows=100)
    try:
        async with open_store(config) as store:
            await trio.to_thread.run_sync(refuse_kind, config, "poison")
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    await nursery.start(buffer.run_writer)
                    async with draining(
                        buffer, store, batch_rows=10, lease_seconds=30, stats=stats
                    ):
                        assert buffer.admit(3)
                        await buffer.append(
                            [
                                _row(b'[{"t": "log"}]'),
                                _row(b'[{"t": "poison"}]'),
                                _row(b'[{"t": "x"}]'),
                            ]
                        )
                        await wait_until(lambda: stats.drain_quarantined == 1)
                        await wait_until(lambda: buffer.statistics().depth == 0)
                        # Counted once the buffer's delete has returned: after depth is 0.
                        await wait_until(lambda: stats.drain_records_stored == 2)
                        (letter,) = await buffer.dead_letter_page(
                            before=None, limit=10, body_bytes=99
                        )
                        assert letter.id == 2 and "poison" in letter.error

                        moved = await buffer.requeue([letter.id])
                        await wait_until(lambda: stats.drain_quarantined == 2)
                        assert buffer.statistics().dead_letter_rows == 1

                        await trio.to_thread.run_sync(accept_kind, config, "poison")
                        await buffer.requeue([moved[letter.id]])
                        await wait_until(lambda: stats.drain_records_stored == 3)
                        assert stats.drain_quarantined == 2
                        assert await buffer.discard([moved[letter.id]]) == []  # it left

                        assert buffer.admit(1)
                        await buffer.append([_row(b'[{"t": 1}]')])  # no string kind: refused
                        await wait_until(lambda: stats.drain_quarantined == 3)
                        (bad,) = await buffer.dead_letter_page(before=None, limit=10, body_bytes=99)
                        assert await buffer.discard([bad.id]) == [bad.id]
                    buffer.close_writer()
            s = buffer.statistics()
            assert (s.dead_letter_rows, s.dead_letters_requeued, s.dead_letters_discarded) == (
                0,
                2,
                1,
            )
    finally:
        await buffer.aclose()


async def call(
    http: tuple[str, int], method: str, path: str, token: str, body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    payload = b""
    if body is not None:
        headers["Content-Type"] = "application/json"
        payload = orjson.dumps(body)
    reply = await http_request(http, method, f"/api/v1{path}", body=payload, headers=headers)
    return reply.status, reply.json()


async def metric(http: tuple[str, int], name: str) -> float:
    status, text = await http_get(http, "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


async def test_dead_letters_are_listed_inspected_requeued_and_discarded(config: Config) -> None:
    async with open_store(config):
        pass
    await trio.to_thread.run_sync(refuse_kind, config, "poison")
    token = await admin_token(config)
    with trio.fail_after(90):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            client = await z4j.ingest.open_trio(*brain.ingest)
            async with client:
                await client.send([{"t": "log", "n": 1}])
                await client.send([{"t": "poison", "n": 2}, {"t": "log", "n": 3}])
                await client.send([{"t": "poison", "n": 4}])
            await wait_until(lambda: brain.stats.drain_quarantined == 2)
            await wait_until(lambda: len(read_events(config)) == 1)

            status, listed = await call(http, "GET", "/dead-letters?limit=1", token)
            assert status == 200 and listed["total"] == 2
            assert listed["instance"]["name"] and listed["instance"]["buffer_id"]
            newest = listed["items"][0]
            assert orjson.loads(newest["body"]) == [{"t": "poison", "n": 4}]
            assert "poison" in newest["error"] and newest["source"].startswith("tcp")
            status, rest = await call(
                http, "GET", f"/dead-letters?cursor={listed['next_cursor']}", token
            )
            assert status == 200 and rest["next_cursor"] is None
            first = rest["items"][0]
            status, detail = await call(http, "GET", f"/dead-letters/{first['id']}", token)
            assert status == 200 and not detail["body_truncated"]
            assert orjson.loads(detail["body"]) == [{"t": "poison", "n": 2}, {"t": "log", "n": 3}]

            # Re-queued while the store still refuses it: set aside again, counted again.
            status, done = await call(http, "POST", f"/dead-letters/{first['id']}/requeue", token)
            assert status == 200 and done["requeued"][0]["id"] == first["id"]
            new_id = done["requeued"][0]["row_id"]
            await wait_until(lambda: brain.stats.drain_quarantined == 3)
            status, listed = await call(http, "GET", "/dead-letters", token)
            assert sorted(d["id"] for d in listed["items"]) == sorted([newest["id"], new_id])

            status, gone = await call(http, "POST", f"/dead-letters/{newest['id']}/discard", token)
            assert (status, gone) == (200, {"discarded": [newest["id"]]})
            status, _ = await call(http, "GET", f"/dead-letters/{newest['id']}", token)
            assert status == 404

            # The store takes it now: re-queued (in bulk, one id unknown), it lands.
            await trio.to_thread.run_sync(accept_kind, config, "poison")
            status, done = await call(
                http, "POST", "/dead-letters/requeue", token, {"ids": [new_id, 424242]}
            )
            assert status == 200 and done["missing"] == [424242]
            await wait_until(lambda: len(read_events(config)) == 3)
            assert brain.stats.drain_quarantined == 3
            status, listed = await call(http, "GET", "/dead-letters", token)
            assert (listed["items"], listed["total"]) == ([], 0)

            assert await metric(http, "z4j_dead_letters_requeued_total") == 2
            assert await metric(http, "z4j_dead_letters_discarded_total") == 1
            assert await metric(http, "z4j_dead_letter_rows") == 0
            assert await metric(http, "z4j_drain_quarantined_rows_total") == 3

            # Hostile or wrong input: a clear 4xx.
            for method, path, body in [
                ("GET", "/dead-letters/abc", None),
                ("GET", "/dead-letters/0", None),
                ("GET", "/dead-letters?cursor=-1", None),
                ("POST", "/dead-letters/requeue", {"ids": []}),
                ("POST", "/dead-letters/discard", {"ids": ["1"]}),
                ("POST", "/dead-letters/discard", {"ids": list(range(1, 502))}),
                ("POST", "/dead-letters/requeue", {"ids": [2**63]}),
            ]:
                status, error = await call(http, method, path, token, body)
                assert status == 400, (path, body, error)
            status, _ = await call(http, "POST", "/dead-letters/99999/requeue", token)
            assert status == 404

    audit = query(
        config,
        "SELECT action, subject, actor FROM audit_events WHERE action IN (?, ?) ORDER BY id",
        "dead_letter.requeued",
        "dead_letter.discarded",
    )
    assert [(a, s.rsplit("/", 1)[1]) for a, s, _ in audit] == [
        ("dead_letter.requeued", str(first["id"])),
        ("dead_letter.discarded", str(newest["id"])),
        ("dead_letter.requeued", str(new_id)),
    ]
    assert {actor for _, _, actor in audit} == {"token:test"}  # request.actor: the admin token


async def test_the_task_registry_shows_what_registry_deltas_left(config: Config) -> None:
    token, secret, agent_id = await provision(config)
    admin = await admin_token(config)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            async with raw_agent(http, token, secret, worker_id="w-1") as agent:
                await agent.send(
                    f.RegistryDelta(
                        engine="celery",
                        added=({"name": "app.b", "queue": "q"}, {"name": "app.a"}),
                    )
                )
                await agent.send(
                    f.RegistryDelta(engine="celery", removed=("app.b",), updated=({"name": "x"},))
                )

                async def registry() -> Any:
                    status, body = await call(http, "GET", "/task-registry", admin)
                    assert status == 200
                    return body

                async def settled() -> bool:
                    items = (await registry())["items"]
                    names = (
                        [t["name"] for t in items[0]["engines"].get("celery", [])] if items else []
                    )
                    return names == ["app.a", "x"]

                await wait_until(settled)
            body = await registry()
            assert body["items"][0]["agent_id"] == str(agent_id)
            assert body["items"][0]["worker_id"] == "w-1"
            status, page = await call(
                http, "GET", f"/task-registry?agent_id={agent_id}&limit=1", admin
            )
            assert status == 200 and len(page["items"]) == 1 and page["next_cursor"] is None
            for path in (
                "/task-registry?agent_id=nope",
                "/task-registry?limit=101",
                "/task-registry?cursor=bad",
            ):
                status, _ = await call(http, "GET", path, admin)
                assert status == 400, path

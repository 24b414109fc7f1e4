"""`z4j brain --instances N`: shared ports, one row each, restarts, stops, no orphans.

The supervisor runs as a real process (``Z4J_INSTANCES=2 python -m z4j
brain``) on fixed loopback ports, on a real Postgres for the paths where
the instances serve.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import time
from collections import Counter
from pathlib import Path

import orjson
import psycopg
import pytest
import trio

import z4j.ingest
from z4j.config import Config, config_env, load_config
from z4j.supervisor import buffer_path_for, restart_delay, stranded_buffers
from z4j.testing.agents import admin_token
from z4j.testing.brain import BrainProcess, make_config, run_z4j, wait_until
from z4j.testing.http import http_request

GRACE = 5.0
READY = re.compile(r"z4j\.supervisor: instance (\d+) ready \(pid (\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def supervisor_env(data: Path, database_url: str, **extra: str) -> dict[str, str]:
    env = {
        "Z4J_INSTANCES": "2",
        "Z4J_DATA_DIR": str(data),
        "Z4J_DATABASE_URL": database_url,
        "Z4J_INGEST_BIND": f"127.0.0.1:{free_port()}",
        "Z4J_HTTP_BIND": f"127.0.0.1:{free_port()}",
        "Z4J_HEARTBEAT_SECONDS": "0.5",
        "Z4J_SHUTDOWN_GRACE_SECONDS": str(GRACE),
    }
    env.update(extra)
    return env


def ready_children(brain: BrainProcess) -> list[tuple[int, int]]:
    """(slot, pid) of every child the supervisor reported ready, in order."""
    return [(int(s), int(p)) for s, p in READY.findall(brain.log_text())]


def live_pids(brain: BrainProcess) -> dict[int, int]:
    """The latest ready child of each slot."""
    return dict(ready_children(brain))


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever adopted it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def wait_ready(brain: BrainProcess, count: int, timeout: float = 30.0) -> None:
    def enough() -> bool:
        if brain.proc.poll() is not None:
            raise AssertionError(f"supervisor exited:\n{brain.log_text()[-3000:]}")
        return len(ready_children(brain)) >= count

    await wait_until(enough, timeout=timeout, interval=0.05)


async def send_payloads(address: tuple[str, int], first: int, count: int) -> None:
    """``count`` payloads of 5 records, each on a new connection (as NightOwl does)."""
    for batch in range(first, first + count):
        client = await z4j.ingest.open_trio(*address)
        async with client:
            await client.send([{"t": "log", "batch": batch, "i": i} for i in range(5)])


def stored(database_url: str) -> tuple[Counter[tuple[int, int]], int]:
    """Stored records by (batch, i), and how many buffers they came from."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT body::text, buffer_id FROM events").fetchall()
    records: Counter[tuple[int, int]] = Counter()
    for body, _ in rows:
        record = orjson.loads(body)
        records[record["batch"], record["i"]] += 1
    return records, len({buffer for _, buffer in rows})


async def wait_stored(database_url: str, batches: int) -> Counter[tuple[int, int]]:
    async def done() -> bool:
        records, _ = await trio.to_thread.run_sync(stored, database_url)
        return sum(records.values()) >= batches * 5

    await wait_until(done, timeout=60, interval=0.2)
    records, _ = await trio.to_thread.run_sync(stored, database_url)
    return records


async def live_instances(config: Config, address: tuple[str, int], token: str) -> set[int]:
    """Pids of the instance rows not stopped, from /api/v1/instances (any child answers)."""
    reply = await http_request(
        address, "GET", "/api/v1/instances", headers={"Authorization": f"Bearer {token}"}
    )
    assert reply.status == 200, (reply.status, reply.body[:500])
    body = reply.body
    items = orjson.loads(body)["items"]
    # A row counts as live while its heartbeat is fresh: a SIGKILLed child
    # never writes `stopped_at`.
    now = time.time()
    return {
        i["pid"] for i in items if i["stopped_at"] is None and now - _epoch(i["last_seen"]) < 3.0
    }


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def assert_once(records: Counter[tuple[int, int]], batches: int) -> None:
    duplicates = {k: n for k, n in records.items() if n > 1}
    assert not duplicates, f"stored twice: {sorted(duplicates)[:10]}"
    missing = [(b, i) for b in range(batches) for i in range(5) if (b, i) not in records]
    assert not missing, f"{len(missing)} records missing, e.g. {missing[:10]}"


# -- the supervisor running two brains -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
async def test_two_instances_serve_restart_and_stop(tmp_path: Path, pg_url: str) -> None:
    data = tmp_path / "data"
    env = supervisor_env(data, pg_url)
    brain = BrainProcess(env, log_path=tmp_path / "brain.log")
    seen: set[int] = set()
    try:
        await wait_ready(brain, 2)
        children = live_pids(brain)
        assert sorted(children) == [1, 2]
        seen.update(children.values())
        assert brain.ingest == ("127.0.0.1", int(env["Z4J_INGEST_BIND"].rsplit(":")[1]))
        text = brain.log_text()
        assert f"buffer {data / 'buffer.sqlite3'}" in text
        assert f"buffer {data / 'buffer-2.sqlite3'}" in text
        assert "[instance 1] z4j.brain" in text and "[instance 2] z4j.brain" in text

        # Both serve: one instance row each (read through the shared HTTP port).
        config = make_config(data, pg_url, heartbeat_seconds=0.5)
        token = await admin_token(config)

        async def both_live() -> bool:
            return await live_instances(config, brain.http, token) == set(children.values())

        await wait_until(both_live, timeout=30, interval=0.2)

        # Ingest through the shared port lands once, and both took some.
        await send_payloads(brain.ingest, 0, 100)
        records = await wait_stored(pg_url, 100)
        assert_once(records, 100)
        assert (await trio.to_thread.run_sync(stored, pg_url))[1] == 2, "one instance took all"

        # A SIGKILLed child is restarted, on the same buffer file; the other
        # one takes every connection meanwhile. (Connections already queued
        # on the dead child's listener are reset by the kernel, so send only
        # once it is gone: a reset payload is not acknowledged and a client
        # would send it again.)
        os.kill(children[1], signal.SIGKILL)
        await wait_until(lambda: "was killed by SIGKILL" in brain.log_text(), timeout=60)
        await send_payloads(brain.ingest, 100, 100)
        await wait_ready(brain, 3)
        restarted = live_pids(brain)
        assert restarted[2] == children[2] and restarted[1] not in seen
        seen.add(restarted[1])
        assert re.search(
            rf"instance 1 \(pid {children[1]}\) was killed by SIGKILL after [\d.]+ s; "
            r"restarting it in 0\.5 s",
            brain.log_text(),
        )
        assert not running(children[1])

        async def replaced() -> bool:
            return await live_instances(config, brain.http, token) == set(restarted.values())

        await wait_until(replaced, timeout=30, interval=0.2)
        await send_payloads(brain.ingest, 200, 100)
        assert_once(await wait_stored(pg_url, 300), 300)

        # Dying again soon after: the delay doubles.
        os.kill(restarted[1], signal.SIGKILL)
        await wait_ready(brain, 4)
        assert re.search(r"instance 1 \(pid \d+\) .* restarting it in 1 s", brain.log_text())
        seen.update(live_pids(brain).values())

        # SIGTERM: forwarded, every child stops gracefully, exit 0 in time.
        started = time.monotonic()
        brain.signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(brain.wait, GRACE + 30)
        took = time.monotonic() - started
    finally:
        brain.kill()
        for pid in seen:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    assert code == 0, brain.log_text()[-3000:]
    # Slack for a busy machine's process teardown: the grace bounds the
    # brain's own shutdown, not the machine's speed.
    assert took < GRACE + 15.0, f"stop took {took:.1f} s with a {GRACE} s grace period"
    assert "all 2 instances stopped" in brain.log_text()
    left = [pid for pid in seen if running(pid)]
    assert not left, f"children left running: {left}"


@pytest.mark.slow
@pytest.mark.postgres
async def test_children_stop_when_the_supervisor_is_killed(tmp_path: Path, pg_url: str) -> None:
    brain = BrainProcess(supervisor_env(tmp_path / "data", pg_url), log_path=tmp_path / "b.log")
    children: list[int] = []
    try:
        await wait_ready(brain, 2)
        children = list(live_pids(brain).values())
        brain.signal(signal.SIGKILL)
        assert brain.wait(60) == -signal.SIGKILL
        # Each child reads EOF on its link and stops gracefully, on its own.
        await wait_until(lambda: not any(running(p) for p in children), timeout=GRACE + 15)
    finally:
        brain.kill()
        for pid in children:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    assert brain.log_text().count("the supervisor is gone: stopping gracefully") == 2


@pytest.mark.slow
async def test_a_child_that_cannot_start_stops_the_supervisor(tmp_path: Path) -> None:
    """A port held without SO_REUSEPORT: exit 1 with the reason, nothing left running."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        env = supervisor_env(
            tmp_path / "data",
            f"postgresql://z4j@127.0.0.1:{free_port()}/z4j",  # never reached: not needed here
            Z4J_INGEST_BIND=f"127.0.0.1:{holder.getsockname()[1]}",
        )
        result = await trio.to_thread.run_sync(lambda: run_z4j("brain", env=env, timeout=60))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "address in use" in result.stderr
    assert re.search(
        r"instance \d \(pid \d+\) exited with status 1 before it was ready", result.stderr
    )
    pids = [int(p) for p in re.findall(r"instance \d started \(pid (\d+)", result.stderr)]
    assert len(pids) == 2 and not any(running(p) for p in pids)


# -- refusals and pieces -------------------------------------------------------------------


def test_port_zero_is_refused(tmp_path: Path) -> None:
    env = {"Z4J_DATA_DIR": str(tmp_path), "Z4J_DATABASE_URL": "postgresql://z4j@127.0.0.1:1/z"}
    result = run_z4j("brain", "--instances", "2", "--ingest-bind", "127.0.0.1:0", env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "z4j: configuration error: 2 instances need fixed ports: Z4J_INGEST_BIND=127.0.0.1:0 "
        "asks for a free port, which each process would pick on its own; give a port number "
        "to share"
    )
    result = run_z4j("brain", "--instances", "3", "--http-bind", "127.0.0.1:0", env=env)
    assert result.returncode == 2 and "Z4J_HTTP_BIND=127.0.0.1:0" in result.stderr


def test_the_sqlite_store_is_refused(tmp_path: Path) -> None:
    result = run_z4j("brain", env={"Z4J_DATA_DIR": str(tmp_path), "Z4J_INSTANCES": "2"})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "z4j: configuration error: 2 instances need the Postgres store (set "
        "Z4J_DATABASE_URL): the embedded SQLite store serves one process"
    )


def test_children_get_the_configuration_back_equal(tmp_path: Path) -> None:
    config = load_config(
        env={},
        overrides={
            "data_dir": str(tmp_path),
            "database_url": "postgresql://u:p@db/z4j",
            "ingest_idle_timeout_seconds": "0.1",
            "so_reuseport": "true",
            "log_level": "debug",
            "secret": "s" * 40,
            "instances": "4",
        },
    )
    assert load_config(env=config_env(config)) == config
    assert load_config(env=config_env(load_config(env={}))) == load_config(env={})


def test_buffer_files_per_instance(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert buffer_path_for(config, 1) == tmp_path / "buffer.sqlite3"
    assert buffer_path_for(config, 2) == tmp_path / "buffer-2.sqlite3"
    custom = make_config(tmp_path, buffer_path=str(tmp_path / "b" / "spool.db"))
    assert buffer_path_for(custom, 1) == tmp_path / "b" / "spool.db"
    assert buffer_path_for(custom, 12) == tmp_path / "b" / "spool-12.db"


def test_a_buffer_beyond_the_instances_is_reported(tmp_path: Path) -> None:
    for name, rows in (("buffer-2.sqlite3", 0), ("buffer-3.sqlite3", 2), ("buffer-x.sqlite3", 1)):
        db = sqlite3.connect(tmp_path / name)
        db.execute("CREATE TABLE payloads (id INTEGER PRIMARY KEY)")
        db.executemany("INSERT INTO payloads VALUES (?)", [(i,) for i in range(rows)])
        db.commit()
        db.close()
    assert stranded_buffers(make_config(tmp_path)) == [(tmp_path / "buffer-3.sqlite3", 2)]
    assert stranded_buffers(make_config(tmp_path, instances=2)) == [
        (tmp_path / "buffer-3.sqlite3", 2)
    ]
    assert stranded_buffers(make_config(tmp_path, instances=3)) == []


def test_restart_delay_doubles_up_to_a_cap() -> None:
    assert [restart_delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]

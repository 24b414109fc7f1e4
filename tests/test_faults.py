"""Faults: the store going away, the brain killed or stopped mid-stream.

The invariant in every case: each record whose payload was answered ``2:OK``
is in ``events`` exactly once after recovery.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import trio

import z4j.ingest
from z4j.config import Config
from z4j.testing.brain import BrainProcess, make_config, read_events, running_brain, wait_until
from z4j.testing.postgres import PostgresCluster


def payload(batch: int, size: int = 3) -> list[dict[str, object]]:
    return [{"t": "log", "batch": batch, "i": i} for i in range(size)]


def assert_exactly_once(config: Config, acked: set[int], size: int = 3) -> None:
    """Every acked batch has all its records once; nothing appears twice."""
    events = read_events(config)
    seen = Counter((e["body"]["batch"], e["body"]["i"]) for e in events)  # type: ignore[index]
    duplicates = {k: n for k, n in seen.items() if n > 1}
    assert not duplicates, f"duplicated records: {sorted(duplicates)[:10]}"
    missing = [(b, i) for b in acked for i in range(size) if (b, i) not in seen]
    assert not missing, f"{len(missing)} acknowledged records missing, e.g. {missing[:10]}"


async def test_postgres_stopped_mid_drain(tmp_path: Path, own_postgres: PostgresCluster) -> None:
    config = make_config(tmp_path / "data", own_postgres.url, drain_batch_rows=50)
    acked: set[int] = set()
    with trio.fail_after(120):
        async with running_brain(config) as brain:
            client = await z4j.ingest.open_trio(*brain.ingest)
            async with client:
                batch = 0

                async def send_some(n: int) -> None:
                    nonlocal batch
                    for _ in range(n):
                        results = await client.send_many([payload(batch + k) for k in range(10)])
                        for k, ok in enumerate(results):
                            if ok:
                                acked.add(batch + k)
                        batch += 10

                await send_some(20)
                await wait_until(lambda: brain.stats.drain_batches > 0)
                await trio.to_thread.run_sync(own_postgres.stop, "immediate")
                # The buffer absorbs while the store is down; drains fail and back off.
                await send_some(30)
                await wait_until(lambda: brain.stats.drain_failures > 0, timeout=30)
                assert brain.buffer_depth() > 0
                await trio.to_thread.run_sync(own_postgres.start)
                await send_some(20)
            assert len(acked) == 700  # the store being down never refused ingest
            await wait_until(lambda: brain.buffer_depth() == 0, timeout=60)
    await trio.to_thread.run_sync(assert_exactly_once, config, acked)


class Sender(threading.Thread):
    """Sends batches on persistent connections until stopped; records acks.
    It stops at the first break (no reconnect): the brain is killed or stopped
    under it, and its retries would only wait out their budget."""

    def __init__(self, address: tuple[str, int], first_batch: int = 0) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.acked: set[int] = set()
        self.batch = first_batch
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            with z4j.ingest.connect(*self.address, timeout=60, retry_seconds=0) as client:
                while not self.stop.is_set():
                    window = list(range(self.batch, self.batch + 20))
                    self.batch += 20
                    results = client.send_many([payload(b) for b in window])
                    self.acked.update(b for b, ok in zip(window, results, strict=True) if ok)
        except (ConnectionError, OSError, z4j.ingest.IngestConnectionError) as exc:
            self.errors.append(exc)  # expected when the brain dies under us


def _env(data_dir: Path, database_url: str | None, **extra: str) -> dict[str, str]:
    env = {
        "Z4J_DATA_DIR": str(data_dir),
        "Z4J_INGEST_BIND": "127.0.0.1:0",
        "Z4J_HTTP_BIND": "127.0.0.1:0",
        "Z4J_HEARTBEAT_SECONDS": "0.5",
        "Z4J_DRAIN_BATCH_ROWS": "100",
    }
    if database_url:
        env["Z4J_DATABASE_URL"] = database_url
    env.update(extra)
    return env


async def _wait_for_events(config: Config, acked: set[int], timeout: float = 60) -> None:
    expected = len(acked) * 3

    async def done() -> bool:
        return len(await trio.to_thread.run_sync(read_events, config)) >= expected

    await wait_until(done, timeout=timeout, interval=0.2)


@pytest.mark.slow
async def test_sigkill_then_restart(tmp_path: Path, database_url: str | None) -> None:
    data = tmp_path / "data"
    config = make_config(data, database_url)
    env = _env(data, database_url)
    brain = BrainProcess(env, log_path=tmp_path / "brain.log")
    sender = Sender(brain.ingest)
    sender.start()
    try:
        await trio.to_thread.run_sync(lambda: wait_for(lambda: len(sender.acked) >= 2000))
        brain.signal(signal.SIGKILL)
        assert brain.wait(60) == -signal.SIGKILL
    finally:
        sender.stop.set()
        await trio.to_thread.run_sync(sender.join, 60)
        brain.kill()
    # Restart on the same data: the buffer's survivors drain, nothing twice.
    await _restart_and_check(env, config, set(sender.acked), tmp_path / "brain.log")


@pytest.mark.slow
async def test_sigterm_stops_gracefully_within_grace(
    tmp_path: Path, database_url: str | None
) -> None:
    data = tmp_path / "data"
    config = make_config(data, database_url)
    grace = 5.0
    env = _env(data, database_url, Z4J_SHUTDOWN_GRACE_SECONDS=str(grace))
    brain = BrainProcess(env, log_path=tmp_path / "brain.log")
    senders = [Sender(brain.ingest, first_batch=n * 10_000_000) for n in range(3)]
    for s in senders:
        s.start()
    try:
        await trio.to_thread.run_sync(
            lambda: wait_for(lambda: all(len(s.acked) > 200 for s in senders))
        )
        started = time.monotonic()
        brain.signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(brain.wait, grace + 30)
        took = time.monotonic() - started
    finally:
        for s in senders:
            s.stop.set()
        for s in senders:
            await trio.to_thread.run_sync(s.join, 10)
        brain.kill()
    assert code == 0, brain.log_text()[-2000:]
    # Slack for a busy machine's interpreter start-up and teardown: the grace
    # bounds the brain's own shutdown, not the machine's speed.
    assert took < grace + 15.0, f"exit took {took:.1f}s with a {grace}s grace period"
    assert "graceful shutdown" in brain.log_text()
    acked = set().union(*(s.acked for s in senders))
    assert len(acked) > 600
    # What was not drained before exit is still in the buffer: a restart lands it.
    await _restart_and_check(env, config, acked, tmp_path / "brain.log")


async def _restart_and_check(
    env: dict[str, str], config: Config, acked: set[int], log_path: Path
) -> None:
    """Start a brain on the same data; every acknowledged record lands once."""
    brain = BrainProcess(env, log_path=log_path)
    try:
        await _wait_for_events(config, acked)
        await trio.to_thread.run_sync(assert_exactly_once, config, acked)
    finally:
        brain.signal(signal.SIGTERM)
        assert brain.wait(60) == 0


def wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)

"""z4j.ingest reconnects and re-sends what was not answered (at-least-once).

A real brain is stopped (a hard stop: its tasks cancelled, connections cut)
mid-stream and started again on the same port and data: every payload the
client was asked to send lands at least once, and the client does not
raise. A brain that stays down past the retry budget gives a clear error.
The retry is the client's, not the store's: SQLite is enough.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

import z4j.ingest
from z4j.config import Config
from z4j.testing.brain import make_config, read_events, run_z4j, running_brain, wait_until

TOTAL = 200
CHUNK = 10


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(tmp_path: Path) -> Config:
    return make_config(tmp_path / "data", ingest_bind=f"127.0.0.1:{_free_port()}")


def _payload(n: int) -> list[dict[str, object]]:
    return [{"t": "log", "n": n}]


async def _landed(config: Config) -> set[int]:
    numbers: set[int] = set()

    async def every_one() -> bool:
        nonlocal numbers
        events = await trio.to_thread.run_sync(read_events, config)
        numbers = {int(e["body"]["n"]) for e in events}
        return numbers >= set(range(TOTAL))

    await wait_until(every_one, timeout=60)
    return numbers


@pytest.mark.parametrize("flavour", ["trio", "blocking"])
async def test_a_brain_restart_mid_stream_loses_no_payload(tmp_path: Path, flavour: str) -> None:
    config = _config(tmp_path)
    half, done = trio.Event(), trio.Event()
    results: list[bool] = []

    async def stream_payloads(address: tuple[str, int]) -> None:
        if flavour == "trio":
            async with await z4j.ingest.open_trio(*address) as client:
                for start in range(0, TOTAL, CHUNK):
                    chunk = [_payload(n) for n in range(start, start + CHUNK)]
                    results.extend(await client.send_many(chunk))
                    if start + CHUNK == TOTAL // 2:
                        half.set()
        else:
            client = await trio.to_thread.run_sync(lambda: z4j.ingest.connect(*address))
            with client:
                for start in range(0, TOTAL, CHUNK):
                    chunk = [_payload(n) for n in range(start, start + CHUNK)]
                    results.extend(await trio.to_thread.run_sync(client.send_many, chunk))
                    if start + CHUNK == TOTAL // 2:
                        half.set()
        done.set()

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            async with running_brain(config) as first:
                nursery.start_soon(stream_payloads, first.ingest)
                await half.wait()
            # Down for a moment: the client's sends meet a closed port.
            await trio.sleep(0.3)
            async with running_brain(config) as second:
                await done.wait()
                assert results == [True] * TOTAL
                await _landed(config)
    # The stream did span the restart: each brain answered part of it.
    assert TOTAL // 2 <= first.stats.ingest_payloads_ok < TOTAL
    assert second.stats.ingest_payloads_ok > 0


async def test_a_brain_that_stays_down_is_a_clear_error(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            address = brain.ingest
            trio_client = await z4j.ingest.open_trio(*address, retry_seconds=0.5)
            blocking = await trio.to_thread.run_sync(
                lambda: z4j.ingest.connect(*address, retry_seconds=0.5)
            )
            await trio_client.send(_payload(0))
        # The brain is gone and does not come back.
        with pytest.raises(z4j.ingest.IngestConnectionError) as raised:
            await trio_client.send_many([_payload(n) for n in range(3)])
        message = str(raised.value)
        assert f"{address[0]}:{address[1]} was unreachable for 0.5s" in message
        assert "3 payloads unanswered" in message
        with blocking, pytest.raises(z4j.ingest.IngestConnectionError, match="unreachable"):
            await trio.to_thread.run_sync(blocking.send, _payload(1))
        await trio_client.aclose()


async def test_no_retry_budget_raises_at_the_first_break(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            client = await z4j.ingest.open_trio(*brain.ingest, retry_seconds=0)
            await client.ping()
        with pytest.raises(z4j.ingest.IngestConnectionError, match="1 payloads unanswered"):
            await client.ping()
        await client.aclose()
        # A client closed by its owner stays closed (no reconnect behind its back).
        with pytest.raises(z4j.ingest.IngestConnectionError, match="closed"):
            await client.ping()


@pytest.mark.parametrize("value", ["-1", "soon", "nan"])
def test_z4j_send_refuses_a_retry_budget_that_is_no_number_of_seconds(value: str) -> None:
    sent = run_z4j("send", "--retry-seconds", value, env={}, stdin='{"t": "log"}\n')
    assert sent.returncode == 2
    assert "--retry-seconds" in sent.stderr and "seconds" in sent.stderr.splitlines()[-1]

"""Availability under abuse of the ingest port, at small scale, on loopback.

An attacker sends what stalled or swelled the brain before (gzip bombs, a
flood of large partial frames) while `z4j.testing.abuse.watching` probes it
as a well-behaved client would: a ``/health/live`` GET and an ingest PING,
each on a new connection, each of which must be answered within 100 ms
throughout (the issue's bar). Everything else is judged in frames and counters, never
in how long the attack took.
"""

from __future__ import annotations

import contextlib
import gzip
from pathlib import Path

import trio

import z4j.ingest
from z4j.protocol.ingest import ERROR, encode_frame
from z4j.testing.abuse import Probe, assert_served, health_live, ingest_ping, watching
from z4j.testing.brain import RunningBrain, make_config, running_brain, wait_until

MIB = 1024 * 1024


def probes(brain: RunningBrain) -> dict[str, Probe]:
    return {"health": health_live(brain.addresses.http), "ping": ingest_ping(brain.ingest)}


def gzip_bomb(inflated: int) -> bytes:
    """A gzip payload of tiny records inflating to about ``inflated`` bytes."""
    record = b'{"t":"x"},'
    body = b"[" + record * (inflated // len(record)) + b'{"t":"x"}]'
    return gzip.compress(body, compresslevel=9)


async def test_gzip_bombs_do_not_stall_other_clients(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")
    # Over the inflate cap (refused while inflating), and under it but far
    # over the record cap (refused by the count, before any parse).
    bombs = [gzip_bomb(60 * MIB), gzip_bomb(config.ingest_max_inflated_bytes - MIB)]
    attackers, frames_each = 4, 3
    with trio.fail_after(120):
        async with running_brain(config) as brain:

            async def attacker() -> None:
                stream = await trio.open_tcp_stream(*brain.ingest)
                async with stream:
                    for i in range(frames_each):
                        await stream.send_all(encode_frame(bombs[i % 2]))
                        assert await stream.receive_some(16) == ERROR

            async def attack() -> None:
                async with trio.open_nursery() as nursery:
                    for _ in range(attackers):
                        nursery.start_soon(attacker)

            async with watching(probes(brain)) as times:
                await attack()
            rejected = brain.stats.ingest_rejected
            assert rejected["inflate_too_large"] + rejected["too_many_records"] == (
                attackers * frames_each
            )
            assert rejected["too_many_records"] >= attackers  # the second kind got that far
            # And a well-behaved payload still goes through.
            client = await z4j.ingest.open_trio(*brain.ingest)
            async with client:
                await client.send([{"t": "log", "msg": "still here"}])
    assert_served(times)


async def test_partial_frame_flood_stays_within_the_budget(tmp_path: Path) -> None:
    # 8 MiB budget, 1/8 kept for small frames: six 1 MiB partial frames fit,
    # the others wait briefly and are refused; a small payload still goes through.
    budget = 8 * MIB
    config = make_config(tmp_path / "data", ingest_max_buffered_bytes=budget)
    attackers = 30
    fit = (budget - budget // 8) // (MIB + len(b"%d:" % MIB))
    head = b"%d:v1:0000000:[" % MIB
    with trio.fail_after(120):
        async with running_brain(config) as brain:
            held: list[trio.SocketStream] = []

            async def attacker() -> None:
                stream = await trio.open_tcp_stream(*brain.ingest)
                held.append(stream)
                # Refused ones are closed (reset) before all of it is read.
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(head + b" " * (256 * 1024))

            async def attack() -> None:
                async with trio.open_nursery() as nursery:
                    for _ in range(attackers):
                        nursery.start_soon(attacker)
                await wait_until(
                    lambda: brain.stats.ingest_rejected["over_budget"] == attackers - fit,
                    timeout=30,
                )
                client = await z4j.ingest.open_trio(*brain.ingest)
                async with client:
                    await client.send([{"t": "log", "msg": "still here"}])

            async with watching(probes(brain)) as times:
                await attack()
            assert brain.stats.ingest_rejected["over_budget"] == attackers - fit
            assert brain.stats.ingest_payloads_ok == 1
            for stream in held:
                await stream.aclose()
    assert_served(times)

"""A well-behaved client, timed while someone else abuses the brain.

The availability probes (tests/test_abuse_*.py) run an attack at small scale
and check that, throughout, an ordinary client is still answered promptly:
one hostile peer must not stop the brain for the others. `watching` runs the
probes around a block; `assert_served` judges them against the budget.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

import trio

from ..protocol.ingest import OK, encode_frame
from .http import http_get

__all__ = [
    "SERVED_WITHIN",
    "Probe",
    "assert_served",
    "health_live",
    "ingest_ping",
    "watch",
    "watching",
]

SERVED_WITHIN = 0.1
"""Seconds a well-behaved client may wait for an answer while the brain is abused
(the issue's bar; see `assert_served` for the one late answer it tolerates)."""

Probe = Callable[[], Awaitable[object]]


async def watch(
    probes: Mapping[str, Probe], *, stop: trio.Event, interval: float = 0.02
) -> dict[str, list[float]]:
    """Run every probe in turn until ``stop`` is set; each one's latencies, in seconds.

    A probe is a well-behaved client's whole exchange; one that raises fails
    the watch. Each probe runs at least once, and once more after ``stop``.
    """
    latencies: dict[str, list[float]] = {name: [] for name in probes}
    while True:
        for name, probe in probes.items():
            started = trio.current_time()
            await probe()
            latencies[name].append(trio.current_time() - started)
        if stop.is_set():
            return latencies
        await trio.sleep(interval)


@asynccontextmanager
async def watching(probes: Mapping[str, Probe]) -> AsyncIterator[dict[str, list[float]]]:
    """Probe throughout the block; the dict it gives is filled when the block ends.

    The first round of probes is answered before the block starts, so what
    the brain does while starting is not what gets measured.
    """
    for probe in probes.values():
        await probe()
    latencies: dict[str, list[float]] = {}
    stop = trio.Event()

    async def run() -> None:
        latencies.update(await watch(probes, stop=stop))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        try:
            yield latencies
        finally:
            stop.set()


def assert_served(latencies: Mapping[str, list[float]], within: float = SERVED_WITHIN) -> None:
    """Every probe ran, and every answer came within ``within`` seconds, but one.

    The one: on a shared 2-core machine the operating system now and then
    leaves a process unscheduled for a tenth of a second whatever it runs
    (seen at load averages past 4, with medians under 2 ms). A stall of the
    brain's own making is not a one-off: it comes back with every abusive
    frame or connection and holds several probes (measured before the
    fixes: 425 ms to 3.7 s, repeatedly). So one answer per probe may be late,
    by at most ten times the budget; a second late answer fails.
    """
    for name, took in latencies.items():
        assert took, f"no {name} probe ran"
        ordered = sorted(took)
        late = [t for t in ordered if t > within]
        summary = (
            f"{name}: {len(late)} of {len(took)} answers over {within * 1000:.0f} ms "
            f"(slowest {ordered[-1] * 1000:.0f} ms; median {ordered[len(took) // 2] * 1000:.1f} ms)"
        )
        assert len(late) <= 1, summary
        assert ordered[-1] <= 10 * within, summary


def ingest_ping(address: tuple[str, int]) -> Probe:
    """A probe: a new ingest connection, one PING, its 2:OK."""

    async def probe() -> None:
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            await stream.send_all(encode_frame(b"PING"))
            assert await stream.receive_some(100) == OK

    return probe


def health_live(address: tuple[str, int]) -> Probe:
    """A probe: GET /health/live on a new connection, answered 200."""

    async def probe() -> None:
        status, _ = await http_get(address, "/health/live")
        assert status == 200

    return probe

"""Cancel the whole brain at a point Hypothesis picks; restart; lose nothing.

A Trio instrument counts task steps and cancels the root scope at the step
Hypothesis chose, so cancellation lands anywhere: mid-accept, mid-commit of
the buffer, mid-claim, mid-COPY, between the store commit and the buffer
delete. Then a second brain starts on the same data directory and drains.

Checked after every example:
- every record whose payload was answered OK is stored exactly once;
- no record is stored twice (acknowledged or not);
- the cancelled run left no task (trio.run returned), no thread (beyond
  Trio's idle worker cache) and no file descriptor behind.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import z4j.ingest
from z4j.config import Config
from z4j.testing.brain import buffer_rows, make_config, read_events, running_brain, wait_until
from z4j.testing.cancel import CancelAtStep

# Each example runs two brains in well under a second.
EXAMPLES = max(5, settings.default.max_examples)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _busy_threads() -> list[str]:
    """Threads other than the main one and Trio's idle cached workers."""
    return [
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.name.startswith("Trio thread ")
    ]


def _settle(check: Any, timeout: float = 60.0) -> Any:
    """Abandoned queries finish on their own threads; give them a moment (a long
    one on a busy machine: it returns as soon as the check passes)."""
    deadline = time.monotonic() + timeout
    while (result := check()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return result


async def _workload(
    config: Config, clients: int, payload_size: int, acked: set[str], scope: trio.CancelScope
) -> None:
    with scope:
        async with running_brain(config) as brain:

            async def client(n: int) -> None:
                conn = await z4j.ingest.open_trio(*brain.ingest)
                async with conn:
                    for round_ in range(1_000_000):  # until the cancel arrives
                        ids = [f"{n}-{round_}-{k}" for k in range(4)]
                        payloads = [
                            [{"t": "log", "id": f"{pid}/{i}"} for i in range(payload_size)]
                            for pid in ids
                        ]
                        results = await conn.send_many(payloads)
                        acked.update(pid for pid, ok in zip(ids, results, strict=True) if ok)

            async with trio.open_nursery() as nursery:
                for n in range(clients):
                    nursery.start_soon(client, n)


async def _recover(config: Config) -> None:
    with trio.fail_after(60):
        async with running_brain(config):
            await wait_until(lambda: buffer_rows(config) == 0, timeout=50)


def _check_run(config: Config, step: int, clients: int, payload_size: int) -> None:
    started = time.monotonic()
    threads_before = _busy_threads()
    fds_before = _open_fds()
    acked: set[str] = set()
    scope = trio.CancelScope()
    trio.run(
        _workload,
        config,
        clients,
        payload_size,
        acked,
        scope,
        instruments=[CancelAtStep(step, scope)],
    )

    assert _settle(lambda: set(_busy_threads()) - set(threads_before)) == set(), (
        "threads left behind"
    )
    assert _settle(lambda: _open_fds() - fds_before) == set(), "file descriptors left behind"

    trio.run(_recover, config)
    stored = Counter(e["body"]["id"] for e in read_events(config))  # type: ignore[index]
    duplicated = [k for k, n in stored.items() if n > 1]
    assert not duplicated, f"stored twice: {duplicated[:5]}"
    missing = [
        f"{pid}/{i}" for pid in acked for i in range(payload_size) if f"{pid}/{i}" not in stored
    ]
    assert not missing, f"{len(missing)} acknowledged records lost, e.g. {missing[:5]}"
    if os.environ.get("Z4J_DEBUG_TIMING"):
        print(f"step {step}: {len(acked)} acked, {time.monotonic() - started:.2f}s")


steps = st.integers(min_value=1, max_value=2500)


@settings(max_examples=EXAMPLES)
@given(
    step=steps,
    clients=st.integers(1, 3),
    payload_size=st.integers(1, 5),
    batch_rows=st.sampled_from([1, 3, 50, 2000]),
)
def test_cancel_anywhere_sqlite(
    tmp_path_factory: pytest.TempPathFactory,
    step: int,
    clients: int,
    payload_size: int,
    batch_rows: int,
) -> None:
    config = make_config(tmp_path_factory.mktemp("cancel") / "data", drain_batch_rows=batch_rows)
    _check_run(config, step, clients, payload_size)


@pytest.mark.postgres
@settings(max_examples=max(3, EXAMPLES // 2))
@given(step=steps, clients=st.integers(1, 3), batch_rows=st.sampled_from([1, 3, 50]))
def test_cancel_anywhere_postgres(
    tmp_path_factory: pytest.TempPathFactory,
    postgres: Any,
    step: int,
    clients: int,
    batch_rows: int,
) -> None:
    name = f"z4j_cancel_{uuid.uuid4().hex[:10]}"
    url = postgres.create_database(name)
    try:
        config = make_config(
            tmp_path_factory.mktemp("cancel") / "data", url, drain_batch_rows=batch_rows
        )
        _check_run(config, step, clients, 3)
    finally:
        postgres.drop_database(name)

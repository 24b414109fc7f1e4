"""Cancel or kill the brain at a moment Hypothesis picks, under ingest and agent load.

Ingest clients and agents send at once (`mixed_workload`); then the brain
is stopped by the fault Hypothesis chose:

- in-process cancellation, just before a task step it picks (the brain and
  its clients share one Trio run, so the cancel lands anywhere: mid-commit,
  mid-drain, mid-ack);
- SIGTERM (a graceful stop) or SIGKILL of a ``z4j brain`` process, or
  SIGTERM then SIGKILL during the grace period, after a delay it picks.

A new brain then starts on the same data; the agents send every batch
again. Checked: every record answered 2:OK and every agent event is stored
exactly once, and nothing is stored twice; and the tasks table holds
exactly the tasks those stored events make (z4j.tasks.merge over them), so
a kill mid-drain neither loses nor doubles what the projection folded.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from property_tests.conformance.target import AgentTarget
from property_tests.mixed_workload import Ledger, problems, resend, run_agent, run_ingest_client
from z4j.config import Config
from z4j.tasks import TaskEvent, merge, task_event
from z4j.testing.agents import provision
from z4j.testing.brain import (
    BrainProcess,
    buffer_rows,
    make_config,
    read_events,
    running_brain,
    wait_until,
)
from z4j.testing.cancel import CancelAtStep
from z4j.testing.store import json_of, query

EXAMPLES = max(3, settings().max_examples // 10)


def _agent(http: tuple[str, int], token: str, secret: str) -> AgentTarget:
    return AgentTarget(host=http[0], port=http[1], token=token, secret=secret)


async def _load(
    ingest: tuple[str, int],
    agent: AgentTarget,
    ledger: Ledger,
    *,
    clients: int,
    agents: int,
    size: int,
) -> None:
    async with trio.open_nursery() as nursery:
        for n in range(clients):
            nursery.start_soon(run_ingest_client, *ingest, ledger, f"c{n}", size)
        for n in range(agents):
            nursery.start_soon(run_agent, agent, ledger, f"a{n}", size)


async def _recover(config: Config, token: str, secret: str, ledger: Ledger) -> None:
    """A new brain on the same data: agents send everything again; wait for the drain."""
    with trio.fail_after(90):
        async with running_brain(config) as brain:
            await resend(_agent(brain.addresses.http, token, secret), ledger)
            await wait_until(lambda: buffer_rows(config) == 0, timeout=60)


def _check(config: Config, ledger: Ledger) -> None:
    found = problems([e["body"] for e in read_events(config)], ledger)
    assert not found, found
    assert _tasks_stored(config) == _tasks_from_events(config)
    if os.environ.get("Z4J_DEBUG_TIMING"):
        print(f"{len(ledger.records_acked)} records, {len(ledger.batches)} batches")


def _tasks_stored(config: Config) -> dict[str, tuple[str, int, float, float]]:
    rows = query(
        config,
        "SELECT task_id, state, attempts, first_seen, last_event_at FROM tasks"
        " WHERE engine = 'prop'",
    )
    return {
        task_id: (state, attempts, _epoch(first), _epoch(last))
        for task_id, state, attempts, first, last in rows
    }


def _tasks_from_events(config: Config) -> dict[str, tuple[str, int, float, float]]:
    """What the projection must hold: every stored agent event folded at once."""
    rows = query(
        config,
        "SELECT project_id, agent_id, worker_id, received_at, body FROM events"
        " WHERE source = 'agent'",
    )
    by_task: dict[str, list[TaskEvent]] = {}
    for project_id, agent_id, worker_id, filed_at, body in rows:
        event = task_event(
            uuid.UUID(str(project_id)).bytes,
            uuid.UUID(str(agent_id)).bytes,
            worker_id,
            json_of(config, body),
            _epoch(filed_at),
        )
        if event is not None:
            by_task.setdefault(event.task_id, []).append(event)
    derived = {}
    for task_id, events in by_task.items():
        _, row = merge(None, events)
        derived[task_id] = (row.state, row.attempts, row.first_seen, row.last_event_at)
    return derived


def _epoch(value: Any) -> float:
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


@contextmanager
def _database(request: pytest.FixtureRequest, store: str) -> Iterator[str | None]:
    """None for the SQLite store; else a new Postgres database, dropped afterwards."""
    if store == "sqlite":
        yield None
        return
    postgres = request.getfixturevalue("postgres")
    name = f"z4j_crash_{uuid.uuid4().hex[:10]}"
    try:
        yield postgres.create_database(name)
    finally:
        postgres.drop_database(name)


# -- in-process cancellation --------------------------------------------------------------


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
@settings(max_examples=EXAMPLES)
@given(
    step=st.integers(1, 4000),
    clients=st.integers(0, 2),
    agents=st.integers(1, 2),
    size=st.integers(1, 4),
)
def test_cancel_anywhere_under_mixed_load(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    store: str,
    step: int,
    clients: int,
    agents: int,
    size: int,
) -> None:
    with _database(request, store) as url:
        config = make_config(tmp_path_factory.mktemp("cancel") / "data", url)
        token, secret, _ = trio.run(provision, config)
        ledger = Ledger(prefix=uuid.uuid4().hex[:8])
        scope = trio.CancelScope()

        async def until_cancelled() -> None:
            with scope:
                async with running_brain(config) as brain:
                    agent = _agent(brain.addresses.http, token, secret)
                    await _load(
                        brain.ingest, agent, ledger, clients=clients, agents=agents, size=size
                    )

        trio.run(until_cancelled, instruments=[CancelAtStep(step, scope)])
        trio.run(_recover, config, token, secret, ledger)
        _check(config, ledger)


# -- SIGTERM and SIGKILL of a brain process ------------------------------------------------

FAULTS = {
    "SIGTERM": [signal.SIGTERM],
    "SIGKILL": [signal.SIGKILL],
    "SIGTERM, then SIGKILL in the grace period": [signal.SIGTERM, signal.SIGKILL],
}


def _env(config: Config) -> dict[str, str]:
    env = {
        "Z4J_DATA_DIR": str(config.data_dir),
        "Z4J_INGEST_BIND": "127.0.0.1:0",
        "Z4J_HTTP_BIND": "127.0.0.1:0",
        "Z4J_SHUTDOWN_GRACE_SECONDS": "5",
    }
    if config.database_url is not None:
        env["Z4J_DATABASE_URL"] = config.database_url
    return env


@pytest.mark.slow
@settings(max_examples=EXAMPLES)
@given(
    fault=st.sampled_from(sorted(FAULTS)),
    delay=st.floats(0.0, 1.0),
    clients=st.integers(0, 2),
    agents=st.integers(1, 2),
)
def test_signals_under_mixed_load(
    tmp_path_factory: pytest.TempPathFactory,
    fault: str,
    delay: float,
    clients: int,
    agents: int,
) -> None:
    tmp = tmp_path_factory.mktemp("signals")
    config = make_config(tmp / "data")
    token, secret, _ = trio.run(provision, config)
    ledger = Ledger(prefix=uuid.uuid4().hex[:8])
    brain = BrainProcess(_env(config), log_path=tmp / "brain.log")
    try:

        async def load_then_signal() -> None:
            agent = _agent(brain.http, token, secret)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: _load(
                        brain.ingest, agent, ledger, clients=clients, agents=agents, size=3
                    )
                )
                await trio.sleep(delay)
                for signum in FAULTS[fault]:
                    brain.signal(signum)
                    await trio.sleep(0.05)
                await trio.to_thread.run_sync(brain.wait, 60)  # a hang guard only

        trio.run(load_then_signal)
        code = brain.proc.returncode
        if FAULTS[fault] == [signal.SIGTERM]:
            assert code == 0, brain.log_text()[-2000:]
    finally:
        brain.kill()
    _after_restart(tmp, config, token, secret, ledger)


def _after_restart(tmp: Path, config: Config, token: str, secret: str, ledger: Ledger) -> None:
    """A new brain process on the same data; agents resend; the store holds each record once."""
    brain = BrainProcess(_env(config), log_path=tmp / "brain.log")
    try:

        async def recover() -> None:
            with trio.fail_after(90):
                await resend(_agent(brain.http, token, secret), ledger)
                await wait_until(lambda: buffer_rows(config) == 0, timeout=60)

        trio.run(recover)
    finally:
        brain.stop(15)
    _check(config, ledger)

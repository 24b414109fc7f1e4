"""/ws/agent with real agents: z4j-bare 1.13.0, unchanged, against our brain."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import trio

from z4j import keys
from z4j.config import Config
from z4j.store import store_for
from z4j.testing.brain import read_events, running_brain, wait_until

BARE_AGENT = Path(__file__).parent / "agents" / "bare_agent.py"


async def provision(config: Config) -> tuple[str, str, uuid.UUID]:
    """A project and an agent in the store: (token, project secret, agent id)."""
    master = keys.master_secret(config)
    store = store_for(config)
    try:
        await store.migrate()
        project = await store.create_project("demo")
        token = keys.new_agent_token()
        agent = await store.create_agent(project.id, "bare", keys.token_hash(master, token))
    finally:
        await store.aclose()
    return token, keys.project_secret_text(master, project.id), agent.id


def start_bare_agent(
    url: str, token: str, secret: str, events: int, seconds: float, home: Path
) -> subprocess.Popen[bytes]:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("Z4J_")}
    env.update({"Z4J_HOME": str(home), "NO_PROXY": "127.0.0.1,localhost"})
    with open(home / "agent.log", "wb") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, str(BARE_AGENT), url, token, secret, str(events), str(seconds)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


async def test_real_z4j_bare_agent_events_land_once(tmp_path: Path, config: Config) -> None:
    token, secret, _agent_id = await provision(config)
    with trio.fail_after(90):
        async with running_brain(config) as brain:
            agent = start_bare_agent(
                brain.addresses.http_url, token, secret, 5, 8, tmp_path / "agent"
            )
            try:

                def agent_events() -> list[dict[str, object]]:
                    return [e for e in read_events(config) if e["source"] == "agent"]

                await wait_until(lambda: len(agent_events()) >= 5, timeout=60)
                await wait_until(lambda: brain.stats.agent_sessions_open == 1)
            finally:
                agent.terminate()
                await trio.to_thread.run_sync(agent.wait, 20)
    events = agent_events()
    assert sorted(e["body"]["data"]["n"] for e in events) == [0, 1, 2, 3, 4]  # type: ignore[index]
    assert {e["kind"] for e in events} == {"task.succeeded"}
    assert brain.stats.agent_rejected == {}


async def test_unknown_token_is_refused_with_4401(tmp_path: Path, config: Config) -> None:
    _, secret, _ = await provision(config)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            agent = start_bare_agent(
                brain.addresses.http_url, "z4j_not-a-token", secret, 1, 3, tmp_path / "agent"
            )
            try:
                await wait_until(lambda: brain.stats.agent_rejected["bad_token"] >= 1)
            finally:
                agent.terminate()
                await trio.to_thread.run_sync(agent.wait, 20)
            assert brain.stats.agent_sessions_open == 0
    assert [e for e in read_events(config) if e["source"] == "agent"] == []

"""Rotation with real z4j-bare 1.13.0 agents, each in its own process.

Provisioned through the API, configured with the configuration it shows
(tests/agents/rotation_agent.py runs z4j-bare with those variables),
streaming an event every 50 ms. The brain runs on a clock the test moves
(test_provisioning_api.Clock): a grace ends when the test says so.

- Token: a live agent keeps streaming across the rotation; an agent on the
  new token streams beside it; when the grace ends the old one is closed
  4401 and refused when it comes back; the new one streams on.
- Signing secret: a live agent on the previous secret keeps streaming
  across the rotation, one on the new secret beside it; when the grace
  ends the old one is closed 4403. No acknowledged event is lost: every
  event each agent's buffer had let go of (acknowledged) is in the store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import trio
from test_provisioning_api import Clock, call, config_env

from z4j.config import Config
from z4j.testing.agents import admin_token
from z4j.testing.brain import RunningBrain, read_events, running_brain, wait_until

ROTATION_AGENT = Path(__file__).parent / "agents" / "rotation_agent.py"
HOUR = 3600
A, B = 1_000_000, 2_000_000  # the first event number of each agent


class BareAgent:
    """A z4j-bare process started from a shown configuration."""

    def __init__(self, env: dict[str, str], first: int, home: Path) -> None:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.first = first
        self.stop_file = home / "stop"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("Z4J_")}
        clean.update({"Z4J_HOME": str(home), "NO_PROXY": "127.0.0.1,localhost"})
        with open(home / "agent.log", "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    str(ROTATION_AGENT),
                    env["Z4J_BRAIN_URL"],
                    env["Z4J_TOKEN"],
                    env["Z4J_HMAC_SECRET"],
                    str(first),
                    str(self.stop_file),
                ],
                env=clean,
                stdout=subprocess.PIPE,
                stderr=log,
            )

    def stored(self, config: Config) -> set[int]:
        """Its events in the store, by number."""
        numbers = {e["body"]["data"]["n"] for e in read_events(config) if e["source"] == "agent"}
        return {n for n in numbers if self.first <= n < self.first + 1_000_000}

    async def stream_on(self, config: Config, more: int = 10) -> None:
        """Until ``more`` of its events are stored beyond those stored now."""
        before = len(self.stored(config))
        await wait_until(lambda: len(self.stored(config)) >= before + more, timeout=60)

    async def stop(self) -> set[int]:
        """Stop it; the numbers of its events it had seen acknowledged."""
        self.stop_file.touch()
        out, _ = await trio.to_thread.run_sync(lambda: self.process.communicate(timeout=30))
        report = json.loads(out.decode().strip().splitlines()[-1])
        acked = set(report["emitted"]) - set(report["unacked"])
        assert acked, report
        return {int(text.replace("-", ""), 16) for text in acked}

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


async def provisioned(brain: RunningBrain, admin: str) -> tuple[dict[str, str], dict[str, str]]:
    """A project and an agent through the API: (the project, the shown configuration)."""
    http = brain.addresses.http
    _, project = await call(http, "POST", "/projects", admin, {"name": "shop"})
    status, made = await call(
        http,
        "POST",
        "/agents",
        admin,
        {"project": "shop", "name": "bare", "brain_url": brain.addresses.http_url},
    )
    assert status == 201, made
    return project, config_env(made["config"])


async def test_a_bare_agent_streams_across_a_token_rotation_until_the_grace_ends(
    tmp_path: Path, config: Config
) -> None:
    admin = await admin_token(config)
    clock = Clock()
    agents: list[BareAgent] = []
    with trio.fail_after(240):
        async with running_brain(config, clock=clock) as brain:
            try:
                _, env = await provisioned(brain, admin)
                old = BareAgent(env, A, tmp_path / "old")
                agents.append(old)
                await old.stream_on(config, 5)
                agent_id = await agent_of(brain, admin)
                status, rotated = await call(
                    brain.addresses.http,
                    "POST",
                    f"/agents/{agent_id}/rotate-token",
                    admin,
                    {"grace_seconds": HOUR, "brain_url": brain.addresses.http_url},
                )
                assert status == 200, rotated
                await old.stream_on(config)  # across the rotation, on the old token
                new = BareAgent(config_env(rotated["config"]), B, tmp_path / "new")
                agents.append(new)
                await new.stream_on(config, 5)
                await old.stream_on(config, 5)  # both tokens work in the grace

                clock.offset = HOUR + 1
                await wait_until(lambda: brain.stats.agent_rejected["token_expired"] >= 1)
                # It comes back after z4j-bare's auth backoff (10 s): refused.
                await wait_until(lambda: brain.stats.agent_rejected["bad_token"] >= 1, timeout=90)
                await new.stream_on(config)
                acked_old, acked_new = await old.stop(), await new.stop()
                await wait_until(lambda: acked_old <= old.stored(config), timeout=30)
                await wait_until(lambda: acked_new <= new.stored(config), timeout=30)
            finally:
                for agent in agents:
                    agent.kill()
    assert acked_old <= old.stored(config) and acked_new <= new.stored(config)


async def test_a_secret_rotation_loses_no_acknowledged_event(
    tmp_path: Path, config: Config
) -> None:
    admin = await admin_token(config)
    clock = Clock()
    agents: list[BareAgent] = []
    with trio.fail_after(240):
        async with running_brain(config, clock=clock) as brain:
            try:
                project, env = await provisioned(brain, admin)
                old = BareAgent(env, A, tmp_path / "old")
                agents.append(old)
                await old.stream_on(config, 5)
                status, rotated = await call(
                    brain.addresses.http,
                    "POST",
                    f"/projects/{project['id']}/rotate-secret",
                    admin,
                    {"grace_seconds": HOUR},
                )
                assert status == 200, rotated
                await old.stream_on(config)  # mid-stream, on the previous secret
                moved = {**env, "Z4J_HMAC_SECRET": rotated["signing_secret"]}
                new = BareAgent(moved, B, tmp_path / "new")
                agents.append(new)
                await new.stream_on(config, 5)
                await old.stream_on(config, 5)

                clock.offset = HOUR + 1
                await wait_until(lambda: brain.stats.agent_rejected["secret_expired"] >= 1)
                await new.stream_on(config)
                acked_old, acked_new = await old.stop(), await new.stop()
                await wait_until(lambda: acked_old <= old.stored(config), timeout=30)
                await wait_until(lambda: acked_new <= new.stored(config), timeout=30)
            finally:
                for agent in agents:
                    agent.kill()
    assert acked_old <= old.stored(config) and acked_new <= new.stored(config)


async def agent_of(brain: RunningBrain, admin: str) -> str:
    _, agents = await call(brain.addresses.http, "GET", "/agents", admin)
    (item,) = agents["items"]
    assert item["workers"] and item["versions"], item  # live, with its z4j-bare version
    return str(item["id"])

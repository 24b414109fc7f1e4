"""Three brains as processes: a hub and two regions, each region on its own Postgres.

Each region (east, west) runs `z4j brain` on a Postgres cluster of its own,
with a real z4j-bare 1.13.0 agent (tests/agents/rotation_agent.py, an event
every 50 ms) provisioned through its API, and gives the hub a read-only
federation token (`z4j federation token create --name hub --read-only`).
The hub runs on a database of the session's cluster and knows them through
Z4J_FEDERATION_PEERS and its peers file.

- The hub's API shows both regions: their summaries, their agents (each
  with its live worker) and their events, every row labelled by region.
- West's brain stops answering (SIGSTOP: its socket accepts, nothing
  answers): within the deadline the hub names west unreachable and marks
  its answers partial, while east's agents and events are still served.
  Then west's brain exits: the same, at once.

The brains, clusters and agents are shared by the module's tests (started
once: they are the slow part).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from z4j.testing.brain import BrainProcess, run_z4j, wait_until
from z4j.testing.federation import write_peers_file
from z4j.testing.postgres import ExternalPostgres, PostgresCluster

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROTATION_AGENT = Path(__file__).parent / "agents" / "rotation_agent.py"
FIRST = {"east": 1_000_000, "west": 2_000_000}  # each region's agent numbers its events from
DEADLINE_MS = 1500


@attrs.define
class Region:
    name: str
    env: dict[str, str]
    brain: BrainProcess
    admin: str
    agent: subprocess.Popen[bytes] | None = None
    stop_file: Path | None = None

    @property
    def url(self) -> str:
        host, port = self.brain.http
        return f"http://{host}:{port}"


@attrs.define
class Federation:
    hub: Region
    regions: dict[str, Region]


def _request(url: str, token: str, body: Any = None) -> Any:
    """Blocking, for the fixture: a JSON request with a bearer token."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url,
        data=data,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _env(name: str, data_dir: Path, database_url: str, **more: str) -> dict[str, str]:
    return {
        "Z4J_DATABASE_URL": database_url,
        "Z4J_DATA_DIR": str(data_dir),
        "Z4J_HTTP_BIND": "127.0.0.1:0",
        "Z4J_INGEST_BIND": "127.0.0.1:0",
        "Z4J_REGION_NAME": name,
        "Z4J_SECRET": secrets.token_urlsafe(48),
        "Z4J_HEARTBEAT_SECONDS": "0.5",
        "Z4J_SHUTDOWN_GRACE_SECONDS": "5",
        **more,
    }


def _cli(*args: str, env: dict[str, str]) -> str:
    done = run_z4j(*args, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[0]


def _start_region(name: str, root: Path, database_url: str) -> tuple[Region, str]:
    """A region's brain with a provisioned z4j-bare agent; and the token it gives the hub."""
    env = _env(name, root / name, database_url)
    token = _cli("federation", "token", "create", "--name", "hub", "--read-only", env=env)
    admin = _cli("admin", "token", "--name", "ops", env=env)
    brain = BrainProcess(env, log_path=root / f"{name}.log")
    found = Region(name=name, env=env, brain=brain, admin=admin)
    api = f"{found.url}/api/v1"
    _request(f"{api}/projects", admin, {"name": f"{name}-shop"})
    made = _request(
        f"{api}/agents",
        admin,
        {"project": f"{name}-shop", "name": f"{name}-bare", "brain_url": found.url},
    )
    agent_env = dict(line.split("=", 1) for line in made["config"].splitlines())
    home = root / f"{name}-agent"
    home.mkdir(mode=0o700)
    found.stop_file = home / "stop"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("Z4J_")}
    clean.update({"Z4J_HOME": str(home), "NO_PROXY": "127.0.0.1,localhost"})
    with open(home / "agent.log", "wb") as log:
        found.agent = subprocess.Popen(
            [
                sys.executable,
                str(ROTATION_AGENT),
                agent_env["Z4J_BRAIN_URL"],
                agent_env["Z4J_TOKEN"],
                agent_env["Z4J_HMAC_SECRET"],
                str(FIRST[name]),
                str(found.stop_file),
            ],
            env=clean,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    return found, token


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresCluster | ExternalPostgres
) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("federation")
    clusters: list[PostgresCluster] = []
    regions: dict[str, Region] = {}
    hub: Region | None = None
    hub_db = f"z4j_hub_{uuid.uuid4().hex[:12]}"
    try:
        tokens = {}
        for name in ("east", "west"):
            cluster = PostgresCluster()
            clusters.append(cluster)
            cluster.start()
            regions[name], tokens[name] = _start_region(name, root, cluster.create_database("z4j"))
        peers = {n: {"token": tokens[n]} for n in regions}
        env = _env(
            "hub",
            root / "hub",
            postgres.create_database(hub_db),
            Z4J_FEDERATION_PEERS=",".join(f"{n}={r.url}" for n, r in regions.items()),
            Z4J_FEDERATION_PEERS_FILE=str(write_peers_file(root / "peers.toml", peers)),
            Z4J_FEDERATION_TIMEOUT_MS=str(DEADLINE_MS),
            Z4J_FEDERATION_CACHE_MS="0",
        )
        admin = _cli("admin", "token", "--name", "ops", env=env)
        hub = Region(
            name="hub", env=env, brain=BrainProcess(env, log_path=root / "hub.log"), admin=admin
        )
        yield Federation(hub=hub, regions=regions)
    finally:
        for region in regions.values():
            if region.stop_file is not None:
                region.stop_file.touch()
        for region in regions.values():
            if region.agent is not None:
                try:
                    region.agent.wait(30)
                except subprocess.TimeoutExpired:
                    region.agent.kill()
                    region.agent.wait(10)
        for region in [*([hub] if hub else []), *regions.values()]:
            region.brain.proc.send_signal(signal.SIGCONT)  # a test may have stopped it
            region.brain.stop(grace=15)
        for cluster in clusters:
            cluster.close()
        postgres.drop_database(hub_db)


async def hub_get(federation: Federation, path: str) -> Any:
    hub = federation.hub
    return await trio.to_thread.run_sync(_request, f"{hub.url}/api/v1{path}", hub.admin)


def _numbers(events: list[dict[str, Any]], region: str) -> set[int]:
    """The numbers of the agent's task events among ``events`` of ``region``."""
    found = set()
    for e in events:
        data = e["body"].get("data") if isinstance(e["body"], dict) else None
        if e["region"] == region and isinstance(data, dict) and "n" in data:
            found.add(int(data["n"]))
    return found


async def test_the_hub_shows_both_regions_agents_and_events_labelled(
    federation: Federation,
) -> None:
    with trio.fail_after(120):

        async def both_agents_live() -> bool:
            agents = await hub_get(federation, "/federation/agents")
            live = {
                a["region"] for a in agents["items"] if any(w["connected"] for w in a["workers"])
            }
            return live == {"east", "west"}

        await wait_until(both_agents_live, timeout=90)
        agents = await hub_get(federation, "/federation/agents")
        assert agents["partial"] is False and agents["unreachable"] == []
        assert sorted((a["region"], a["name"], a["project"]) for a in agents["items"]) == [
            ("east", "east-bare", "east-shop"),
            ("west", "west-bare", "west-shop"),
        ]
        for agent in agents["items"]:
            assert agent["versions"] == ["1.13.0"], agent  # z4j-bare's hello

        async def both_streaming() -> bool:
            page = await hub_get(federation, "/federation/events?limit=200")
            return all(_numbers(page["items"], r) for r in ("east", "west"))

        await wait_until(both_streaming, timeout=60)
        page = await hub_get(federation, "/federation/events?limit=200")
        assert page["partial"] is False
        events = page["items"]
        # Each row is labelled with the region that stored it: east's agent
        # numbers its events from 1,000,000, west's from 2,000,000.
        assert all(FIRST["east"] <= n < FIRST["west"] for n in _numbers(events, "east"))
        assert all(FIRST["west"] <= n < 3_000_000 for n in _numbers(events, "west"))
        times = [e["received_at"] for e in events]
        assert times == sorted(times, reverse=True)

        regions = await hub_get(federation, "/federation/regions")
        shown = {r["name"]: r for r in regions["items"]}
        assert list(shown) == ["hub", "east", "west"]
        for name in ("east", "west"):
            assert shown[name]["reachable"], shown[name]
            summary = shown[name]["summary"]
            assert summary["region"] == name and summary["ready"] is True
            assert summary["workers_connected"] == 1 and summary["agents_connected"] == 1
            assert summary["instances"] == 1
            assert shown[name]["round_trip_ms"] > 0


async def test_a_stopped_region_is_unreachable_within_the_deadline_and_the_rest_partial(
    federation: Federation,
) -> None:
    west = federation.regions["west"]
    deadline = DEADLINE_MS / 1000
    with trio.fail_after(120):
        await hub_get(federation, "/federation/agents")  # the hub's connections are up
        # Frozen: the kernel still accepts west's connections, nothing answers.
        west.brain.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            agents = await hub_get(federation, "/federation/agents")
            took = time.monotonic() - started
            assert agents["partial"] is True and agents["unreachable"] == ["west"]
            assert agents["errors"]["west"] == f"no answer within {DEADLINE_MS} ms"
            assert took >= deadline * 0.9  # it did wait for west...
            assert took < deadline + 10  # ...its deadline, not more (a backstop: busy CI)
            assert [a["region"] for a in agents["items"]] == ["east"]
            page = await hub_get(federation, "/federation/events?limit=50")
            assert page["partial"] is True and page["unreachable"] == ["west"]
            assert _numbers(page["items"], "east") and not _numbers(page["items"], "west")
        finally:
            west.brain.proc.send_signal(signal.SIGCONT)

        # Gone: refused at once, the same marks.
        await trio.to_thread.run_sync(west.brain.stop, 15)
        regions = await hub_get(federation, "/federation/regions")
        reach = {r["name"]: r["reachable"] for r in regions["items"]}
        assert reach == {"hub": True, "east": True, "west": False}
        assert regions["partial"] is True and regions["unreachable"] == ["west"]
        (west_row,) = [r for r in regions["items"] if r["name"] == "west"]
        assert west_row["summary"] is None and "Connect" in west_row["error"]
        page = await hub_get(federation, "/federation/events?limit=50")
        assert page["partial"] is True and page["unreachable"] == ["west"]
        assert _numbers(page["items"], "east")
        metrics = await trio.to_thread.run_sync(_metrics, federation.hub)
        assert 'z4j_federation_peer_up{peer="west"} 0.0' in metrics
        assert 'z4j_federation_peer_up{peer="east"} 1.0' in metrics


def _metrics(region: Region) -> str:
    with urllib.request.urlopen(f"{region.url}/metrics", timeout=30) as response:
        return str(response.read().decode())

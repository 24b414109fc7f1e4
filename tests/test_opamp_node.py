"""The Node OpAMP client, ``@elastic/opamp-client-node`` 0.5.0, against a running brain.

tests/opamp_node/agent.js runs the real client (pinned in
tests/opamp_node/package-lock.json) and prints one JSON line per event:
each message it sent with the reply's flags and offer (the client's own
diagnostics channel), each remote configuration it got and what it made of
it. On both stores: the agent is listed with its description and
capabilities; a pushed configuration reaches it and shows applied with its
hash (a YAML one, which it does not run, shows failed with its message);
after a brain restart the new brain asks for the full state once and the
agent answers it; a killed agent goes offline once the heartbeat window has
passed; and a clean ``client.shutdown()`` says no goodbye (0.5.0 sends no
``agent_disconnect``: the agent stays online until the window passes),
while a process started again with the same instance uid is the same agent.

What the client can do is read from its source: capabilities are limited
to ReportsStatus, ReportsHeartbeat (always on), AcceptsRemoteConfig and
ReportsRemoteConfig (asking for another one throws), so it never reports
health nor an effective configuration; a failed request is retried after
30 s at the soonest. ``node`` missing from PATH skips these tests; the
package missing is installed (``npm ci``), never skipped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import orjson
import pytest
import trio
from test_opamp_config import JSON, YAML, api, hash_of
from test_opamp_http import _free_port, opamp_token, ready_brain

from z4j.store import store_for
from z4j.testing.agents import admin_token
from z4j.testing.brain import make_config, wait_until

NODE_DIR = Path(__file__).parent / "opamp_node"
CLIENT = NODE_DIR / "node_modules" / "@elastic" / "opamp-client-node" / "package.json"
CLIENT_VERSION = "0.5.0"
IDENTIFYING = {"service.name": "checkout-node", "service.version": "2.0.1"}
# Numbers go out as doubles (the client's keyValuesFromObj), so 3 comes back as 3.0.
NON_IDENTIFYING = {"host.name": "web-2", "process.runtime.name": "nodejs", "replicas": 3}
UID = uuid.UUID("0190b1c2-0000-7000-8000-0000000000e1").bytes
# The capabilities it sends: the four it supports (ReportsStatus and
# ReportsHeartbeat are always on), nothing else.
CAPABILITIES = [
    "REPORTS_STATUS",
    "ACCEPTS_REMOTE_CONFIG",
    "REPORTS_REMOTE_CONFIG",
    "REPORTS_HEARTBEAT",
]
REPORT_FULL_STATE = 1
# Long enough for the client's retry after a failed request (30 s, +10%
# jitter) if one of its polls lands between two brains.
RETRY_DEADLINE = 90.0


@pytest.fixture(scope="session")
def node() -> str:
    """``node``, with the pinned client installed (``npm ci``) if it is not yet."""
    found = shutil.which("node")
    if found is None:
        pytest.skip("node is not on PATH: the Node OpAMP client (tests/opamp_node) cannot run")
    if not _installed():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail(
                "node is on PATH but npm is not: cannot run npm ci --prefix tests/opamp_node"
            )
        done = subprocess.run(
            [npm, "ci", "--prefix", str(NODE_DIR)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0 or not _installed():
            pytest.fail(
                f"npm ci --prefix tests/opamp_node failed (exit {done.returncode}):\n"
                f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            )
    return found


def _installed() -> bool:
    """The pinned client is in tests/opamp_node/node_modules (not another version)."""
    try:
        return bool(orjson.loads(CLIENT.read_bytes())["version"] == CLIENT_VERSION)
    except FileNotFoundError:
        return False


class NodeAgent:
    """agent.js as a child process, and the events it has printed so far."""

    def __init__(self, process: trio.Process, stderr: Path) -> None:
        self.process = process
        self.stderr = stderr
        self.events: list[dict[str, Any]] = []

    async def read_events(self) -> None:
        assert self.process.stdout is not None
        pending = b""
        async for chunk in self.process.stdout:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            self.events.extend(orjson.loads(line) for line in lines)

    def sent(self, since: int = 0) -> list[dict[str, Any]]:
        """The messages it sent and got a reply to, from event ``since`` on."""
        return [e for e in self.events[since:] if e["event"] == "sent"]

    async def next(
        self, predicate: Callable[[dict[str, Any]], bool], *, since: int = 0, timeout: float = 20
    ) -> dict[str, Any]:
        """The first event from ``since`` on that ``predicate`` accepts (waits for it)."""

        def found() -> dict[str, Any] | None:
            return next((e for e in self.events[since:] if predicate(e)), None)

        try:
            await wait_until(found, timeout=timeout)
        except trio.TooSlowError:
            raise AssertionError(
                f"no such event; events: {self.events[since:][-20:]}\n"
                f"stderr: {self.stderr.read_text()[-2000:]}"
            ) from None
        event = found()
        assert event is not None
        return event

    def after(self, event: dict[str, Any]) -> int:
        """The index just past ``event`` (one of ours), for ``since``."""
        return next(i for i, e in enumerate(self.events) if e is event) + 1

    async def command(self, cmd: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(orjson.dumps({"cmd": cmd}) + b"\n")


class StartAgent(Protocol):
    def __call__(self, port: int, token: str, *, heartbeat: float) -> Awaitable[NodeAgent]: ...


@asynccontextmanager
async def node_agents(node: str, tmp_path: Path) -> AsyncIterator[StartAgent]:
    """Starts agent.js processes (`StartAgent`); kills what is left when the block exits.

    The processes belong to this block, not to a brain's: one agent polls
    brain after brain.
    """
    agents: list[NodeAgent] = []
    try:
        async with trio.open_nursery() as nursery:

            async def start(port: int, token: str, *, heartbeat: float) -> NodeAgent:
                env = {
                    **os.environ,
                    "OPAMP_ENDPOINT": f"http://127.0.0.1:{port}/v1/opamp",
                    "OPAMP_TOKEN": token,
                    "OPAMP_INSTANCE_UID": UID.hex(),
                    "OPAMP_HEARTBEAT_SECONDS": str(heartbeat),
                    "OPAMP_IDENTIFYING": orjson.dumps(IDENTIFYING).decode(),
                    "OPAMP_NON_IDENTIFYING": orjson.dumps(NON_IDENTIFYING).decode(),
                }
                stderr = tmp_path / f"agent-{len(agents)}.stderr"
                with stderr.open("wb") as err:
                    process = await trio.lowlevel.open_process(
                        [node, str(NODE_DIR / "agent.js")],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=err,
                        env=env,
                    )
                agent = NodeAgent(process, stderr)
                agents.append(agent)
                nursery.start_soon(agent.read_events)
                started = await agent.next(lambda e: e["event"] == "started")
                assert started["instance_uid"] == UID.hex()
                assert started["user_agent"] == f"@elastic/opamp-client-node/{CLIENT_VERSION}"
                return agent

            yield start
            nursery.cancel_scope.cancel()
    finally:
        for agent in agents:
            if agent.process.returncode is None:
                agent.process.kill()
            with trio.CancelScope(shield=True):
                await agent.process.wait()


async def listed(http: tuple[str, int], admin: str) -> dict[str, Any] | None:
    """The one OpAMP agent the brain lists, or None before it is heard from."""
    status, page = await api(http, "GET", "/opamp/agents", admin)
    assert status == 200, page
    assert len(page["items"]) <= 1, page
    return page["items"][0] if page["items"] else None


async def test_the_node_client_is_listed_and_applies_a_pushed_configuration(
    tmp_path: Path, database_url: str | None, node: str
) -> None:
    port = _free_port()
    config = make_config(tmp_path / "data", database_url, http_bind=f"127.0.0.1:{port}")
    token = await opamp_token(config, "fleet")
    admin = await admin_token(config)
    http = ("127.0.0.1", port)
    path = f"/opamp/agents/{UID.hex()}/config"
    async with (
        ready_brain(config) as brain,
        node_agents(node, tmp_path) as start,
    ):
        agent = await start(port, token, heartbeat=0.2)
        await wait_until(lambda: listed(http, admin))
        item = await listed(http, admin)
        assert item is not None
        assert item["instance_uid"] == UID.hex() and item["project"] == "fleet"
        assert item["identifying"] == IDENTIFYING
        assert item["non_identifying"] == NON_IDENTIFYING
        assert item["online"] is True and item["transport"] == "http"
        assert item["capabilities"] == CAPABILITIES
        # It cannot report health nor its effective configuration.
        assert item["health"] is None and item["effective_config"] is None
        # Its first message (number 1) is a full report: nothing to ask for.
        # (The brain may list it before the client has printed the reply.)
        first = await agent.next(lambda e: e["event"] == "sent")
        assert first["seq"] == 1
        assert first["parts"] == ["agentDescription", "remoteConfigStatus"]
        assert first["reply_flags"] == 0 and first["offer"] is None

        status, pushed = await api(http, "PUT", path, admin, {"files": JSON})
        assert status == 200 and pushed["status"] == "pending"
        digest = hash_of(JSON).hex()
        got = await agent.next(lambda e: e["event"] == "remote_config")
        assert got == {"event": "remote_config", "hash": digest, "files": JSON}
        await agent.next(lambda e: e["event"] == "applied" and e["hash"] == digest)

        async def status_is(expected: str) -> bool:
            return bool((await api(http, "GET", path, admin))[1]["status"] == expected)

        await wait_until(lambda: status_is("applied"))
        _, shown = await api(http, "GET", path, admin)
        assert shown["config_hash"] == digest and shown["error_message"] == ""
        item = await listed(http, admin)
        assert item is not None
        assert item["remote_config_status"] == {
            "last_remote_config_hash": digest,
            "status": "applied",
            "error_message": "",
        }
        # What it sent: its status, once, at once, and in sequence.
        reported = await agent.next(
            lambda e: (
                e["event"] == "sent"
                and e.get("remote_config_status", {}).get("status") == "applied"
            )
        )
        assert reported["parts"] == ["remoteConfigStatus"]
        assert reported["remote_config_status"] == {
            "hash": digest,
            "status": "applied",
            "error": "",
        }
        # Not offered again once applied, however often it polls.
        mark = len(agent.events)
        await agent.next(lambda e: len(agent.sent(mark)) >= 3, since=mark)
        assert [e["offer"] for e in agent.sent(mark)] == [None] * len(agent.sent(mark))

        # YAML, which this agent does not run: it says FAILED, with its reason.
        assert (await api(http, "PUT", path, admin, {"files": YAML}))[0] == 200
        failed = await agent.next(lambda e: e["event"] == "failed")
        assert failed["hash"] == hash_of(YAML).hex()
        await wait_until(lambda: status_is("failed"))
        _, shown = await api(http, "GET", path, admin)
        assert shown["error_message"] == failed["error"]
        assert "unsupported content type" in failed["error"]
        # The JSON one again: offered again (the agent now reports another hash).
        assert (await api(http, "PUT", path, admin, {"files": JSON}))[0] == 200
        await wait_until(lambda: status_is("applied"))
        assert [e["hash"] for e in agent.events if e["event"] == "remote_config"] == [
            digest,
            hash_of(YAML).hex(),
            digest,
        ]
        # Every message was in sequence: the brain never asked for a full report.
        sent = agent.sent()
        assert [e["seq"] for e in sent] == list(range(1, len(sent) + 1))
        assert all(e["reply_flags"] == 0 for e in sent)
        assert not [e for e in agent.events if e["event"] == "send_failed"]
        assert brain.stats.opamp_writes["config_status"] == 3  # applied, failed, applied


async def test_after_a_brain_restart_the_node_client_reports_its_full_state(
    tmp_path: Path, database_url: str | None, node: str
) -> None:
    port = _free_port()
    config = make_config(tmp_path / "data", database_url, http_bind=f"127.0.0.1:{port}")
    token = await opamp_token(config, "fleet")
    admin = await admin_token(config)
    http = ("127.0.0.1", port)
    path = f"/opamp/agents/{UID.hex()}/config"
    digest = hash_of(JSON).hex()
    async with node_agents(node, tmp_path) as start:
        async with ready_brain(config) as brain:
            agent = await start(port, token, heartbeat=0.5)
            await wait_until(lambda: listed(http, admin))
            assert (await api(http, "PUT", path, admin, {"files": JSON}))[0] == 200
            reported = await agent.next(
                lambda e: (
                    e["event"] == "sent"
                    and e.get("remote_config_status", {}).get("status") == "applied"
                )
            )
            # A poll after that write (a heartbeat, nothing in it). Restart
            # just after its reply, so that the next poll most likely finds
            # the new brain (if not, the client retries 30 s later). The new
            # process vouches for no agent it has not heard: it asks for the
            # full state at the first message, whatever the stored number.
            await agent.next(
                lambda e: e["event"] == "sent" and not e["parts"], since=agent.after(reported)
            )
            restart = len(agent.events)
        async with ready_brain(config) as brain:
            asked = await agent.next(
                lambda e: e["event"] == "sent" and e["reply_flags"] & REPORT_FULL_STATE,
                since=restart,
                timeout=RETRY_DEADLINE,
            )
            answer = await agent.next(
                lambda e: e["event"] == "sent" and e["seq"] > asked["seq"], since=restart
            )
            # The answer: the next message, at once, with everything it reports.
            assert answer["seq"] == asked["seq"] + 1
            assert answer["parts"] == ["agentDescription", "remoteConfigStatus"]
            assert answer["remote_config_status"]["hash"] == digest
            assert answer["reply_flags"] == 0
            # Asked once: every later poll is in sequence, and nothing is offered.
            mark = len(agent.events)
            await agent.next(lambda e: len(agent.sent(mark)) >= 3, since=mark)
            later = agent.sent(mark)
            assert [e["seq"] for e in later] == list(
                range(answer["seq"] + 1, answer["seq"] + 1 + len(later))
            )
            assert all(e["reply_flags"] == 0 and e["offer"] is None for e in later)
            assert brain.stats.opamp_messages["status"] >= 1

            item = await listed(http, admin)
            assert item is not None
            assert item["identifying"] == IDENTIFYING and item["online"] is True
            assert item["remote_config_status"]["status"] == "applied"
            assert (await api(http, "GET", path, admin))[1]["status"] == "applied"
            store = store_for(config)
            try:
                [row] = await store.list_opamp_agents()
            finally:
                await store.aclose()
            assert row.full_state_requests == 0 and row.identifying == IDENTIFYING
            assert row.sequence_num >= answer["seq"]


async def test_a_killed_node_agent_goes_offline_after_the_heartbeat_window(
    tmp_path: Path, database_url: str | None, node: str
) -> None:
    port = _free_port()
    config = make_config(
        tmp_path / "data",
        database_url,
        http_bind=f"127.0.0.1:{port}",
        opamp_heartbeat_window_seconds=2.0,
    )
    token = await opamp_token(config, "fleet")
    admin = await admin_token(config)
    http = ("127.0.0.1", port)

    async def online_is(expected: bool) -> bool:
        item = await listed(http, admin)
        return item is not None and item["online"] is expected

    async with (
        ready_brain(config) as brain,
        node_agents(node, tmp_path) as start,
    ):
        agent = await start(port, token, heartbeat=0.2)
        await wait_until(lambda: online_is(True))
        agent.process.send_signal(signal.SIGKILL)
        await agent.process.wait()
        await wait_until(lambda: online_is(False), timeout=60)
        item = await listed(http, admin)
        assert item is not None and item["disconnected_at"] is None  # no goodbye was said
        assert brain.stats.opamp_messages["disconnect"] == 0


async def test_a_clean_shutdown_sends_no_agent_disconnect(
    tmp_path: Path, database_url: str | None, node: str
) -> None:
    """0.5.0's ``shutdown()`` only stops its timer and closes its HTTP client.

    So the brain is told nothing: the agent stays online until
    Z4J_OPAMP_HEARTBEAT_WINDOW_SECONDS has passed, as a killed one does
    (the test above). If a later version says goodbye, this test fails and
    docs/opamp.md's "Node client" section is to be updated. Started again
    with the same instance uid, it is the same agent again.
    """
    port = _free_port()
    config = make_config(tmp_path / "data", database_url, http_bind=f"127.0.0.1:{port}")
    token = await opamp_token(config, "fleet")
    admin = await admin_token(config)
    http = ("127.0.0.1", port)
    async with (
        ready_brain(config) as brain,
        node_agents(node, tmp_path) as start,
    ):
        agent = await start(port, token, heartbeat=0.2)
        await wait_until(lambda: listed(http, admin))
        await agent.command("shutdown")
        await agent.next(lambda e: e["event"] == "shutdown")
        assert await agent.process.wait() == 0
        assert all("agentDisconnect" not in e["parts"] for e in agent.sent())
        assert brain.stats.opamp_messages["disconnect"] == 0
        item = await listed(http, admin)
        assert item is not None
        assert item["online"] is True and item["disconnected_at"] is None

        # The process starts again with the same instance uid: the same agent
        # (`listed` checks there is one), its sequence numbers from 1 again,
        # and its first message, a full report, is enough (no ask).
        again = await start(port, token, heartbeat=0.2)
        await again.next(lambda e: len(again.sent()) >= 3)
        assert [e["seq"] for e in again.sent()[:3]] == [1, 2, 3]
        assert all(e["reply_flags"] == 0 for e in again.sent())
        item = await listed(http, admin)
        assert item is not None and item["identifying"] == IDENTIFYING

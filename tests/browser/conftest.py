"""A real headless Chromium driving the dashboard of a real brain.

The browser is Debian's ``chromium`` (``.ci/setup-browser`` installs it; run
here too if it is missing), driven by the Python ``playwright`` package
through ``executable_path``: Playwright's own browser download is never
used. When Chromium cannot be installed the tests fail, with the
installer's complaint as the reason (a suite that quietly skipped its
browser tests would claim what it did not check); Z4J_ALLOW_NO_BROWSER=1
turns that into a skip for machines that cannot have a browser.

Playwright's sync API runs the browser from the test's thread, so the brain
and an agent run beside it on a Trio loop of their own (`TrioThread`), and
the tests reach into that loop with ``trio.from_thread``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio
import trio_websocket

from z4j.agent import Agent
from z4j.config import Config
from z4j.ingest import connect as ingest_connect
from z4j.ingest import open_trio
from z4j.protocol.agent import frames as f
from z4j.protocol.agent.signing import decode_secret
from z4j.testing.agents import admin_token, provision, raw_agent
from z4j.testing.brain import RunningBrain, make_config, running_brain

ROOT = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = ROOT / ".ci" / "setup-browser"
SCREENSHOT = ROOT / "docs" / "img" / "dashboard.png"

# As this machine's notes prescribe: without the background-networking flags
# Chromium keeps dialling out, and every dial is refused here. Playwright
# adds --headless and a fresh, temporary --user-data-dir for each launch.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

T = TypeVar("T")

_NETWORK_MESSAGES = ("Failed to load resource:", "WebSocket connection to")


def _chromium() -> str | None:
    """The Chromium binary to drive, if one runs here."""
    candidates = [os.environ.get("Z4J_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            probe = subprocess.run(
                [path, "--version"], capture_output=True, text=True, timeout=60, check=False
            )
            if probe.returncode == 0 and "Chromium" in probe.stdout:
                return path
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.browser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "browser: drives a real headless Chromium (tests/browser; -m 'not browser' skips)",
    )


@pytest.fixture
def screenshot_path(tmp_path: Path) -> Path:
    """Where the dashboard screenshot goes: the tracked docs/img/dashboard.png
    (which docs/operations.md shows) only with Z4J_WRITE_SCREENSHOT=1, so an
    ordinary run leaves the checkout as it was."""
    if os.environ.get("Z4J_WRITE_SCREENSHOT") == "1":
        return SCREENSHOT
    return tmp_path / "dashboard.png"


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = _chromium()
    if path is None:
        setup = subprocess.run(
            ["bash", str(SETUP_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        path = _chromium()
        if path is None:
            why = (setup.stderr or setup.stdout).strip().splitlines()[-3:]
            reason = (
                "Chromium is not installed and .ci/setup-browser could not install it "
                f"(exit {setup.returncode}): {' / '.join(why) or 'no output'}"
            )
            if os.environ.get("Z4J_ALLOW_NO_BROWSER") == "1":
                pytest.skip(reason)
            pytest.fail(reason)
    return path


@pytest.fixture(scope="session")
def browser(chromium_path: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


class TrioThread:
    """A Trio loop on a thread of its own, for sync tests that drive a browser."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="trio-loop", daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the Trio thread did not start")

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.token = trio.lowlevel.current_trio_token()
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` on the loop and return its result."""
        if self._error is not None:
            raise RuntimeError("the Trio loop died") from self._error
        return trio.from_thread.run(fn, *args, trio_token=self.token)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        return trio.from_thread.run_sync(fn, *args, trio_token=self.token)

    def enter(self, manager: AbstractAsyncContextManager[T]) -> T:
        """Enter an async context manager on the loop; it exits at `close`."""

        async def hold(task_status: trio.TaskStatus[T]) -> None:
            async with manager as value:
                task_status.started(value)
                await trio.sleep_forever()

        return self.run(self.nursery.start, hold)

    def close(self) -> None:
        if self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
            self._thread.join(30)
        if self._error is not None:
            raise self._error


@attrs.define
class Dashboard:
    """A running brain with a provisioned, connected agent, seen by a browser."""

    loop: TrioThread
    brain: RunningBrain
    config: Config
    admin_token: str
    agent_id: str
    agent: Agent
    gates: dict[str, trio.Event]
    workers: dict[str, Agent] = attrs.field(factory=dict)

    @property
    def url(self) -> str:
        return self.brain.addresses.http_url

    def ingest(self, records: list[dict[str, Any]]) -> None:
        """Send one payload over the TCP ingest port; returns once it is durable."""
        with ingest_connect(*self.brain.ingest) as client:
            client.send(records)

    def emit(self, event: dict[str, Any]) -> None:
        """An event from the agent (it goes through its spool, then /ws/agent)."""
        self.loop.run_sync(self.agent.emit, event)

    def add_agent(self, *, project: str, agent: str, workers: list[str]) -> None:
        """Provision another agent and connect one `Agent` per worker id."""
        token, secret, _ = self.loop.run(
            functools.partial(provision, self.config, project=project, agent=agent)
        )
        for worker_id in workers:
            worker = Agent(
                self.url, token=token, secret=secret, worker_id=worker_id, worker_role="worker"
            )
            self.loop.run(self.loop.nursery.start, worker.run)
            self.workers[worker_id] = worker

    def stop_worker(self, worker_id: str) -> None:
        """Stop one of `add_agent`'s workers; return once the brain shows it disconnected."""
        self.loop.run_sync(self.workers[worker_id].stop)

        def disconnected() -> bool:
            request = urllib.request.Request(
                f"{self.url}/api/v1/agents",
                headers={"Authorization": f"Bearer {self.admin_token}"},
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                agents = json.load(response)["items"]
            return any(
                w["worker_id"] == worker_id and not w["connected"]
                for a in agents
                for w in a["workers"]
            )

        deadline = time.monotonic() + 60
        while not disconnected():
            assert time.monotonic() < deadline, f"{worker_id} still connected after 60 s"
            time.sleep(0.05)

    @contextmanager
    def traffic(self) -> Iterator[None]:
        """Ingest payloads (a load that rises and falls) and agent events until exit."""
        stop = trio.Event()
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            rng = random.Random(7)
            kinds = ["task.succeeded"] * 6 + ["task.started"] * 4 + ["log"] * 2
            kinds += ["task.failed", "task.retried", "worker.heartbeat"]
            try:
                client = await open_trio(*self.brain.ingest)
                async with client:
                    task_status.started()
                    step = 0
                    while not stop.is_set():
                        size = 20 + int(80 * (1 + math.sin(step / 6)))
                        await client.send(
                            [
                                {
                                    "t": rng.choice(kinds),
                                    "task_id": f"job-{step}-{i}",
                                    "runtime_ms": rng.randint(3, 900),
                                }
                                for i in range(size)
                            ]
                        )
                        if step % 5 == 0:
                            self.agent.emit({"kind": "task.succeeded", "task_id": f"agent-{step}"})
                        step += 1
                        await trio.sleep(0.1)
            finally:
                done.set()

        self.loop.run(self.loop.nursery.start, run)
        try:
            yield
        finally:
            self.loop.run_sync(stop.set)
            self.loop.run(done.wait)

    def gate(self, name: str) -> None:
        """Hold commands of action ``hold`` with parameter ``gate`` = name until `release`."""
        self.loop.run_sync(self.gates.setdefault, name, trio.Event())

    def release(self, name: str) -> None:
        self.loop.run_sync(self.gates[name].set)


@contextmanager
def serving_dashboard(
    data: Path,
    *,
    clock: Callable[[], float] = time.time,
    before_start: Callable[[Config], Awaitable[None]] | None = None,
) -> Iterator[Dashboard]:
    """A SQLite brain in ``data`` on ``clock``, an agent ("shop / checkout",
    worker checkout-1) that answers ``ping`` and ``hold``, and an admin token
    to sign in with; ``before_start`` fills the store before the brain starts."""
    config = make_config(data, heartbeat_seconds=0.5)
    loop = TrioThread()
    try:
        token, secret, agent_id = loop.run(
            functools.partial(provision, config, project="shop", agent="checkout")
        )
        if before_start is not None:
            loop.run(before_start, config)
        admin = loop.run(admin_token, config)
        brain = loop.enter(running_brain(config, clock=clock))
        gates: dict[str, trio.Event] = {}
        agent = Agent(
            brain.addresses.http_url,
            token=token,
            secret=secret,
            worker_id="checkout-1",
            worker_role="worker",
        )

        @agent.command("ping")
        async def ping(target: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
            return {"pong": True, "worker_id": agent.worker_id}

        @agent.command("hold")
        async def hold(target: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
            name = str(parameters.get("gate", ""))
            gate = gates.setdefault(name, trio.Event())
            with trio.fail_after(300):  # a test that forgets to release
                await gate.wait()
            return {"released": name}

        loop.run(loop.nursery.start, agent.run)
        yield Dashboard(
            loop=loop,
            brain=brain,
            config=config,
            admin_token=admin,
            agent_id=str(agent_id),
            agent=agent,
            gates=gates,
        )
    finally:
        loop.close()


@pytest.fixture(scope="module")
def serve_dashboard() -> Callable[..., AbstractContextManager[Dashboard]]:
    """`serving_dashboard`, for a module whose dashboard needs a clock or data."""
    return serving_dashboard


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    """One `serving_dashboard` per test module."""
    with serving_dashboard(tmp_path_factory.mktemp("dashboard") / "data") as dashboard:
        yield dashboard


@pytest.fixture
def page(browser: Any, dashboard: Dashboard) -> Iterator[Any]:
    """A fresh browser context (no cookies) and page. The test fails on a
    script error or a console.error of the page's own; the browser's own
    network messages (a 401 the test asked for, a refused socket) are not
    errors of the page, and what they break is asserted on directly."""
    context = browser.new_context(viewport={"width": 1440, "height": 900}, color_scheme="dark")
    context.set_default_timeout(60_000)  # bounds failures only
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda message: (
            errors.append(message.text)
            if message.type == "error" and not message.text.startswith(_NETWORK_MESSAGES)
            else None
        ),
    )
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"the page logged errors: {errors}"


@attrs.define
class TaskAgent:
    """An agent ("jobs / runner", worker "runner-1") that reports the tasks of
    engine ``trio`` and takes ``retry_task`` and ``cancel_task`` for them
    (its hello advertises both, so the API offers both actions).

    A retry is answered as an engine's adapter would: the task is sent again
    under a new id (``<id>.r<n>``, in the result's ``new_task_id``), which it
    reports as received with the inputs it was sent with."""

    dashboard: Dashboard
    agent: Agent
    agent_id: str
    commands: list[tuple[str, dict[str, Any], dict[str, Any]]]  # (action, target, parameters)

    def emit(self, kind: str, task_id: str, **data: Any) -> None:
        """A ``task.<kind>`` event of the task; ``data`` as the engines send it
        (task_name, queue, args, kwargs, result, exception, exception_message,
        traceback, worker, runtime_ms, parent_task_id...)."""
        event = {"kind": f"task.{kind}", "engine": "trio", "task_id": task_id, "data": data}
        self.dashboard.loop.run_sync(self.agent.emit, event)


@pytest.fixture(scope="module")
def task_agent(dashboard: Dashboard) -> TaskAgent:
    token, secret, agent_id = dashboard.loop.run(
        functools.partial(provision, dashboard.config, project="jobs", agent="runner")
    )
    agent = Agent(
        dashboard.url, token=token, secret=secret, worker_id="runner-1", worker_role="worker"
    )
    helper = TaskAgent(dashboard=dashboard, agent=agent, agent_id=str(agent_id), commands=[])

    @agent.command("retry_task")
    async def retry(target: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
        helper.commands.append(("retry_task", target, parameters))
        new_id = f"{parameters['task_id']}.r{len(helper.commands)}"
        data = {"task_name": parameters.get("task_name")}
        if "override_args" in parameters:
            data["args"] = parameters["override_args"]
            data["kwargs"] = parameters["override_kwargs"]
        agent.emit({"kind": "task.received", "engine": "trio", "task_id": new_id, "data": data})
        return {"new_task_id": new_id}

    @agent.command("cancel_task")
    async def cancel(target: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
        helper.commands.append(("cancel_task", target, parameters))
        return {"cancelled": parameters.get("task_id")}

    dashboard.loop.run(dashboard.loop.nursery.start, agent.run)
    return helper


@attrs.define
class QueueAgent:
    """A raw agent ("mail / broker", worker "broker-1") whose heartbeats
    report a celery broker's queue depths, as z4j-celery's do, and whose
    hello advertises ``purge_queue``. It reads and drops what the brain
    sends: a purge command is created and delivered, never answered."""

    agent_id: str
    project_key: bytes  # what the brain signs purge confirmations with
    depths: dict[str, int]


@pytest.fixture(scope="module")
def queue_agent(dashboard: Dashboard) -> QueueAgent:
    token, secret, agent_id = dashboard.loop.run(
        functools.partial(provision, dashboard.config, project="mail", agent="broker")
    )
    depths = {"emails": 7, "reports": 0}
    health = {
        "celery.queue_depths": json.dumps(depths),
        "celery.broker_connected": "True",
        "celery.broker_type": "redis",
    }

    async def run(task_status: trio.TaskStatus[None]) -> None:
        async with raw_agent(
            dashboard.brain.addresses.http,
            token,
            secret,
            worker_id="broker-1",
            capabilities={"celery": ["purge_queue"]},
        ) as agent:
            await agent.send(f.Heartbeat(adapter_health=health))  # proves the key, too
            task_status.started()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain, agent.ws, nursery.cancel_scope)
                try:
                    while True:  # the brain closes a session silent for 3 intervals
                        await trio.sleep(2)
                        await agent.send(f.Heartbeat(adapter_health=health))
                except trio_websocket.ConnectionClosed:
                    nursery.cancel_scope.cancel()  # the brain stopped first

    dashboard.loop.run(dashboard.loop.nursery.start, run)
    return QueueAgent(agent_id=str(agent_id), project_key=decode_secret(secret), depths=depths)


async def _drain(ws: trio_websocket.WebSocketConnection, scope: trio.CancelScope) -> None:
    """Read and drop a socket's messages until it closes; then cancel ``scope``."""
    try:
        while True:
            await ws.get_message()
    except trio_websocket.ConnectionClosed:
        scope.cancel()

"""Our brain as a conformance target, for the tests: in this process, on its own thread.

The suite still talks to it only over sockets; what runs in-process is the
harness: starting the brain (so a bite test can patch it), provisioning an
agent, and the hooks (store reads; minting through ``brain.commands.send``,
which delivers at once instead of at the next sweep).

`opamp_token` makes an OpAMP token in the store, as ``z4j opamp token
create`` does; `ServedBrain.opamp_target` points the OpAMP machine at the
brain with one.

`stalled_ingest` starts a brain whose store is down, so its drains never
run and its buffer fills: the arrangement the backpressure rule needs.
"""

from __future__ import annotations

import functools
import itertools
import secrets
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from z4j import keys
from z4j.config import Config
from z4j.store import Store, store_for
from z4j.testing.agents import provision
from z4j.testing.brain import RunningBrain, make_config, running_brain

from .portal import TaskGroup, TrioPortal
from .target import AgentTarget, Hooks, IngestTarget, OpampTarget
from .z4j_hooks import COMMAND_TIMEOUT_SECONDS, opamp_config_hook, store_hooks

__all__ = [
    "BACKPRESSURE_CAPACITY",
    "DOWN_STORE_URL",
    "LIMITS",
    "OPAMP_MAX_MESSAGE_BYTES",
    "RATE_LIMITS",
    "ServedBrain",
    "opamp_token",
    "stalled_ingest",
]

# Nothing listens on port 1: the store is down, migrations retry, drains wait.
DOWN_STORE_URL = "postgresql://127.0.0.1:1/down?connect_timeout=1"
# The OpAMP message limit of the test brains: small, so that the 413 rule's
# bodies are cheap (the CLI's default is the brain's, 10 MiB).
OPAMP_MAX_MESSAGE_BYTES = 256 * 1024
# Limits low enough for the suite to reach them (rate limits, worker cap,
# idle close, inflate limit); the targets are told the same values.
LIMITS: dict[str, Any] = {
    "ws_per_agent_concurrency_cap": 3,
    "ws_heartbeat_interval_seconds": 1,
    "ws_rate_limit_frames_per_second": 300,
    "ws_rate_limit_events_per_second": 1000,
    "ingest_max_inflated_bytes": 65536,
    "opamp_max_message_bytes": OPAMP_MAX_MESSAGE_BYTES,
}
# For the frame rate check, a brain of its own: a limit this low is exceeded
# by any burst however slowly the brain reads it, and by the suite's own traffic.
RATE_LIMITS: dict[str, Any] = {**LIMITS, "ws_rate_limit_frames_per_second": 2}
BACKPRESSURE_CAPACITY = 4


async def opamp_token(config: Config, project: str) -> str:
    """A project (made if missing) and a new OpAMP token for it, in the store directly."""
    store = store_for(config)
    try:
        await store.migrate()
        found = await store.find_project(project) or await store.create_project(project)
        token = keys.new_opamp_token()
        await store.add_opamp_token(
            found.id, keys.opamp_token_hash(keys.master_secret(config), token), "conformance"
        )
        return token
    finally:
        await store.aclose()


async def _serve(config: Config, task_status: trio.TaskStatus[RunningBrain]) -> None:
    async with running_brain(config) as brain:
        task_status.started(brain)
        await trio.sleep_forever()


class ServedBrain:
    """A running brain plus a provisioned agent; `close` hard-stops it."""

    def __init__(self, config: Config, portal: TrioPortal) -> None:
        self.config = config
        self.portal = portal
        self._group: TaskGroup = portal.task_group()
        self.brain: RunningBrain = portal.run(self._group.nursery.start, _serve, config)
        self.token = ""
        self.secret = ""
        self.agent_id = ""
        self._store: Store | None = None  # for hooks, opened when first needed

    def new_agent(self) -> None:
        """Provision a fresh agent (its own project) and use its credentials from now on."""
        project = f"conformance-{secrets.token_hex(4)}"
        token, secret, agent_id = trio.run(
            functools.partial(provision, self.config, project=project)
        )
        self.token, self.secret, self.agent_id = token, secret, str(agent_id)

    def agent_target(self, **limits: Any) -> AgentTarget:
        host, port = self.brain.addresses.http
        config = self.config
        target = AgentTarget(
            host=host,
            port=port,
            token=self.token,
            secret=self.secret,
            worker_cap=config.ws_per_agent_concurrency_cap,
            frames_per_second=config.ws_rate_limit_frames_per_second,
            events_per_second=config.ws_rate_limit_events_per_second,
        )
        return attrs.evolve(target, **limits)

    def ingest_target(self) -> IngestTarget:
        host, port = self.brain.ingest
        return IngestTarget(
            host=host,
            port=port,
            token=self.config.ingest_token,
            max_frame_bytes=self.config.ingest_max_frame_bytes,
            max_inflated_bytes=self.config.ingest_max_inflated_bytes,
        )

    def opamp_target(self, **options: Any) -> OpampTarget:
        """The brain's /v1/opamp, with a new token of a new project, and z4j's policy."""
        token = trio.run(opamp_token, self.config, f"opamp-{secrets.token_hex(4)}")
        host, port = self.brain.addresses.http
        target = OpampTarget(
            scheme="http",
            host=host,
            port=port,
            token=token,
            max_message_bytes=self.config.opamp_max_message_bytes,
            z4j_policy=True,
        )
        return attrs.evolve(target, **options)

    def opamp_hooks(self, target: OpampTarget) -> Hooks:
        """Configurations pushed through a store kept open on the brain's portal,
        for ``target``'s token's project."""
        assert target.token is not None
        if self._store is None:
            self._store = store_for(self.config, application_name="z4j-conformance")
        store = self._store

        def run(use: Callable[[Store], Awaitable[Any]]) -> Any:
            return self.portal.run(use, store)

        host, port = self.brain.addresses.http
        return Hooks(
            opamp_config=opamp_config_hook(
                self.config, target.token, run, api=f"http://{host}:{port}"
            )
        )

    def hooks(self, *, command_timeout: int = COMMAND_TIMEOUT_SECONDS) -> Hooks:
        """Store hooks, but commands minted by the brain itself (no sweep wait)."""
        commands = self.brain.addresses.commands

        def mint_command(agent_id: str, action: str, parameters: dict[str, Any]) -> str:
            send = functools.partial(
                commands.send,
                uuid.UUID(agent_id),
                action,
                parameters=parameters,
                timeout_seconds=command_timeout,
                issued_by="conformance",
            )
            return str(self.portal.run(send).id)

        def cancel_command(command_id: str) -> None:
            cancel = functools.partial(commands.cancel, uuid.UUID(command_id), actor="conformance")
            self.portal.run(cancel)

        return attrs.evolve(
            store_hooks(self.config), mint_command=mint_command, cancel_command=cancel_command
        )

    @staticmethod
    def stalled_factory(
        portal: TrioPortal, data_dir: Path
    ) -> Callable[[], AbstractContextManager[IngestTarget]]:
        """Fresh brains whose drains never run, one per call (per example), on ``portal``."""
        count = itertools.count()
        return lambda: stalled_ingest(
            portal, data_dir / f"stalled-{next(count)}", capacity=BACKPRESSURE_CAPACITY
        )

    def close(self) -> None:
        if self._store is not None:
            self.portal.run(self._store.aclose)
        self.portal.run(self._group.aclose)


@contextmanager
def stalled_ingest(
    portal: TrioPortal, data_dir: Path, *, capacity: int, **overrides: Any
) -> Iterator[IngestTarget]:
    """A new brain whose store is down (its buffer only fills), for one example."""
    config = make_config(
        data_dir, DOWN_STORE_URL, buffer_max_rows=capacity, log_level="ERROR", **overrides
    )
    served = ServedBrain(config, portal)
    try:
        yield attrs.evolve(served.ingest_target(), capacity=capacity, fresh=True)
    finally:
        served.close()

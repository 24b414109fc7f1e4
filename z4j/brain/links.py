"""The small objects services share, so that no service holds another.

A service is finished when its constructor returns: nothing is assigned to
it afterwards. Where two services would need each other (the agent endpoint
fills the live sessions that commands deliver to; the registry wakes
commands and closes sessions; the dashboard hub relays through the registry
and the registry feeds the hub), the composition root builds one of these
first and hands it to both sides. They hold state and wake-ups only: no
tasks, no I/O, and they import no service.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

import trio

from ..protocol.agent import frames as f
from ..store.base import CommandRecord

SAMPLE_SIZE = 20  # events kept in one dashboard ``events`` message

__all__ = [
    "OPAMP_WORKER_PREFIX",
    "SAMPLE_SIZE",
    "AlonePeers",
    "CommandDesk",
    "CommandError",
    "CommandSignals",
    "DashboardOutbox",
    "LiveSession",
    "LiveSessions",
    "LostSessions",
    "OpampNudges",
    "OpampSessionTable",
    "Ownership",
    "Replicas",
    "SessionTable",
    "merge_events",
]


class CommandError(Exception):
    """The command cannot be minted: unknown agent, bad arguments."""


class CommandDesk(Protocol):
    """What the API and the CLI use of the command service: mint, cancel,
    and wait a bounded time for a command's end (a read the API answers with
    the agent's result, such as ``dlq.list``)."""

    async def send(
        self,
        agent: uuid.UUID | str,
        action: str,
        *,
        project: str | None = None,
        target: dict[str, Any] | None = None,
        parameters: dict[str, Any] | None = None,
        timeout_seconds: int = 60,
        issued_by: str | None = None,
    ) -> CommandRecord: ...
    async def cancel(
        self, command_id: uuid.UUID, *, actor: str | None = None
    ) -> CommandRecord | None: ...
    async def wait(self, command_id: uuid.UUID, *, within: float) -> CommandRecord | None: ...


class LiveSession(Protocol):
    """What others use of one agent connection (one worker)."""

    @property
    def agent_id(self) -> uuid.UUID: ...
    @property
    def worker_id(self) -> str: ...
    @property
    def role(self) -> str | None: ...
    async def send(self, payload: f.Payload, *, frame_id: str | None = None) -> None: ...
    def kick(self, code: int) -> None: ...


S = TypeVar("S", bound=LiveSession)


class LiveSessions(Protocol):
    """What commands and the registry use of the session table (read, close)."""

    @property
    def sessions(self) -> Mapping[tuple[uuid.UUID, str], LiveSession]: ...
    def every_session(self) -> Sequence[LiveSession]: ...
    def sessions_of(self, agent_id: uuid.UUID) -> Sequence[LiveSession]: ...
    def lost(self, agent_id: uuid.UUID, worker_id: str, code: int) -> None: ...
    async def close_revoked(
        self, is_revoked: Callable[[uuid.UUID], Awaitable[bool]], code: int
    ) -> int: ...


class LostSessions(Protocol):
    """What the registry needs to close a session another replica took."""

    def lost(self, agent_id: uuid.UUID, worker_id: str, code: int) -> None: ...


class Kickable(Protocol):
    def kick(self, code: int) -> None: ...


K = TypeVar("K", bound=Kickable)

OPAMP_WORKER_PREFIX = "opamp:"  # an OpAMP session's worker id in the ownership table


class OpampSessionTable(Generic[K]):
    """The open OpAMP WebSocket sessions of this brain, by (project, instance
    uid): the OpAMP endpoint fills it, the registry closes one another
    replica took (`lost`, with the worker id it was claimed under)."""

    def __init__(self) -> None:
        self.sessions: dict[tuple[uuid.UUID, bytes], K] = {}

    def lost(self, project_id: uuid.UUID, worker_id: str, code: int) -> None:
        try:
            uid = bytes.fromhex(worker_id.removeprefix(OPAMP_WORKER_PREFIX))
        except ValueError:
            return
        session = self.sessions.get((project_id, uid))
        if session is not None:
            session.kick(code)


class SessionTable(Generic[S]):
    """The live agent sessions of this brain: the endpoint fills it, commands
    deliver through it, the registry closes sessions another replica took.

    ``sessions`` holds those that proved the signing key, by (agent, worker):
    the only ones commands go to. ``unproven`` holds those still waiting to.
    """

    def __init__(self) -> None:
        self.sessions: dict[tuple[uuid.UUID, str], S] = {}
        self.unproven: set[S] = set()

    def every_session(self) -> list[S]:
        """The open sessions, proven or not."""
        return [*self.sessions.values(), *self.unproven]

    def sessions_of(self, agent_id: uuid.UUID) -> list[S]:
        return [s for (a, _), s in self.sessions.items() if a == agent_id]

    def close_all(self, code: int) -> None:
        for session in self.every_session():
            session.kick(code)

    def lost(self, agent_id: uuid.UUID, worker_id: str, code: int) -> None:
        """Another replica owns this worker's session now: close ours."""
        session = self.sessions.get((agent_id, worker_id))
        if session is not None:
            session.kick(code)

    async def close_revoked(
        self, is_revoked: Callable[[uuid.UUID], Awaitable[bool]], code: int
    ) -> int:
        """Close the sessions of agents revoked since they connected; how many."""
        closed = 0
        for agent_id in {s.agent_id for s in self.every_session()}:
            if await is_revoked(agent_id):
                for session in self.every_session():
                    if session.agent_id == agent_id:
                        session.kick(code)
                        closed += 1
        return closed


class CommandSignals:
    """Wake-ups for the command service, given by whoever learns of a change
    (the registry, from another replica's notification)."""

    def __init__(self) -> None:
        self.wanted: set[uuid.UUID] = set()  # agents to deliver to at once
        self.wake = trio.Event()
        self.finished: dict[uuid.UUID, trio.Event] = {}  # waiters, by command

    def deliver_soon(self, agent_id: uuid.UUID) -> None:
        """Deliver ``agent_id``'s waiting commands to its workers here, soon
        (the nil UUID means every agent's)."""
        self.wanted.add(agent_id)
        self.wake.set()

    def finished_elsewhere(self, command_id: uuid.UUID) -> None:
        """A final state was recorded (here or on another replica): wake waiters."""
        event = self.finished.get(command_id)
        if event is not None:
            event.set()


class OpampNudges:
    """OpAMP agents whose desired configuration changed, to be told at once.

    Whoever writes a configuration (the API, a rollout) calls `changed`. The
    OpAMP WebSocket endpoint takes `take_wanted` and pushes the new
    configuration on those of its sessions; when replicated, the registry
    also takes `take_relay` and announces it, and what other replicas
    announce comes back through `changed_elsewhere` (local sessions only).
    HTTP agents need no nudge: their next poll reads the store.
    """

    def __init__(self, *, replicated: bool = False) -> None:
        self.replicated = replicated
        self.generation = 0  # moves with every change told: caches of configurations compare it
        # (project, instance uid) -> whether the change was made here
        self._wanted: dict[tuple[uuid.UUID, bytes], bool] = {}
        self.wake = trio.Event()
        self._relay: dict[uuid.UUID, set[bytes]] = {}
        self.relay_ready = trio.Event()

    def changed(self, project_id: uuid.UUID, instance_uids: Iterable[bytes]) -> None:
        uids = set(instance_uids)
        if not uids:
            return
        self.generation += 1
        for uid in uids:
            self._wanted[project_id, uid] = True
        self.wake.set()
        if self.replicated:
            self._relay.setdefault(project_id, set()).update(uids)
            self.relay_ready.set()

    def changed_elsewhere(self, project_id: uuid.UUID, instance_uids: Iterable[bytes]) -> None:
        self.generation += 1
        for uid in instance_uids:
            self._wanted.setdefault((project_id, uid), False)
        self.wake.set()

    def take_wanted(self) -> dict[tuple[uuid.UUID, bytes], bool]:
        self.wake = trio.Event()
        wanted, self._wanted = self._wanted, {}
        return wanted

    def take_relay(self) -> dict[uuid.UUID, set[bytes]]:
        self.relay_ready = trio.Event()
        relay, self._relay = self._relay, {}
        return relay


class DashboardOutbox:
    """Dashboard messages made here, waiting to be relayed to other replicas:
    the hub puts, the registry's relay task takes."""

    def __init__(self) -> None:
        self._messages: list[dict[str, Any]] = []
        self.ready = trio.Event()

    def put(self, message: dict[str, Any]) -> None:
        self._messages.append(message)
        self.ready.set()

    def take_all(self) -> list[dict[str, Any]]:
        self.ready = trio.Event()
        messages, self._messages = self._messages, []
        return messages


class Ownership(Protocol):
    """What the agent endpoint needs of the registry: claims on sessions."""

    async def acquire(self, agent_id: uuid.UUID, worker_id: str) -> int: ...
    async def release(self, agent_id: uuid.UUID, worker_id: str, token: int) -> None: ...


class Replicas(Protocol):
    """What the command service needs of the registry."""

    @property
    def is_leader(self) -> bool: ...
    async def command_minted(self, agent_id: uuid.UUID) -> bool: ...
    async def command_finished(self, command_id: uuid.UUID) -> None: ...


class AlonePeers:
    """`Ownership` and `Replicas` of a process with no registry (tools, tests):
    the leader, with no one to tell."""

    def __init__(self) -> None:
        self._tokens = 0

    @property
    def is_leader(self) -> bool:
        return True

    async def acquire(self, agent_id: uuid.UUID, worker_id: str) -> int:
        self._tokens += 1
        return self._tokens

    async def release(self, agent_id: uuid.UUID, worker_id: str, token: int) -> None:
        pass

    async def command_minted(self, agent_id: uuid.UUID) -> bool:
        return False

    async def command_finished(self, command_id: uuid.UUID) -> None:
        pass


def merge_events(queued: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Two dashboard ``events`` messages as one (a slow subscriber's, or a relayed burst)."""
    projects = {p: {**f, "kinds": dict(f["kinds"])} for p, f in queued.get("projects", {}).items()}
    for project, figures in new.get("projects", {}).items():
        into = projects.setdefault(project, {"count": 0, "kinds": {}})
        into["count"] += figures["count"]
        _add_kinds(into["kinds"], figures["kinds"])
    kinds = dict(queued["kinds"])
    _add_kinds(kinds, new["kinds"])
    sample = (new["sample"] + queued["sample"])[:SAMPLE_SIZE]  # newest first
    return {
        "type": "events",
        "count": queued["count"] + new["count"],
        "kinds": kinds,
        "sample": sample,
        "projects": projects,
    }


def _add_kinds(into: dict[str, int], more: dict[str, int]) -> None:
    for kind, n in more.items():
        into[kind] = into.get(kind, 0) + n

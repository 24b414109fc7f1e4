"""``/ws/dashboard``: live changes fanned out to dashboard subscribers.

Producers (drains, commands, the heartbeat, the agent endpoint) call
`DashboardHub.publish` synchronously; it never blocks them and costs
nothing without subscribers. Each subscriber has a bounded queue: a burst
of ``events`` messages is coalesced into one (counts summed, a capped
sample kept), and a subscriber whose queue still overflows is dropped
(closed 1008, counted) rather than slowing anyone else.

Messages are JSON text frames, each with a ``type``: ``hello``, ``events``
(records stored, with a small sample), ``command`` (every transition),
``instance`` (every heartbeat of this instance), ``agent`` (a worker
connected or disconnected), ``opamp_agent`` (an OpAMP agent's row or its
configuration's status was written: ids and what changed, the page reads
the rest from the API), ``opamp_rollout`` (an OpAMP rollout created, moved
by the API or the leader's rollout task, or its counts changed; the
rollout as the API shows it). On replicas (``postgres_notify``) messages made
here are also relayed to the others through the registry, and theirs
arrive through `publish_local`.

A user narrowed to projects (narrowing.py) gets only their projects'
messages, cut by `for_projects`: a message names its project (a command's,
an agent's, an OpAMP agent's or rollout's ``project_id``), and an
``events`` message carries per project the events counted and their kinds
(``projects``), so their view of it holds their projects' figures and
sample only. What names no project of theirs is not sent: instance
heartbeats (brain-wide), ingest payloads (no project) and any type this
module does not know. Their ``count`` is of the rows the feed looks into
(the first `SAMPLED_ROWS` payloads of each drained batch): exact for
batches that small, a lower bound for larger ones, since counting every
row's events per project would parse each stored record a second time on
the event loop.

Browsers send the session cookie with any WebSocket handshake, whatever
page opens it, and WebSockets have no CORS. So a socket signed in by the
cookie must also give the session's CSRF token (``?csrf=``, read by our
page from the ``z4j_csrf`` cookie, which no other origin can read); a
handshake whose ``Origin`` is not the ``Host`` it was sent to is refused
(when the scope carries the Host); and one without ``Origin`` (not a
browser) must sign in with a bearer token. The caller must be allowed
``read`` (policy.py's `DASHBOARD_ACTION`). All refusals close 4403. Each socket re-checks
its credentials every `RECHECK_SECONDS` against the store, so a revoked
token or a closed session ends its sockets within about a second, on every
replica (SQLite or Postgres alike: the store is the one truth).
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any
from urllib.parse import parse_qs

import orjson
import trio

from ..buffer import ClaimedRow
from ..events import EventRow, event_rows
from ..protocol.close import CloseCode
from ..stats import BrainStats
from ..store.base import StoreUnavailable
from .http.auth import Auth, Principal, credentials, header, same_origin
from .http.policy import DASHBOARD_ACTION, allowed
from .links import SAMPLE_SIZE, merge_events

__all__ = ["DashboardHub", "for_projects", "merge_events"]

log = logging.getLogger("z4j.dashboard")

QUEUE_SIZE = 256
SAMPLED_ROWS = 50  # buffered payloads per drained batch looked into for the feed
RECHECK_SECONDS = 1.0

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class _Subscriber:
    __slots__ = ("dropped", "projects", "queue", "ready", "signed_out")

    def __init__(self, projects: frozenset[uuid.UUID] | None = None) -> None:
        """``projects``: the only projects whose messages it gets (None: all)."""
        self.queue: deque[dict[str, Any]] = deque()
        self.ready = trio.Event()
        self.dropped = False
        self.signed_out = False
        self.projects = None if projects is None else frozenset(str(p) for p in projects)


class DashboardHub:
    def __init__(
        self,
        stats: BrainStats,
        auth: Auth | None,
        *,
        instance_id: str,
        recheck_seconds: float = RECHECK_SECONDS,
        relay: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """``relay``: hands messages made here to other replicas (None: alone)."""
        self._stats = stats
        self._auth = auth
        self._recheck_seconds = recheck_seconds
        self._instance_id = instance_id
        self._subscribers: set[_Subscriber] = set()
        self._relay = relay

    @property
    def has_subscribers(self) -> bool:
        """Does anyone want messages: a subscriber here, or other replicas?"""
        return bool(self._subscribers) or self._relay is not None

    def publish(self, message: dict[str, Any]) -> None:
        """A change made here: to other replicas (if relayed) and to our subscribers."""
        if self._relay is not None:
            self._relay(message)
        self.publish_local(message)

    def publish_stored(
        self, buffer_id: uuid.UUID, rows: Sequence[ClaimedRow], records: int
    ) -> None:
        """A drained batch: its count, kinds and a small sample (the drain's hook)."""
        if not self.has_subscribers:
            return
        # Kinds and the sample come from the batch's first rows only: the
        # Trio thread must not parse every stored record a second time.
        kinds: Counter[str] = Counter()
        sample: list[dict[str, Any]] = []
        projects: dict[str, dict[str, Any]] = {}
        for at, key, source, kind, body, project, agent, worker in _sample_rows(
            buffer_id, rows[:SAMPLED_ROWS]
        ):
            kinds[kind] += 1
            project_id = None if project is None else str(uuid.UUID(bytes=project))
            if project_id is not None:
                figures = projects.get(project_id)
                if figures is None:
                    figures = projects[project_id] = {"count": 0, "kinds": {}}
                figures["count"] += 1
                figures["kinds"][kind] = figures["kinds"].get(kind, 0) + 1
            if len(sample) < SAMPLE_SIZE:
                sample.append(
                    {
                        "key": key.hex(),
                        "received_at": at.isoformat(),
                        "source": source,
                        "kind": kind,
                        "project_id": project_id,
                        "agent_id": None if agent is None else str(uuid.UUID(bytes=agent)),
                        "worker_id": worker,
                        "body": orjson.loads(body),
                    }
                )
        sample.reverse()  # newest first
        self.publish(
            {
                "type": "events",
                "count": records,
                "kinds": dict(kinds),
                "sample": sample,
                "projects": projects,
            }
        )

    def publish_local(self, message: dict[str, Any]) -> None:
        """Queue ``message`` for every subscriber here (coalescing, or dropping the slow)."""
        if not self._subscribers:
            return
        self._stats.dashboard_messages += 1
        views: dict[frozenset[str], dict[str, Any] | None] = {}
        for sub in list(self._subscribers):
            if sub.projects is None:
                view: dict[str, Any] | None = message
            elif sub.projects in views:
                view = views[sub.projects]
            else:
                view = views[sub.projects] = for_projects(message, sub.projects)
            if view is None:
                continue  # nothing of their projects
            queue = sub.queue
            if view["type"] == "events" and queue and queue[-1]["type"] == "events":
                queue[-1] = merge_events(queue[-1], view)
                self._stats.dashboard_coalesced += 1
            elif len(queue) >= QUEUE_SIZE:
                self._drop(sub)
                continue
            else:
                queue.append(view)
            sub.ready.set()

    def _drop(self, sub: _Subscriber) -> None:
        sub.dropped = True
        sub.queue.clear()
        sub.ready.set()
        self._subscribers.discard(sub)
        self._stats.dashboard_drops += 1
        log.warning("dropped a dashboard subscriber that fell %d messages behind", QUEUE_SIZE)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """The WebSocket handler: sign-in check, then the stream until either side goes."""
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        headers = scope["headers"]
        origin, host = header(headers, b"origin"), header(headers, b"host")
        if origin is not None and (host is None or not same_origin(origin, host)):
            log.warning("refused a dashboard socket from origin %r", origin[:200])
            await send({"type": "websocket.close", "code": CloseCode.FORBIDDEN})
            return
        principal: Principal | None = None
        if self._auth is not None:
            if origin is None and credentials(headers)[0] is None:
                # Not a browser (they always send Origin): sign in with a bearer token.
                await send({"type": "websocket.close", "code": CloseCode.FORBIDDEN})
                return
            principal = await self._auth.principal(headers)
            if principal is None:
                await send({"type": "websocket.close", "code": CloseCode.UNAUTHORIZED})
                return
            if not allowed(DASHBOARD_ACTION, principal.role, principal.scope):
                await send({"type": "websocket.close", "code": CloseCode.FORBIDDEN})
                return
            if principal.session is not None:
                query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
                csrf = query.get("csrf", [None])[0]
                if not self._auth.csrf_matches(principal.session, csrf):
                    await send({"type": "websocket.close", "code": CloseCode.FORBIDDEN})
                    return
        sub = _Subscriber(None if principal is None else principal.projects)
        self._subscribers.add(sub)
        self._stats.dashboard_subscribers += 1
        try:
            await self._send(send, {"type": "hello", "instance_id": self._instance_id})
            async with trio.open_nursery() as nursery:

                async def until_peer_leaves() -> None:
                    while (await receive())["type"] != "websocket.disconnect":
                        pass  # subscribers have nothing to say
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until_peer_leaves)
                if principal is not None:
                    nursery.start_soon(self._while_signed_in, principal, sub)
                while True:
                    await sub.ready.wait()
                    sub.ready = trio.Event()
                    if sub.signed_out:
                        await send({"type": "websocket.close", "code": CloseCode.UNAUTHORIZED})
                        nursery.cancel_scope.cancel()
                        return
                    if sub.dropped:
                        await send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION})
                        nursery.cancel_scope.cancel()
                        return
                    while sub.queue:
                        await self._send(send, sub.queue.popleft())
        finally:
            self._subscribers.discard(sub)
            self._stats.dashboard_subscribers -= 1

    async def _while_signed_in(self, principal: Principal, sub: _Subscriber) -> None:
        """Mark the subscriber signed out once its token or session is gone."""
        assert self._auth is not None
        while True:
            await trio.sleep(self._recheck_seconds)
            try:
                valid = await self._auth.still_valid(principal)
            except StoreUnavailable:
                continue  # keep the socket through a store outage; check again
            if not valid:
                sub.signed_out = True
                sub.ready.set()
                return

    @staticmethod
    async def _send(send: Send, message: dict[str, Any]) -> None:
        await send({"type": "websocket.send", "text": orjson.dumps(message).decode()})


def for_projects(message: dict[str, Any], projects: frozenset[str]) -> dict[str, Any] | None:
    """What a subscriber narrowed to ``projects`` (ids as text) sees of
    ``message``: the message, its part of an ``events`` message, or None
    (nothing of theirs, or a message that names no project)."""
    kind = message.get("type")
    if kind == "events":
        figures = {p: f for p, f in (message.get("projects") or {}).items() if p in projects}
        if not figures:
            return None
        kinds: dict[str, int] = {}
        for f in figures.values():
            for name, n in f["kinds"].items():
                kinds[name] = kinds.get(name, 0) + n
        return {
            "type": "events",
            "count": sum(f["count"] for f in figures.values()),
            "kinds": kinds,
            "sample": [e for e in message["sample"] if e.get("project_id") in projects],
            "projects": figures,
        }
    if kind == "command":
        project = message["command"].get("project_id")
    elif kind == "opamp_rollout":
        project = message["rollout"].get("project_id")
    elif kind in ("agent", "opamp_agent"):
        project = message.get("project_id")
    else:
        return None  # brain-wide (instance), or a type not known to be of a project
    return message if project in projects else None


def _sample_rows(buffer_id: uuid.UUID, rows: Sequence[ClaimedRow]) -> Iterator[EventRow]:
    """The event rows of ``rows``, skipping payloads the drain quarantined."""
    for row in rows:
        try:
            yield from list(event_rows(buffer_id, [row]))
        except ValueError:  # unparseable: it went to dead_letter, not the store
            continue

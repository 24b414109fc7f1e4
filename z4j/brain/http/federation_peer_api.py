"""What a region serves a hub's federation token: ``/api/v1/federation/peer/*``.

A hub reads a region through these routes only (policy.py's
``federation`` action): its summary, and pages of its agents (with their
workers; by creation time), events, commands and audit, each item with its
own keyset ``cursor`` and time ``sort_at`` and each page with its
``frontier`` (the time down to which it is complete), which is what the
hub merges regions by (brain/federation/merge.py): a region of tens of
thousands of agents answers a page of them at a time, not all in one answer
(which a hub's byte cap would refuse). The same reads serve the hub's own
region in process (`PeerRoutes.read`), so every region, local or not,
answers alike.

``POST /federation/peer/commands`` mints a command here for a hub's
operator: only for a token made with ``--allow-commands`` (the
``federation_write`` action; api.py refuses others, counted and audited),
and only when the request names this region in ``confirm_region``. The
command's issuer and the audit row name the token and the operator the hub
forwards (``federation:<token>/<operator>``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, NoReturn

from ..._version import __version__
from ...stats import FederationStats
from ...store.base import COMMAND_STATES, EventRecord, Store
from ..links import CommandDesk, CommandError
from ._request import (
    ApiError,
    Handler,
    Request,
    Response,
    check_text,
    epoch,
    id_cursor_param,
    limit_param,
)
from .audit_params import audit_filter
from .command_input import command_error, command_fields
from .events_api import body_max_param, event_filter, within_page_bytes
from .events_api import event_json as _event_json
from .provisioning_api import agent_page
from .resources import to_json

__all__ = ["OPERATOR_CHARS", "PEER_READS", "PeerRoutes", "body_max_param"]

# A forwarded operator's name (an actor: "alice", "alice/token:ci", "token:admin").
OPERATOR_CHARS: Final = 200
# The reads, by the name the hub asks for them by (path under /federation/peer/).
PEER_READS: Final = ("summary", "agents", "events", "commands", "audit")

Readiness = Callable[[], Awaitable[Mapping[str, str]]]


class PeerRoutes:
    """The region side of federation: reads for hubs (and this hub), and commands."""

    def __init__(
        self,
        store: Store,
        commands: CommandDesk,
        stats: FederationStats,
        *,
        region: str,
        readiness: Readiness | None = None,
        live_seconds: float = 15.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``readiness``: the readiness checks' verdicts, run now (server.HealthChecks.run).
        ``live_seconds``: an instance heard from within this long counts as running."""
        self._store = store
        self._commands = commands
        self.stats = stats
        self.region = region
        self._readiness = readiness
        self._live_seconds = live_seconds
        self._clock = clock
        self._reads: dict[str, Callable[[dict[str, str]], Awaitable[dict[str, Any]]]] = {
            "summary": self._summary,
            "agents": self._agents,
            "events": self._events,
            "commands": self._commands_page,
            "audit": self._audit,
        }

    def routes(self) -> list[tuple[str, str, Handler]]:
        routes: list[tuple[str, str, Handler]] = [
            ("GET", f"/federation/peer/{name}", self._serve(name)) for name in PEER_READS
        ]
        routes.append(("POST", "/federation/peer/commands", self.command))
        return routes

    def _serve(self, name: str) -> Handler:
        read = self._reads[name]

        async def handler(request: Request) -> Response:
            return 200, await read(dict(request.query))

        return handler

    async def read(self, name: str, query: Mapping[str, str]) -> dict[str, Any]:
        """One of `PEER_READS`, in process (the hub's own region); `ApiError` on bad input."""
        return await self._reads[name](dict(query))

    # -- reads ---------------------------------------------------------------------------

    async def _summary(self, q: dict[str, str]) -> dict[str, Any]:
        now = self._clock()
        instances = [
            i
            for i in await self._store.list_instances()
            if i.stopped_at is None and now - i.last_seen <= self._live_seconds
        ]
        workers, agents = await self._store.connected_counts()
        checks = dict(await self._readiness()) if self._readiness is not None else {}
        return {
            "region": self.region,
            "version": __version__,
            "instances": len(instances),
            "agents_connected": agents,
            "workers_connected": workers,
            "ingest_rate": round(sum(i.ingest_rate for i in instances), 3),
            "drain_rate": round(sum(i.drain_rate for i in instances), 3),
            "buffer_depth": sum(i.buffer_depth for i in instances),
            "ready": all(v == "ok" for v in checks.values()),
            "checks": checks,
        }

    async def _agents(self, q: dict[str, str]) -> dict[str, Any]:
        limit = limit_param(q)
        before = _created_cursor(q["cursor"]) if "cursor" in q else None
        page = await self._store.agents_page(before=before, limit=limit)
        shown = await agent_page(self._store, page, self._clock())
        for agent, item in zip(page, shown, strict=True):
            item["cursor"] = f"{agent.created_at!r}_{agent.id}"
            item["sort_at"] = agent.created_at
        # Bounded in bytes too: an agent may run hundreds of workers, each listed.
        items, full = within_page_bytes(shown)
        if not full and len(page) < limit:
            return _page(items, None, None)
        return _page(items, items[-1]["cursor"], items[-1]["sort_at"])

    async def _events(self, q: dict[str, str]) -> dict[str, Any]:
        body_max = body_max_param(q)
        found = await self._store.search_events(event_filter(q))
        items, full = within_page_bytes(_event_item(event, body_max) for event in found.events)
        if full:
            return _page(items, items[-1]["cursor"], items[-1]["sort_at"])
        if found.next is None:
            return _page(items, None, None)
        at, last = found.next
        return _page(items, f"{at!r}_{last}", at)

    async def _commands_page(self, q: dict[str, str]) -> dict[str, Any]:
        limit = limit_param(q)
        state = q.get("state")
        if state is not None and state not in COMMAND_STATES:
            raise ApiError(400, "bad_request", f"state must be one of {', '.join(COMMAND_STATES)}")
        records = await self._store.list_commands(
            state=state, before=_created_cursor(q["cursor"]) if "cursor" in q else None, limit=limit
        )
        items = []
        for c in records:
            item = to_json(c)
            item["cursor"] = f"{c.created_at!r}_{c.id}"
            item["sort_at"] = c.created_at
            items.append(item)
        if len(records) < limit:
            return _page(items, None, None)
        return _page(items, items[-1]["cursor"], items[-1]["sort_at"])

    async def _audit(self, q: dict[str, str]) -> dict[str, Any]:
        limit = limit_param(q)
        before = None
        if "cursor" in q:
            before = id_cursor_param(q["cursor"])
        records = await self._store.list_audit(before_id=before, limit=limit, query=audit_filter(q))
        items = []
        last_at = float("inf")
        for a in records:
            item = to_json(a)
            item["cursor"] = str(a.id)
            # Rows are paged by id; their times run the same way but for clock
            # steps: each page is kept in time order for the merge.
            last_at = min(last_at, a.at)
            item["sort_at"] = last_at
            items.append(item)
        if len(records) < limit:
            return _page(items, None, None)
        return _page(items, items[-1]["cursor"], items[-1]["sort_at"])

    # -- the cross-region command ----------------------------------------------------------

    async def command(self, request: Request) -> Response:
        """Mint a command a hub forwards, for its operator; both sides audit it."""
        principal = request.principal
        assert principal is not None and principal.federation  # policy.py: federation_write
        body = request.json_object()
        operator = body.get("operator")
        confirm = body.get("confirm_region")
        if confirm != self.region:
            await self.refused(
                principal.name,
                "not_confirmed",
                f"confirm_region must name this region ({self.region!r})",
                operator=operator if isinstance(operator, str) else None,
            )
        if not isinstance(operator, str) or not 0 < len(operator) <= OPERATOR_CHARS:
            raise ApiError(
                400,
                "bad_request",
                f"operator: the hub's operator, 1 to {OPERATOR_CHARS} characters",
            )
        check_text(operator)
        fields = command_fields(body)
        actor = f"{principal.actor}/{operator}"
        try:
            record = await self._commands.send(
                fields.agent,
                fields.action,
                project=fields.project,
                target=fields.target,
                parameters=fields.parameters,
                timeout_seconds=fields.timeout_seconds,
                issued_by=actor,
            )
        except CommandError as exc:
            raise command_error(exc) from None
        await self._store.audit(
            "federation.command",
            f"command:{record.id}",
            {
                "outcome": "ok",
                "token": principal.name,
                "operator": operator,
                "region": self.region,
                "agent_id": str(record.agent_id),
                "action": record.action,
            },
            actor=actor,
        )
        return 201, {"region": self.region, "command": to_json(record)}

    async def refused(
        self,
        token: str,
        reason: str,
        message: str,
        *,
        operator: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> NoReturn:
        """Refuse a cross-region command here (403): counted by reason, audited, raised."""
        self.stats.refused_writes[reason] += 1
        await self._store.audit(
            "federation.command",
            f"region:{self.region}",
            {"outcome": "refused", "reason": reason, "token": token, "operator": operator},
            actor=f"federation:{token}" + (f"/{operator[:OPERATOR_CHARS]}" if operator else ""),
        )
        raise ApiError(
            403, reason, message, detail={"region": self.region, "reason": reason, **(detail or {})}
        )


def _page(
    items: list[dict[str, Any]], next_cursor: str | None, frontier: float | None
) -> dict[str, Any]:
    return {"items": items, "next_cursor": next_cursor, "frontier": frontier}


def _event_item(event: EventRecord, body_max: int) -> dict[str, Any]:
    item = _event_json(event, body_max_bytes=body_max)
    item["cursor"] = f"{event.received_at!r}_{event.id}"
    item["sort_at"] = event.received_at
    return item


def _created_cursor(raw: str) -> tuple[float, uuid.UUID]:
    """A commands' or agents' page cursor: (created_at, id) as ``at_id``."""
    at, _, last = raw.partition("_")
    try:
        return epoch(float(at), "cursor"), uuid.UUID(last)
    except ValueError:
        raise ApiError(400, "bad_request", "cursor: as given by the last page") from None

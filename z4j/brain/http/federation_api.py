"""The hub's federated view: ``/api/v1/federation/*`` over every region.

Each route asks its regions at once (the hub's own in process, peers over
HTTPS: brain/federation/client.py), in one nursery per request, each peer
under its own deadline. What comes back is labelled by region (``region``
on every row) and, when any region failed or timed out, marked: ``partial``
true, ``unreachable`` naming those regions and ``errors`` saying why.
Never silently incomplete. Pages of agents (by creation), events, commands
and audit are merged by time (brain/federation/merge.py); their
``next_cursor`` continues every region at once. ``?region=a,b`` narrows any
read to those regions.

Fan-outs in flight are bounded hub-wide: each may hold an answer of up to
Z4J_FEDERATION_MAX_RESPONSE_BYTES per region, so at most `FANOUT_BYTES`
worth of them run at once (8 with two peers and the default cap). A
request that finds none free waits half the peer deadline, then gets 503
``federation_busy`` with a Retry-After: a client that opens many slow
federated reads holds its own share, not the hub's memory.

``POST /federation/regions/{name}/commands`` forwards a command to a peer
for the operator who asks, only with ``confirm_region`` naming that
region; the peer decides too (its token's grant, its own check of the
name). Both regions audit it with the operator's identity.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, NoReturn

import trio

from ...store.base import COMMAND_STATES, Store, StoreUnavailable
from ..federation.client import Answer, FederationClient
from ..federation.merge import (
    BadCursor,
    BadPage,
    Place,
    decode_cursor,
    encode_cursor,
    merge,
    region_page,
)
from ._request import ApiError, Handler, Request, Response, limit_param
from .audit_params import audit_filter
from .command_input import command_fields
from .events_api import event_filter
from .federation_peer_api import PeerRoutes, body_max_param

__all__ = ["PEER_PREFIX", "FederationRoutes"]

PEER_PREFIX: Final = "/api/v1/federation/peer/"
# Peer answers (as received) that the hub's fan-outs in flight may hold together.
FANOUT_BYTES: Final = 256 * 1024 * 1024
# A region summary's fields as the hub shows them (anything else a peer sends is dropped).
SUMMARY_FIELDS: Final = {
    "region": str,
    "version": str,
    "instances": int,
    "agents_connected": int,
    "workers_connected": int,
    "ingest_rate": float,
    "drain_rate": float,
    "buffer_depth": int,
    "ready": bool,
}


class FederationRoutes:
    """The hub's routes; ``client`` reaches the peers, ``local`` is this region."""

    def __init__(
        self,
        client: FederationClient,
        local: PeerRoutes,
        store: Store,
    ) -> None:
        self._client = client
        self._local = local
        self._store = store
        self._stats = local.stats
        self.region = local.region
        per_fanout = client.max_response_bytes * max(1, len(client.peers))
        self.fanouts = max(1, FANOUT_BYTES // per_fanout)
        self._slots = trio.CapacityLimiter(self.fanouts)

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/federation/regions", self._bounded(self._regions)),
            ("GET", "/federation/agents", self._bounded(self._agents)),
            ("GET", "/federation/events", self._bounded(self._events)),
            ("GET", "/federation/commands", self._bounded(self._commands)),
            ("GET", "/federation/audit", self._bounded(self._audit)),
            ("POST", "/federation/regions/{name}/commands", self._bounded(self._command)),
        ]

    def _bounded(self, handler: Handler) -> Handler:
        """``handler`` holding one of the hub's fan-out slots from start to answer."""

        async def bounded(request: Request) -> Response:
            wait = self._client.timeout_seconds / 2
            acquired = False
            with trio.move_on_after(wait):  # the wait for a slot, not the handler
                await self._slots.acquire()
                acquired = True
            if not acquired:
                self._stats.busy += 1
                raise ApiError(
                    503,
                    "federation_busy",
                    f"{self.fanouts} federated requests are in flight, the most this hub runs "
                    f"at once; none ended within {wait * 1000:.0f} ms: try again shortly",
                    headers=((b"retry-after", b"1"),),
                )
            try:
                return await handler(request)
            finally:
                self._slots.release()

        return bounded

    @property
    def regions(self) -> list[str]:
        """This region first, then the peers as configured."""
        return [self.region, *self._client.peers]

    def _selected(self, q: dict[str, str]) -> list[str]:
        raw = q.pop("region", "")
        if not raw:
            return self.regions
        wanted = {r.strip() for r in raw.split(",") if r.strip()}
        unknown = wanted - set(self.regions)
        if unknown:
            raise ApiError(
                400,
                "bad_request",
                f"region: no region named {sorted(unknown)[0]!r} (known: {', '.join(self.regions)})",
            )
        return [r for r in self.regions if r in wanted]

    async def _ask(self, read: str, queries: Mapping[str, Mapping[str, str]]) -> dict[str, Answer]:
        """``read`` of each region in ``queries`` (with its own query), all at once."""
        answers: dict[str, Answer] = {}
        refused: list[ApiError] = []

        async def local(query: Mapping[str, str]) -> None:
            started = trio.current_time()
            try:
                body = await self._local.read(read, query)
            except ApiError as exc:  # bad input the checks above let by: the caller's 4xx
                refused.append(exc)
                return
            except StoreUnavailable:
                answers[self.region] = Answer(
                    region=self.region, answered=False, error="this region's store is unavailable"
                )
                return
            answers[self.region] = Answer(
                region=self.region,
                answered=True,
                status=200,
                body=body,
                seconds=trio.current_time() - started,
            )

        async def peer(name: str, query: Mapping[str, str]) -> None:
            answers[name] = await self._client.get(name, PEER_PREFIX + read, query)

        async with trio.open_nursery() as nursery:
            for name, query in queries.items():
                if name == self.region:
                    nursery.start_soon(local, query)
                else:
                    nursery.start_soon(peer, name, query)
        if refused:
            raise refused[0]
        return answers

    def _marked(self, route: str, failed: Mapping[str, str | None]) -> dict[str, Any]:
        if failed:
            self._stats.partial[route] += 1
        return {
            "partial": bool(failed),
            "unreachable": [r for r in self.regions if r in failed],
            "errors": {r: failed[r] or "failed" for r in self.regions if r in failed},
        }

    # -- reads ---------------------------------------------------------------------------

    async def _regions(self, request: Request) -> Response:
        names = self._selected(dict(request.query))
        answers = await self._ask("summary", {key: {} for key in names})
        items, failed = [], {}
        for name in names:
            answer = answers[name]
            summary = _summary(answer.body) if answer.ok else None
            if summary is None:
                failed[name] = answer.error if not answer.ok else "not a region summary"
            items.append(
                {
                    "name": name,
                    "local": name == self.region,
                    "url": None if name == self.region else self._client.url(name),
                    "reachable": summary is not None,
                    "round_trip_ms": None
                    if answer.seconds is None
                    else round(answer.seconds * 1000, 1),
                    "cached": answer.cached,
                    "error": failed.get(name),
                    "summary": summary,
                }
            )
        return 200, {
            "region": self.region,
            "items": items,
            **self._marked("/api/v1/federation/regions", failed),
        }

    async def _agents(self, request: Request) -> Response:
        return await self._paged(request, "agents", "/api/v1/federation/agents")

    async def _events(self, request: Request) -> Response:
        return await self._paged(request, "events", "/api/v1/federation/events")

    async def _commands(self, request: Request) -> Response:
        return await self._paged(request, "commands", "/api/v1/federation/commands")

    async def _audit(self, request: Request) -> Response:
        return await self._paged(request, "audit", "/api/v1/federation/audit")

    async def _paged(self, request: Request, read: str, route: str) -> Response:
        q = dict(request.query)
        cursor = q.pop("cursor", None)
        names = self._selected(q)
        limit = limit_param(q)
        # Checked here once, as each region checks it: a bad query is a 400, not N failures.
        if read == "events":
            event_filter(q)
            body_max_param(q)
        elif read == "commands":
            if "state" in q and q["state"] not in COMMAND_STATES:
                raise ApiError(
                    400, "bad_request", f"state must be one of {', '.join(COMMAND_STATES)}"
                )
        elif read == "audit":
            audit_filter(q)
        try:
            every = decode_cursor(cursor, self.regions) if cursor else dict.fromkeys(self.regions)
        except BadCursor as exc:
            raise ApiError(
                400, "bad_request", f"cursor: as given by the last page ({exc})"
            ) from None
        places: dict[str, Place] = {name: every[name] for name in names}
        queries = {
            name: {**q, "cursor": place} if isinstance(place, str) else q
            for name, place in places.items()
            if place is not False
        }
        answers = await self._ask(read, queries)
        pages, failed = {}, {}
        for name, answer in answers.items():
            if not answer.ok:
                failed[name] = answer.error
                continue
            try:
                pages[name] = region_page(answer.body)
            except BadPage as exc:
                failed[name] = f"a malformed page: {exc}"
        merged, after = merge(pages, places, limit)
        items = []
        for name, item in merged:
            row = {k: v for k, v in item.items() if k not in ("cursor", "sort_at")}
            row["region"] = name
            items.append(row)
        return 200, {
            "items": items,
            "next_cursor": encode_cursor(after),
            **self._marked(route, failed),
        }

    # -- the cross-region command ----------------------------------------------------------

    async def _command(self, request: Request) -> Response:
        name = request.params["name"]
        body = request.json_object()
        operator = request.actor
        if name == self.region:
            raise ApiError(
                400, "own_region", f"{name} is this brain's region: use POST /api/v1/commands"
            )
        if name not in self._client.peers:
            raise ApiError(404, "not_found", f"no peer region {name!r}")
        if body.get("confirm_region") != name:
            await self._refused(
                name,
                operator,
                "not_confirmed",
                f"confirm_region must name the region ({name!r}): a command is sent to "
                "another region only on explicit intent",
            )
        fields = command_fields(body)
        forward = {
            "agent": fields.agent,
            "action": fields.action,
            "project": fields.project,
            "target": fields.target,
            "parameters": fields.parameters,
            "timeout_seconds": fields.timeout_seconds,
            "confirm_region": name,
            "operator": operator,
        }
        answer = await self._client.post(name, PEER_PREFIX + "commands", forward)
        reply = answer.body if isinstance(answer.body, dict) else {}
        command = reply.get("command")
        if answer.ok and isinstance(command, dict):
            await self._audit_command(
                name, operator, "ok", command_id=command.get("id"), fields=fields
            )
            return 201, {"region": name, "command": command}
        if not answer.answered:
            await self._audit_command(
                name, operator, "unreachable", error=answer.error, fields=fields
            )
            raise ApiError(
                504,
                "region_unreachable",
                f"region {name} did not answer ({answer.error}); the command may or may not "
                "have been minted there: look at its commands",
                detail={"region": name},
            )
        message = str(reply.get("message") or answer.error)
        code = str(reply.get("error") or "peer_error")
        status = answer.status or 502
        if status == 403:
            self._stats.refused_writes["peer_refused"] += 1
        await self._audit_command(
            name, operator, "refused", error=f"{status} {code}", fields=fields
        )
        if status == 401:
            status, code = 502, "peer_unauthorized"
            message = f"region {name} refused this hub's federation token (revoked or wrong?)"
        elif not 400 <= status < 500:
            status = 502
        raise ApiError(
            status,
            code[:64],
            f"region {name}: {str(message)[:300]}",
            detail={"region": name, "reason": code[:64]},
        )

    async def _refused(self, name: str, operator: str, reason: str, message: str) -> NoReturn:
        self._stats.refused_writes[reason] += 1
        await self._store.audit(
            "federation.command",
            f"region:{name}",
            {"outcome": "refused", "reason": reason, "region": name},
            actor=operator,
        )
        raise ApiError(403, reason, message, detail={"region": name, "reason": reason})

    async def _audit_command(
        self,
        name: str,
        operator: str,
        outcome: str,
        *,
        fields: Any,
        command_id: object = None,
        error: str | None = None,
    ) -> None:
        details: dict[str, Any] = {
            "outcome": outcome,
            "region": name,
            "agent": fields.agent,
            "action": fields.action,
        }
        if isinstance(command_id, str):
            details["command_id"] = command_id
        if error is not None:
            details["error"] = error
        await self._store.audit("federation.command", f"region:{name}", details, actor=operator)


def _summary(body: object) -> dict[str, Any] | None:
    """A peer's summary, its known fields only, each of its type; None if not one."""
    if not isinstance(body, dict):
        return None
    out: dict[str, Any] = {}
    for key, kind in SUMMARY_FIELDS.items():
        value = body.get(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            out[key] = value[:100] if isinstance(value, str) else value
        else:
            out[key] = None
    checks = body.get("checks")
    if isinstance(checks, dict):
        out["checks"] = {
            str(k)[:64]: str(v)[:200] for k, v in list(checks.items())[:32] if isinstance(v, str)
        }
    else:
        out["checks"] = {}
    return out

"""The client behind a trusted reverse proxy (``Z4J_TRUSTED_PROXIES``).

Behind nginx (deploy/nginx/z4j.conf) every request comes from the proxy's
address over plain HTTP. Without this, the sign-in throttle counts every
user as one source (one attacker's failures lock everyone out), the audit
names the proxy as everyone's address, and session cookies go out without
``Secure`` although the browser sees https.

A request whose peer is in a trusted network is read through its
``X-Forwarded-For`` from the right: each trusted hop is skipped and the
first address that is not trusted is the client (a client cannot forge the
hops its own proxy appends, only the ones to their left). Its
``X-Forwarded-Proto`` (the last value) says whether the browser used TLS.
A request from anyone else keeps its peer address and scheme, whatever it
claims. Nothing is trusted by default.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ...config import Network

__all__ = ["TrustedProxies", "behind_proxies"]

Scope = dict[str, Any]
App = Callable[[Scope, Any, Any], Awaitable[None]]

# A header a proxy chain builds stays short; a longer one is not read (the
# peer, a trusted proxy, is then the client: safe, if less useful).
_MOST_HOPS = 32


class TrustedProxies:
    """The networks whose ``X-Forwarded-*`` headers are believed."""

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        self.networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    def resolve(self, peer: str, headers: Iterable[tuple[bytes, bytes]]) -> tuple[str, bool | None]:
        """(the client's address, whether it used TLS: None when not said or not believed)."""
        if not self.trusts(peer):
            return peer, None
        hops: list[str] = []
        proto: bytes | None = None
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"x-forwarded-for":
                hops += value.decode("latin-1").split(",")
            elif lowered == b"x-forwarded-proto":
                proto = value.rpartition(b",")[2].strip().lower()
        client = peer
        if len(hops) <= _MOST_HOPS:
            for hop in reversed(hops):
                address = _address(hop)
                if address is None:
                    break  # junk left of a trusted hop: stop at that hop
                client = address
                if not self.trusts(address):
                    break
        tls = {b"https": True, b"http": False}.get(proto) if proto is not None else None
        return client, tls


def _address(hop: str) -> str | None:
    """An X-Forwarded-For entry's address (nginx writes bare ones; brackets and
    ports, as some proxies add them, are taken off); None if not an address."""
    hop = hop.strip()
    if hop.startswith("["):
        hop = hop[1:].partition("]")[0]
    elif hop.count(":") == 1:
        hop = hop.partition(":")[0]
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return None


def behind_proxies(app: App, proxies: TrustedProxies) -> App:
    """``app`` seeing the client and scheme a trusted proxy forwarded (or ``app``
    itself when none is trusted)."""
    if not proxies:
        return app

    async def forwarded(scope: Scope, receive: Any, send: Any) -> None:
        client = scope.get("client")
        if scope.get("type") in ("http", "websocket") and client:
            address, tls = proxies.resolve(str(client[0]), scope.get("headers", ()))
            if address != client[0] or tls is not None:
                scope = dict(scope)
                scope["client"] = (address, client[1] if address == client[0] else 0)
                if tls is not None:
                    secure = scope["type"] == "http"
                    scope["scheme"] = (
                        ("https" if tls else "http") if secure else ("wss" if tls else "ws")
                    )
        await app(scope, receive, send)

    for name in ("max_message_bytes",):  # what serve_http reads off a handler
        if hasattr(app, name):
            setattr(forwarded, name, getattr(app, name))
    return forwarded

"""Z4J_TRUSTED_PROXIES: the client and scheme behind a trusted proxy, and only there.

The rules in z4j/brain/http/proxies.py, without a network; the same through
a real nginx in tests/test_deploy_nginx.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from z4j.brain.http.proxies import TrustedProxies, behind_proxies
from z4j.config import ConfigError, load_config, parse_networks

PROXY = TrustedProxies(parse_networks("10.0.0.0/8, ::1"))


def _headers(forwarded: str | None = None, proto: str | None = None) -> list[tuple[bytes, bytes]]:
    headers = [(b"host", b"z4j.example.com")]
    if forwarded is not None:
        headers.append((b"X-Forwarded-For", forwarded.encode()))
    if proto is not None:
        headers.append((b"x-forwarded-proto", proto.encode()))
    return headers


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        # Not from a proxy: whatever the request claims, it is its peer.
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),
        ("203.0.113.9", None, "203.0.113.9"),
        # From the proxy: the address it appended.
        ("10.1.2.3", "198.51.100.1", "198.51.100.1"),
        # A client's own claim sits left of what its proxy appended: not believed.
        ("10.1.2.3", "192.0.2.66, 198.51.100.1", "198.51.100.1"),
        # Trusted hops (a load balancer before nginx) are skipped.
        ("10.1.2.3", "198.51.100.1, 10.9.9.9", "198.51.100.1"),
        ("::1", "2001:db8::7", "2001:db8::7"),
        ("::ffff:10.1.2.3", "198.51.100.1", "198.51.100.1"),  # IPv4-mapped peer
        # Ports and brackets, as some proxies write them.
        ("10.1.2.3", "198.51.100.1:5123", "198.51.100.1"),
        ("10.1.2.3", "[2001:db8::7]:5123", "2001:db8::7"),
        # Junk stops the walk at the last trusted hop; all-trusted ends at the leftmost.
        ("10.1.2.3", "nonsense, 10.9.9.9", "10.9.9.9"),
        ("10.1.2.3", "10.8.8.8, 10.9.9.9", "10.8.8.8"),
        ("10.1.2.3", None, "10.1.2.3"),
        ("10.1.2.3", "", "10.1.2.3"),
        # A header past 32 hops is not read.
        ("10.1.2.3", ", ".join(["198.51.100.1"] * 33), "10.1.2.3"),
    ],
)
def test_the_client_is_the_first_untrusted_hop_from_the_right(
    peer: str, forwarded: str | None, client: str
) -> None:
    assert PROXY.resolve(peer, _headers(forwarded))[0] == client


def test_the_scheme_is_believed_from_a_trusted_proxy_only() -> None:
    assert PROXY.resolve("10.1.2.3", _headers("198.51.100.1", "https")) == ("198.51.100.1", True)
    assert PROXY.resolve("10.1.2.3", _headers(None, "HTTP")) == ("10.1.2.3", False)
    assert PROXY.resolve("10.1.2.3", _headers(None, "http, https")) == ("10.1.2.3", True)
    assert PROXY.resolve("10.1.2.3", _headers(None, "gopher")) == ("10.1.2.3", None)
    assert PROXY.resolve("203.0.113.9", _headers(None, "https")) == ("203.0.113.9", None)


def test_the_setting_names_a_bad_entry() -> None:
    config = load_config(env={"Z4J_TRUSTED_PROXIES": " 10.0.0.0/8 ,, 127.0.0.1 "})
    assert [str(n) for n in parse_networks(config.trusted_proxies or "")] == [
        "10.0.0.0/8",
        "127.0.0.1/32",
    ]
    with pytest.raises(ConfigError, match=r"Z4J_TRUSTED_PROXIES: 'proxy\.local' is not an IP"):
        load_config(env={"Z4J_TRUSTED_PROXIES": "10.0.0.0/8, proxy.local"})
    assert load_config(env={}).trusted_proxies is None


async def test_the_app_sees_the_forwarded_client_and_scheme() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope)

    app.max_message_bytes = 7  # type: ignore[attr-defined]
    wrapped = behind_proxies(app, PROXY)
    assert wrapped.max_message_bytes == 7  # type: ignore[attr-defined]
    for kind, scheme in (("http", "https"), ("websocket", "wss")):
        plain = "http" if kind == "http" else "ws"
        scope = {"type": kind, "client": ("10.1.2.3", 4000), "scheme": plain}
        scope["headers"] = _headers("198.51.100.1", "https")
        await wrapped(scope, None, None)
        assert seen[-1]["client"] == ("198.51.100.1", 0) and seen[-1]["scheme"] == scheme
        assert scope["client"] == ("10.1.2.3", 4000)  # the server's own scope is not changed
    untouched = {"type": "http", "client": ("203.0.113.9", 1), "headers": _headers("1.2.3.4")}
    await wrapped(untouched, None, None)
    assert seen[-1] is untouched
    assert behind_proxies(app, TrustedProxies()) is app  # nothing trusted: nothing wrapped
    await trio.lowlevel.checkpoint()

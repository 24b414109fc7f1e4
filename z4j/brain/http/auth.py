"""Who may read the dashboard and call the API: admin tokens and sessions.

On a store with no admin token, the brain makes one at start and shows it
once (`ensure_admin_token`); ``z4j admin token`` makes more, ``z4j admin
token list`` and ``revoke`` manage them. A request is signed in by
``Authorization: Bearer <token>`` or by the session cookie that
``POST /api/v1/session`` sets after checking a token. The store keeps
keyed hashes of both (z4j/keys.py), never the values.

A session carries the hash of the token that opened it, and every request
looks both up (one query): revoking a token ends its sessions on their next
request, on every replica. A browser sends the cookie with any request to
our origin, even one another site makes it send, so state-changing
cookie requests also carry a CSRF token (`csrf_token`) that only our own
pages can read; see api.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

import attrs
import trio

from ... import keys
from ..._datadir import private_dir
from ...config import Config
from ...store.base import Store
from ..ratelimit import FailureThrottle, TokenBucket

__all__ = [
    "CSRF_COOKIE",
    "FIRST_ADMIN_TOKEN_FILE",
    "SESSION_COOKIE",
    "SESSION_SECONDS",
    "Auth",
    "Principal",
    "SignInThrottle",
    "announce_admin_token",
    "credentials",
    "sign_in_url",
    "write_first_admin_token",
]

log = logging.getLogger("z4j.auth")

SESSION_COOKIE = "z4j_session"
CSRF_COOKIE = "z4j_csrf"
SESSION_SECONDS = 12 * 3600
# How often a token's last use is written back (a write per request is not cheap).
LAST_USED_EVERY_SECONDS = 60.0
_CSRF_LABEL = b"z4j csrf v1\x00"


@attrs.frozen(kw_only=True)
class Principal:
    """A signed-in caller: which admin token, and the session if by cookie."""

    token_hash: bytes
    session: str | None = None

    @property
    def by_cookie(self) -> bool:
        return self.session is not None


class Auth:
    def __init__(
        self, store: Store, master: bytes, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._master = master
        self._clock = clock
        self._last_used: dict[bytes, float] = {}

    async def ensure_admin_token(self) -> str | None:
        """A new admin token if the store has none yet (first start), else None.

        Of several brains starting on one fresh store, one gets it.
        """
        token = keys.new_api_token()
        if await self._store.add_first_api_token(keys.api_token_hash(self._master, token), "admin"):
            return token
        return None

    async def new_token(self, name: str) -> str:
        token = keys.new_api_token()
        await self._store.add_api_token(keys.api_token_hash(self._master, token), name)
        return token

    async def token_valid(self, token: str) -> bool:
        return await self._token(token) is not None

    async def _token(self, token: str) -> bytes | None:
        token_hash = keys.api_token_hash(self._master, token)
        if not await self._store.api_token_known(token_hash):
            return None
        now = self._clock()
        if (
            now - self._last_used.get(token_hash, -LAST_USED_EVERY_SECONDS)
            >= LAST_USED_EVERY_SECONDS
        ):
            if len(self._last_used) > 1024:
                self._last_used.clear()
            self._last_used[token_hash] = now
            await self._store.api_token_used(token_hash, now=now)
        return token_hash

    async def open_session(self, token: str) -> str | None:
        """A new session id for a valid token, else None."""
        token_hash = await self._token(token)
        if token_hash is None:
            return None
        session = keys.new_api_session()
        await self._store.add_api_session(
            keys.api_session_hash(self._master, session),
            token_hash=token_hash,
            expires_at=self._clock() + SESSION_SECONDS,
        )
        return session

    async def close_session(self, session: str) -> None:
        await self._store.drop_api_session(keys.api_session_hash(self._master, session))

    def csrf_token(self, session: str) -> str:
        """The CSRF token bound to ``session`` (derived, so nothing more is stored)."""
        digest = hmac.new(self._master, _CSRF_LABEL + session.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def csrf_matches(self, session: str, presented: str | None) -> bool:
        if not presented:
            return False
        return hmac.compare_digest(self.csrf_token(session).encode(), presented.encode())

    async def principal(self, headers: Iterable[tuple[bytes, bytes]]) -> Principal | None:
        """Who the request is signed in as: a valid bearer token wins over a
        session cookie; None if neither is valid."""
        token, session = credentials(headers)
        if token is not None:
            token_hash = await self._token(token)
            if token_hash is not None:
                return Principal(token_hash=token_hash)
        if session is not None:
            token_hash = await self._store.api_session_token(
                keys.api_session_hash(self._master, session), now=self._clock()
            )
            if token_hash is not None:
                return Principal(token_hash=token_hash, session=session)
        return None

    async def signed_in(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """True if the request carries a valid bearer token or session cookie."""
        return await self.principal(headers) is not None

    async def still_valid(self, principal: Principal) -> bool:
        """Is this caller still signed in (its token not revoked, its session open)?"""
        if principal.session is None:
            return await self._store.api_token_known(principal.token_hash)
        token_hash = await self._store.api_session_token(
            keys.api_session_hash(self._master, principal.session), now=self._clock()
        )
        return token_hash == principal.token_hash


class SignInThrottle(FailureThrottle):
    """Failed sign-ins per source address, to slow guessing and say who guesses.

    After ``max_failures`` failures within ``window`` seconds a source is
    refused (429) until that window has passed; at most ``max_sources``
    addresses are tracked (see `FailureThrottle`). Failures are logged with
    the address, the first of each window and the lock-out, at most a few
    lines a second.
    """

    def __init__(
        self,
        *,
        max_failures: int = 10,
        window: float = 60.0,
        max_sources: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(max_failures=max_failures, window=window, max_sources=max_sources)
        self._clock = clock
        self._log_budget = TokenBucket(rate=5.0)

    def retry_after(self, source: str) -> int | None:
        """Whole seconds until ``source`` may try again, or None if it may now."""
        left = self.refused_for(source, self._clock())
        return max(1, int(left + 0.999)) if left > 0 else None

    def failed(self, source: str, now: float | None = None) -> int:
        now = self._clock() if now is None else now
        failures = super().failed(source, now)
        if failures in (1, self.max_failures) and self._log_budget.take(1, now):
            if failures == 1:
                log.warning("sign-in with an unknown admin token from %s", source)
            else:
                log.warning(
                    "%d failed sign-ins from %s within %g s: refusing it for the rest of that time",
                    failures,
                    source,
                    self.window,
                )
        return failures

    def succeeded(self, source: str) -> None:
        self.forgive(source)


def credentials(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str | None, str | None]:
    """(bearer token, session cookie) found in request headers."""
    token = session = None
    for name, value in headers:
        name = name.lower()
        if name == b"authorization":
            text = value.decode("latin-1")
            if text[:7].lower() == "bearer ":
                token = text[7:].strip() or None
        elif name == b"cookie":
            for part in value.decode("latin-1").split(";"):
                key, _, val = part.strip().partition("=")
                if key == SESSION_COOKIE and val:
                    session = val
    return token, session


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), as text."""
    for key, value in headers:
        if bytes(key).lower() == name:
            return bytes(value).decode("latin-1")
    return None


def same_origin(origin: str, host: str | None) -> bool:
    """Does the ``Origin`` header name the host the request was sent to (``Host``)?

    The scheme is not compared: behind a TLS proxy the page is https while
    the request reaching us is http. A port left out means the scheme's default.
    """
    if host is None:
        return False
    try:
        parts = urlsplit(origin.strip())
        here = urlsplit("//" + host.strip())
        default = {"http": 80, "https": 443}.get(parts.scheme)
        if default is None or parts.hostname is None or here.hostname is None:
            return False
        return (parts.hostname, parts.port or default) == (here.hostname, here.port or default)
    except ValueError:  # a malformed port
        return False


def sign_in_url(config: Config, http_address: tuple[str, int]) -> str:
    """Where an operator signs in: this brain's bound port, its host as configured."""
    scheme = "http" if config.tls_cert_file is None else "https"
    return f"{scheme}://{_url_host(config.http_bind, http_address)}/login"


def _url_host(bind: str, address: tuple[str, int]) -> str:
    """HOST:PORT for a URL to this brain: the bound port, the host as configured."""
    host = bind.rpartition(":")[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"


async def announce_admin_token(
    auth: Auth, store_ready: trio.Event, config: Config, url: str
) -> None:
    """On a store with no admin token yet, make one and show it, once."""
    await store_ready.wait()
    try:
        token = await auth.ensure_admin_token()
    except Exception as exc:
        log.warning("could not check for an admin token: %s", exc)
        return
    if token is not None:
        # Logs are kept, shipped and shared: they get the file's path, never the token.
        try:
            path = write_first_admin_token(config, token)
        except OSError as exc:
            log.warning(
                "could not save the first admin token (`z4j admin token` makes one): %s", exc
            )
        else:
            log.warning(
                "first start: an admin token was made and written to %s (readable by this "
                "user only; delete it once you have signed in). Sign in at %s",
                path,
                url,
            )
        if sys.stderr.isatty():
            print(f"z4j: the first admin token is {token}", file=sys.stderr, flush=True)


FIRST_ADMIN_TOKEN_FILE = "first-admin-token"


def write_first_admin_token(config: Config, token: str) -> Path:
    """Write the first admin token to a file only this user can read (0600)."""
    private_dir(config.data_dir)
    path = config.data_dir / FIRST_ADMIN_TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older file may have been made with another mode
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    return path

"""Who may read the dashboard and call the API: users, tokens and sessions.

A request is signed in by ``Authorization: Bearer <token>`` or by the
session cookie that ``POST /api/v1/session`` sets. Tokens are personal
(``z4j_pat_``: a user's, with a scope, see accounts_api.py) or legacy admin
tokens (``z4j_admin_``: ``z4j admin token``, role admin, kept working until
revoked). A federation token (``z4j_fed_``: ``z4j federation token create``)
is a peer region's hub: it signs in the federation peer routes alone,
opens no session and is never "signed in" to the dashboard. Sessions are a user's (``u.`` ids: by password, or opened with
a personal token) or a legacy token's. The store keeps keyed hashes of all
of them (z4j/keys.py), never the values.

A session is read with what it hangs on (user, token) in one query:
disabling a user, revoking a token, or a session passing its absolute or
idle limit ends it on its next request, on every replica. A browser sends
the cookie with any request to our origin, even one another site makes it
send, so state-changing cookie requests also carry a CSRF token
(`csrf_token`) that only our own pages can read; see api.py.

On a store with no user, the first start writes a one-time setup link
(`announce_setup`) that creates the first admin.
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
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

import trio

from ... import keys
from ..._datadir import private_dir
from ...config import Config
from ...store.base import Store, User, UserToken
from ..ratelimit import FailureThrottle, TokenBucket
from .principal import Principal

__all__ = [
    "CSRF_COOKIE",
    "SESSION_COOKIE",
    "SESSION_SECONDS",
    "SETUP_LINK_FILE",
    "Auth",
    "Principal",
    "SignInThrottle",
    "announce_setup",
    "credentials",
    "sign_in_url",
    "write_private",
]

log = logging.getLogger("z4j.auth")

SESSION_COOKIE = "z4j_session"
CSRF_COOKIE = "z4j_csrf"
SESSION_SECONDS = 12 * 3600.0
IDLE_SECONDS = 3600.0
# How often a token's last use is written back (a write per request is not cheap).
LAST_USED_EVERY_SECONDS = 60.0
_CSRF_LABEL = b"z4j csrf v1\x00"


class Auth:
    """Signs requests in: bearer tokens (admin or personal) and session cookies.

    ``clock`` is wall time (injectable, so tests move it instead of sleeping);
    ``session_seconds`` bounds a session's life, ``idle_seconds`` the quiet
    time a user's session survives (Z4J_SESSION_MAX_SECONDS and
    Z4J_SESSION_IDLE_SECONDS).
    """

    def __init__(
        self,
        store: Store,
        master: bytes,
        *,
        clock: Callable[[], float] = time.time,
        session_seconds: float = SESSION_SECONDS,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self._store = store
        self._master = master
        self._clock = clock
        self.session_seconds = session_seconds
        self.idle_seconds = idle_seconds
        # A session's last request is written at most this often, so the
        # idle limit holds to within it.
        self._touch_every = min(LAST_USED_EVERY_SECONDS, idle_seconds / 10)
        self._last_used: dict[bytes, float] = {}
        self._token_names: dict[bytes, str] = {}

    @property
    def store(self) -> Store:
        return self._store

    def now(self) -> float:
        return self._clock()

    async def new_token(self, name: str) -> str:
        token = keys.new_api_token()
        await self._store.add_api_token(keys.api_token_hash(self._master, token), name)
        return token

    async def new_user_token(
        self, user: User, name: str, scope: str, expires_at: float | None
    ) -> tuple[str, UserToken]:
        """A personal token for ``user`` (the secret is returned, only now)."""
        secret = keys.new_user_token()
        record = UserToken(
            id=uuid.uuid4(),
            user_id=user.id,
            name=name,
            scope=scope,
            created_at=self._clock(),
            expires_at=expires_at,
            last_used_at=None,
            revoked_at=None,
        )
        await self._store.add_user_token(record, keys.user_token_hash(self._master, secret))
        return secret, record

    async def token_valid(self, token: str) -> bool:
        return await self._bearer(token) is not None

    def setup_code(self) -> str:
        return keys.setup_code(self._master)

    def setup_code_matches(self, presented: object) -> bool:
        return isinstance(presented, str) and hmac.compare_digest(
            self.setup_code().encode(), presented.encode()
        )

    def _due(self, key: bytes, every: float) -> bool:
        """Is a coalesced write (last use, last seen) due for ``key``?"""
        now = self._clock()
        if now - self._last_used.get(key, -every) < every:
            return False
        if len(self._last_used) > 4096:
            self._last_used.clear()
        self._last_used[key] = now
        return True

    async def _bearer(self, token: str) -> Principal | None:
        """The caller a bearer token names, if it is valid."""
        if token.startswith(keys.FEDERATION_TOKEN_PREFIX):
            return await self._federation(token)
        if token.startswith(keys.USER_TOKEN_PREFIX):
            token_hash = keys.user_token_hash(self._master, token)
            found = await self._store.user_token_owner(token_hash, now=self._clock())
            if found is None:
                return None
            record, user = found
            if self._due(token_hash, LAST_USED_EVERY_SECONDS):
                await self._store.user_token_used(token_hash, now=self._clock())
            return _user_principal(user, record, token_hash=token_hash)
        token_hash = keys.api_token_hash(self._master, token)
        if not await self._store.api_token_known(token_hash):
            return None
        if self._due(token_hash, LAST_USED_EVERY_SECONDS):
            await self._store.api_token_used(token_hash, now=self._clock())
        return Principal(
            name=await self._token_name(token_hash), role="admin", token_hash=token_hash
        )

    async def _federation(self, token: str) -> Principal | None:
        """A peer hub's federation token: role federation(_commands), nothing else."""
        token_hash = keys.federation_token_hash(self._master, token)
        record = await self._store.federation_token(token_hash, now=self._clock())
        if record is None:
            return None
        if self._due(token_hash, LAST_USED_EVERY_SECONDS):
            await self._store.federation_token_used(token_hash, now=self._clock())
        return Principal(
            name=record.name,
            role="federation_commands" if record.allow_commands else "federation",
            token_name=record.name,
            token_hash=token_hash,
            token_id=record.id,
            federation=True,
        )

    async def _token_name(self, token_hash: bytes) -> str:
        """An admin token's name (names never change: kept once read)."""
        name = self._token_names.get(token_hash)
        if name is None:
            tokens = await self._store.list_api_tokens()
            if len(self._token_names) > 1024:
                self._token_names.clear()
            self._token_names.update((t.token_hash, t.name) for t in tokens)
            name = self._token_names.get(token_hash, "admin")
        return name

    async def open_session(self, token: str) -> tuple[str, Principal] | None:
        """A new session id for a valid token (admin or personal), and whose it
        is; None for an invalid token."""
        principal = await self._bearer(token)
        if principal is None or principal.federation:
            return None
        now = self._clock()
        if principal.user_id is not None:
            session = keys.new_user_session()
            await self._store.add_user_session(
                keys.api_session_hash(self._master, session),
                user_id=principal.user_id,
                token_id=principal.token_id,
                now=now,
                expires_at=now + self.session_seconds,
            )
            return session, principal
        assert principal.token_hash is not None
        session = keys.new_api_session()
        session_hash = keys.api_session_hash(self._master, session)
        await self._store.add_api_session(
            session_hash, token_hash=principal.token_hash, expires_at=now + self.session_seconds
        )
        await self._store.touch_api_session(session_hash, now=now)  # the idle limit's start
        self._due(session_hash, self._touch_every)
        return session, principal

    async def open_user_session(self, user: User) -> str:
        """A new password session for ``user`` (whose password was checked)."""
        session = keys.new_user_session()
        now = self._clock()
        await self._store.add_user_session(
            keys.api_session_hash(self._master, session),
            user_id=user.id,
            token_id=None,
            now=now,
            expires_at=now + self.session_seconds,
        )
        return session

    async def close_session(self, session: str) -> None:
        session_hash = keys.api_session_hash(self._master, session)
        if session.startswith(keys.USER_SESSION_PREFIX):
            await self._store.drop_user_session(session_hash)
        else:
            await self._store.drop_api_session(session_hash)

    async def close_all_sessions(self, principal: Principal) -> int:
        """Sign out everywhere: every session of the user (or of the admin token)."""
        if principal.user_id is not None:
            return await self._store.drop_user_sessions(principal.user_id)
        assert principal.token_hash is not None
        return await self._store.drop_api_token_sessions(principal.token_hash)

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
            principal = await self._bearer(token)
            if principal is not None:
                return principal
        if session is not None:
            return await self._session(session, touch=True)
        return None

    async def _session(self, session: str, *, touch: bool) -> Principal | None:
        session_hash = keys.api_session_hash(self._master, session)
        now = self._clock()
        if session.startswith(keys.USER_SESSION_PREFIX):
            found = await self._store.user_session(
                session_hash, now=now, idle_seconds=self.idle_seconds
            )
            if found is None:
                return None
            if touch and now - found.last_seen_at >= self._touch_every:
                await self._store.touch_user_session(session_hash, now=now)
            return _user_principal(found.user, found.token, session=session)
        token_hash = await self._store.api_session_token(
            session_hash, now=now, idle_seconds=self.idle_seconds
        )
        if token_hash is None:
            return None
        if touch and self._due(session_hash, self._touch_every):
            await self._store.touch_api_session(session_hash, now=now)
        return Principal(
            name=await self._token_name(token_hash),
            role="admin",
            token_hash=token_hash,
            session=session,
        )

    async def signed_in(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """True if the request carries a valid bearer token or session cookie
        (a federation token's is no sign-in to the dashboard)."""
        principal = await self.principal(headers)
        return principal is not None and not principal.federation

    async def still_valid(self, principal: Principal) -> bool:
        """Is this caller still signed in (its user enabled, its token not
        revoked, its session open)? Does not count as activity."""
        if principal.session is not None:
            return await self._session(principal.session, touch=False) is not None
        if principal.federation:
            assert principal.token_hash is not None
            live = await self._store.federation_token(principal.token_hash, now=self._clock())
            return live is not None
        if principal.user_id is not None:
            assert principal.token_hash is not None
            found = await self._store.user_token_owner(principal.token_hash, now=self._clock())
            return found is not None
        assert principal.token_hash is not None
        return await self._store.api_token_known(principal.token_hash)


def _user_principal(
    user: User,
    token: UserToken | None,
    *,
    token_hash: bytes | None = None,
    session: str | None = None,
) -> Principal:
    return Principal(
        name=user.name,
        role=user.role,
        user_id=user.id,
        projects=None if user.projects is None else frozenset(user.projects),
        scope=None if token is None else token.scope,
        token_name=None if token is None else token.name,
        token_id=None if token is None else token.id,
        token_hash=token_hash,
        session=session,
    )


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
        what: str = "from",
    ) -> None:
        """``what``: how the log names a key ("from" an address, "for" an account)."""
        super().__init__(max_failures=max_failures, window=window, max_sources=max_sources)
        self._clock = clock
        self._what = what
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
                log.warning("failed sign-in %s %s", self._what, source)
            else:
                log.warning(
                    "%d failed sign-ins %s %s within %g s: refusing it for the rest of that time",
                    failures,
                    self._what,
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


async def announce_setup(auth: Auth, store_ready: trio.Event, config: Config, url: str) -> None:
    """On a store with no user yet, write the one-time setup link and say where.

    The link (``/setup#code=...``: a fragment never reaches a server log)
    opens the page that creates the first admin; it is worth nothing once
    any user exists. Logs are kept, shipped and shared: they get the file's
    path, never the link.
    """
    await store_ready.wait()
    try:
        if await auth.store.count_users():
            return
    except Exception as exc:
        log.warning("could not check for users: %s", exc)
        return
    link = f"{url.removesuffix('/login')}/setup#code={auth.setup_code()}"
    try:
        path = write_private(config, SETUP_LINK_FILE, link)
    except OSError as exc:
        log.warning("could not save the setup link (`z4j user create` makes a user): %s", exc)
    else:
        log.warning(
            "first start: no user yet. Open the one-time setup link written to %s (readable "
            "by this user only) to create the first admin; `z4j user create --role admin` "
            "works too",
            path,
        )
    if sys.stderr.isatty():
        print(f"z4j: create the first admin at {link}", file=sys.stderr, flush=True)


SETUP_LINK_FILE = "first-admin-setup-link"


def write_private(config: Config, name: str, text: str) -> Path:
    """Write ``text`` to a file of the data directory only this user can read (0600)."""
    private_dir(config.data_dir)
    path = config.data_dir / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older file may have been made with another mode
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)
    return path

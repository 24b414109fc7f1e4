"""Who may read the dashboard and call the API: admin tokens and sessions.

On a store with no admin token, the brain makes one at start and prints it
once (`ensure_admin_token`); ``z4j admin token`` makes more. A request is
signed in by ``Authorization: Bearer <token>`` or by the session cookie
that ``POST /api/v1/session`` sets after checking a token. The store keeps
keyed hashes of both (z4j/keys.py), never the values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from . import keys
from .store.base import Store

__all__ = ["SESSION_COOKIE", "SESSION_SECONDS", "Auth"]

SESSION_COOKIE = "z4j_session"
SESSION_SECONDS = 12 * 3600


class Auth:
    def __init__(
        self, store: Store, master: bytes, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._master = master
        self._clock = clock

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
        return await self._store.api_token_known(keys.api_token_hash(self._master, token))

    async def open_session(self, token: str) -> str | None:
        """A new session id for a valid token, else None."""
        if not await self.token_valid(token):
            return None
        session = keys.new_api_session()
        await self._store.add_api_session(
            keys.api_session_hash(self._master, session),
            expires_at=self._clock() + SESSION_SECONDS,
        )
        return session

    async def close_session(self, session: str) -> None:
        await self._store.drop_api_session(keys.api_session_hash(self._master, session))

    async def signed_in(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """True if the request carries a valid bearer token or session cookie."""
        token, session = credentials(headers)
        if token is not None and await self.token_valid(token):
            return True
        if session is not None:
            return await self._store.api_session_valid(
                keys.api_session_hash(self._master, session), now=self._clock()
            )
        return False


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

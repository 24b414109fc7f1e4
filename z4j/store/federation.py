"""Federation tokens in the store: what peer regions' hubs sign in with.

Shared by both stores over their `Dialect`, as accounts.py is; each
function runs inside the caller's transaction. Only a keyed hash of a
token is kept (z4j/keys.py). `live_token` is the one query a federation
request is signed in by: a revoked or expired token fails there, on the
next request, on every replica.
"""

from __future__ import annotations

import uuid
from typing import Any, Final

from ._rows import Conn, Dialect
from .base import FederationToken

__all__ = ["add_token", "list_tokens", "live_token", "revoke_token", "token_used"]

COLUMNS: Final = (
    "id, name, allow_commands, created_at, expires_at, last_used_at, revoked_at, token_hash"
)


def _token(d: Dialect, row: Any) -> FederationToken:
    id, name, allow_commands, created_at, expires_at, last_used_at, revoked_at, token_hash = row
    return FederationToken(
        id=d.uuid_out(id),
        name=name,
        allow_commands=bool(allow_commands),
        created_at=d.ts_out(created_at),
        expires_at=d.opt_ts_out(expires_at),
        last_used_at=d.opt_ts_out(last_used_at),
        revoked_at=d.opt_ts_out(revoked_at),
        token_hash=bytes(token_hash),
    )


def add_token(d: Dialect, conn: Conn, token: FederationToken) -> None:
    conn.execute(
        d.sql(
            "INSERT INTO federation_tokens (id, token_hash, name, allow_commands, created_at,"
            " expires_at) VALUES (?, ?, ?, ?, ?, ?)"
        ),
        (
            d.uuid_in(token.id),
            token.token_hash,
            token.name,
            token.allow_commands,
            d.ts_in(token.created_at),
            d.opt_ts_in(token.expires_at),
        ),
    )


def live_token(d: Dialect, conn: Conn, token_hash: bytes, now: float) -> FederationToken | None:
    """The token of that hash if it is neither revoked nor expired, else None."""
    row = conn.execute(
        d.sql(
            f"SELECT {COLUMNS} FROM federation_tokens WHERE token_hash = ?"
            " AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)"
        ),
        (token_hash, d.ts_in(now)),
    ).fetchone()
    return None if row is None else _token(d, row)


def token_used(d: Dialect, conn: Conn, token_hash: bytes, now: float) -> None:
    conn.execute(
        d.sql("UPDATE federation_tokens SET last_used_at = ? WHERE token_hash = ?"),
        (d.ts_in(now), token_hash),
    )


def list_tokens(d: Dialect, conn: Conn) -> list[FederationToken]:
    """Every federation token (revoked ones too), oldest first."""
    rows = conn.execute(
        f"SELECT {COLUMNS} FROM federation_tokens ORDER BY created_at, id"
    ).fetchall()
    return [_token(d, row) for row in rows]


def revoke_token(d: Dialect, conn: Conn, token_id: uuid.UUID, now: float) -> FederationToken | None:
    """Revoke a live token; the token as it was, or None if there was no such live token."""
    row = conn.execute(
        d.sql(
            f"SELECT {COLUMNS} FROM federation_tokens WHERE id = ? AND revoked_at IS NULL{d.lock}"
        ),
        (d.uuid_in(token_id),),
    ).fetchone()
    if row is None:
        return None
    conn.execute(
        d.sql("UPDATE federation_tokens SET revoked_at = ? WHERE id = ?"),
        (d.ts_in(now), d.uuid_in(token_id)),
    )
    return _token(d, row)

"""Accounts in the store: users, their personal API tokens and their sessions.

Shared by both stores over their `Dialect`, as tasks.py and opamp.py are;
each function runs inside the caller's transaction. Only keyed hashes of
tokens and sessions are kept (z4j/keys.py), and only an argon2id hash of a
password (z4j/brain/http/passwords.py).

What signs a request in is checked in one query each (`token_owner`,
`session_of`): a disabled user, a revoked or expired token, an expired
session all fail there, so a change takes effect on the next request, on
every replica.
"""

from __future__ import annotations

import uuid
from typing import Any, Final

from ._rows import Conn, Dialect
from .base import DirectoryConflict, User, UserSession, UserToken

__all__ = [
    "USER_COLUMNS",
    "USER_TOKEN_COLUMNS",
    "add_session",
    "add_token",
    "create_user",
    "drop_session",
    "drop_sessions",
    "find_user",
    "list_tokens",
    "list_users",
    "password_of",
    "revoke_token",
    "session_of",
    "token_owner",
    "token_used",
    "touch_session",
    "update_user",
    "user_count",
]

USER_COLUMNS: Final = "u.id, u.name, u.role, u.projects, u.disabled, u.created_at, u.updated_at"
USER_TOKEN_COLUMNS: Final = (
    "t.id, t.user_id, t.name, t.scope, t.created_at, t.expires_at, t.last_used_at, t.revoked_at"
)


def _user(d: Dialect, row: Any) -> User:
    id, name, role, projects, disabled, created_at, updated_at = row
    ids = None if projects is None else tuple(uuid.UUID(p) for p in d.json_out(projects))
    return User(
        id=d.uuid_out(id),
        name=name,
        role=role,
        projects=ids,
        disabled=bool(disabled),
        created_at=d.ts_out(created_at),
        updated_at=d.ts_out(updated_at),
    )


def _token(d: Dialect, row: Any) -> UserToken:
    id, user_id, name, scope, created_at, expires_at, last_used_at, revoked_at = row
    return UserToken(
        id=d.uuid_out(id),
        user_id=d.uuid_out(user_id),
        name=name,
        scope=scope,
        created_at=d.ts_out(created_at),
        expires_at=d.opt_ts_out(expires_at),
        last_used_at=d.opt_ts_out(last_used_at),
        revoked_at=d.opt_ts_out(revoked_at),
    )


def _projects_in(d: Dialect, projects: tuple[uuid.UUID, ...] | None) -> Any:
    return None if projects is None else d.json_in([str(p) for p in projects])


# -- users ---------------------------------------------------------------------------


def user_count(d: Dialect, conn: Conn) -> int:
    return int(conn.execute("SELECT count(*) FROM users").fetchone()[0])


def create_user(
    d: Dialect, conn: Conn, user: User, password_hash: str, *, only_if_first: bool = False
) -> bool:
    """Insert ``user``; False if ``only_if_first`` and a user exists already.
    A taken name raises `DirectoryConflict`."""
    if only_if_first and user_count(d, conn):
        return False
    if conn.execute(d.sql("SELECT 1 FROM users WHERE name = ?"), (user.name,)).fetchone():
        raise DirectoryConflict(f"a user named {user.name!r} exists already")
    conn.execute(
        d.sql(
            "INSERT INTO users (id, name, password_hash, role, projects, disabled,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        ),
        (
            d.uuid_in(user.id),
            user.name,
            password_hash,
            user.role,
            _projects_in(d, user.projects),
            user.disabled,
            d.ts_in(user.created_at),
            d.ts_in(user.updated_at),
        ),
    )
    return True


def list_users(d: Dialect, conn: Conn) -> list[User]:
    rows = conn.execute(f"SELECT {USER_COLUMNS} FROM users u ORDER BY u.name").fetchall()
    return [_user(d, row) for row in rows]


def find_user(d: Dialect, conn: Conn, ref: str) -> User | None:
    """A user by id or by name."""
    try:
        row = conn.execute(
            d.sql(f"SELECT {USER_COLUMNS} FROM users u WHERE u.id = ?"),
            (d.uuid_in(uuid.UUID(ref)),),
        ).fetchone()
    except ValueError:
        row = conn.execute(
            d.sql(f"SELECT {USER_COLUMNS} FROM users u WHERE u.name = ?"), (ref,)
        ).fetchone()
    return None if row is None else _user(d, row)


def password_of(d: Dialect, conn: Conn, name: str) -> tuple[User, str] | None:
    """The user named ``name`` and their password hash (for sign-in)."""
    row = conn.execute(
        d.sql(f"SELECT {USER_COLUMNS}, u.password_hash FROM users u WHERE u.name = ?"), (name,)
    ).fetchone()
    return None if row is None else (_user(d, row[:7]), str(row[7]))


def update_user(
    d: Dialect,
    conn: Conn,
    user_id: uuid.UUID,
    now: float,
    *,
    disabled: bool | None = None,
    password_hash: str | None = None,
    role: str | None = None,
    projects: tuple[uuid.UUID, ...] | bool | None = False,
) -> User | None:
    """Change what is given (``projects`` False: unchanged); the user after, or None.

    Disabling a user or setting their password ends all their sessions.
    """
    sets, params = ["updated_at = ?"], [d.ts_in(now)]
    if disabled is not None:
        sets.append("disabled = ?")
        params.append(disabled)
    if password_hash is not None:
        sets.append("password_hash = ?")
        params.append(password_hash)
    if role is not None:
        sets.append("role = ?")
        params.append(role)
    if projects is not False:
        sets.append("projects = ?")
        params.append(_projects_in(d, projects if isinstance(projects, tuple) else None))
    key = d.uuid_in(user_id)
    cur = conn.execute(d.sql(f"UPDATE users SET {', '.join(sets)} WHERE id = ?"), (*params, key))
    if cur.rowcount != 1:
        return None
    if disabled or password_hash is not None:
        drop_sessions(d, conn, user_id)
    row = conn.execute(
        d.sql(f"SELECT {USER_COLUMNS} FROM users u WHERE u.id = ?"), (key,)
    ).fetchone()
    return _user(d, row)


# -- personal tokens -------------------------------------------------------------------


def add_token(d: Dialect, conn: Conn, token: UserToken, token_hash: bytes) -> None:
    conn.execute(
        d.sql(
            "INSERT INTO user_tokens (id, token_hash, user_id, name, scope, created_at,"
            " expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
        ),
        (
            d.uuid_in(token.id),
            token_hash,
            d.uuid_in(token.user_id),
            token.name,
            token.scope,
            d.ts_in(token.created_at),
            d.opt_ts_in(token.expires_at),
        ),
    )


def token_owner(
    d: Dialect, conn: Conn, token_hash: bytes, now: float
) -> tuple[UserToken, User] | None:
    """The live token of that hash and its enabled owner, else None."""
    row = conn.execute(
        d.sql(
            f"SELECT {USER_TOKEN_COLUMNS}, {USER_COLUMNS} FROM user_tokens t"
            " JOIN users u ON u.id = t.user_id"
            " WHERE t.token_hash = ? AND t.revoked_at IS NULL AND NOT u.disabled"
            " AND (t.expires_at IS NULL OR t.expires_at > ?)"
        ),
        (token_hash, d.ts_in(now)),
    ).fetchone()
    return None if row is None else (_token(d, row[:8]), _user(d, row[8:]))


def token_used(d: Dialect, conn: Conn, token_hash: bytes, now: float) -> None:
    conn.execute(
        d.sql("UPDATE user_tokens SET last_used_at = ? WHERE token_hash = ?"),
        (d.ts_in(now), token_hash),
    )


def list_tokens(d: Dialect, conn: Conn, user_id: uuid.UUID | None) -> list[UserToken]:
    """Personal tokens (revoked ones too), of one user or of all, oldest first."""
    if user_id is None:
        rows = conn.execute(
            f"SELECT {USER_TOKEN_COLUMNS} FROM user_tokens t ORDER BY t.created_at, t.id"
        ).fetchall()
    else:
        rows = conn.execute(
            d.sql(
                f"SELECT {USER_TOKEN_COLUMNS} FROM user_tokens t WHERE t.user_id = ?"
                " ORDER BY t.created_at, t.id"
            ),
            (d.uuid_in(user_id),),
        ).fetchall()
    return [_token(d, row) for row in rows]


def revoke_token(
    d: Dialect, conn: Conn, token_id: uuid.UUID, user_id: uuid.UUID | None, now: float
) -> UserToken | None:
    """Revoke a live token (only ``user_id``'s, if given) and end its sessions;
    the token as it was, or None if there was no such live token."""
    terms = "id = ? AND revoked_at IS NULL"
    params: list[Any] = [d.uuid_in(token_id)]
    if user_id is not None:
        terms += " AND user_id = ?"
        params.append(d.uuid_in(user_id))
    row = conn.execute(
        d.sql(f"SELECT {USER_TOKEN_COLUMNS} FROM user_tokens t WHERE {terms}{d.lock}"), params
    ).fetchone()
    if row is None:
        return None
    conn.execute(
        d.sql("UPDATE user_tokens SET revoked_at = ? WHERE id = ?"),
        (d.ts_in(now), d.uuid_in(token_id)),
    )
    conn.execute(d.sql("DELETE FROM user_sessions WHERE token_id = ?"), (d.uuid_in(token_id),))
    return _token(d, row)


# -- sessions --------------------------------------------------------------------------


def add_session(
    d: Dialect,
    conn: Conn,
    session_hash: bytes,
    *,
    user_id: uuid.UUID,
    token_id: uuid.UUID | None,
    now: float,
    expires_at: float,
) -> None:
    conn.execute(
        d.sql(
            "INSERT INTO user_sessions (session_hash, user_id, token_id, created_at,"
            " expires_at, last_seen_at) VALUES (?, ?, ?, ?, ?, ?)"
        ),
        (
            session_hash,
            d.uuid_in(user_id),
            None if token_id is None else d.uuid_in(token_id),
            d.ts_in(now),
            d.ts_in(expires_at),
            d.ts_in(now),
        ),
    )


def session_of(
    d: Dialect, conn: Conn, session_hash: bytes, now: float, idle_seconds: float
) -> UserSession | None:
    """The live session of that hash: not past its expiry nor idle longer than
    ``idle_seconds``, its user enabled, its token (if any) live. A session
    that fails any of these is deleted."""
    row = conn.execute(
        d.sql(
            f"SELECT s.expires_at, s.last_seen_at, s.token_id, {USER_COLUMNS},"
            f" {USER_TOKEN_COLUMNS} FROM user_sessions s"
            " JOIN users u ON u.id = s.user_id"
            " LEFT JOIN user_tokens t ON t.id = s.token_id"
            " WHERE s.session_hash = ?"
        ),
        (session_hash,),
    ).fetchone()
    if row is None:
        return None
    expires_at, last_seen_at = d.ts_out(row[0]), d.ts_out(row[1])
    user = _user(d, row[3:10])
    token = None if row[2] is None else _token(d, row[10:18])
    live = (
        expires_at > now
        and now - last_seen_at <= idle_seconds
        and not user.disabled
        and (
            row[2] is None
            or (
                token is not None
                and token.revoked_at is None
                and (token.expires_at is None or token.expires_at > now)
            )
        )
    )
    if not live:
        drop_session(d, conn, session_hash)
        return None
    return UserSession(user=user, token=token, expires_at=expires_at, last_seen_at=last_seen_at)


def touch_session(d: Dialect, conn: Conn, session_hash: bytes, now: float) -> None:
    conn.execute(
        d.sql("UPDATE user_sessions SET last_seen_at = ? WHERE session_hash = ?"),
        (d.ts_in(now), session_hash),
    )


def drop_session(d: Dialect, conn: Conn, session_hash: bytes) -> None:
    conn.execute(d.sql("DELETE FROM user_sessions WHERE session_hash = ?"), (session_hash,))


def drop_sessions(d: Dialect, conn: Conn, user_id: uuid.UUID) -> int:
    """End every session of the user ("sign out everywhere"); how many."""
    cur = conn.execute(d.sql("DELETE FROM user_sessions WHERE user_id = ?"), (d.uuid_in(user_id),))
    return int(cur.rowcount)

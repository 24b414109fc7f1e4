"""Accounts in the API: sign-in and sessions, first-run setup, users, personal tokens.

Sign-in (``POST /session``) takes a user's name and password, or a token
(a legacy admin token or a personal one); failures are throttled per
source address and, for passwords, per account, and every attempt is
audited with its source and outcome. ``POST /setup`` creates the first
admin with the one-time setup code the brain wrote at its first start
(`announce_setup`, auth.py); it works only while the store has no user.

Personal tokens are the caller's own (action ``self``); an admin may list
and revoke anyone's, legacy admin tokens included (``?all=true``). A new
token's scope cannot exceed its owner's role, and the secret is in the
creation answer only.
"""

from __future__ import annotations

import uuid
from typing import Any, Final

from ...store.base import ROLES, TOKEN_SCOPES, ApiToken, DirectoryConflict, Store, User, UserToken
from ._request import ApiError, Handler, Request, Response, check_text, epoch, page, uuid_param
from .auth import Auth, SignInThrottle, credentials
from .limits import ACCOUNT_NAME_CHARS
from .passwords import check_new_password, hash_password, verify_password
from .policy import ROLES as ROLE_ACTIONS
from .policy import SCOPES, allowed
from .principal import Principal
from .resources import iso

__all__ = ["AccountRoutes", "AccountThrottle", "user_json"]

MAX_NAME: Final = ACCOUNT_NAME_CHARS
MAX_TOKENS_PER_USER: Final = 100  # bounds GET /tokens and a runaway script
MAX_TOKEN_SECONDS: Final = 5 * 366 * 86400.0


class AccountThrottle(SignInThrottle):
    """Failed password sign-ins per account name: guessing one account's
    password from many addresses is slowed too. Higher bar and longer window
    than per address, so a stranger cannot easily lock a user out."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_failures", 20)
        kwargs.setdefault("window", 300.0)
        kwargs.setdefault("what", "for account")
        super().__init__(**kwargs)


def user_json(user: User, project_names: dict[uuid.UUID, str] | None = None) -> dict[str, Any]:
    names = project_names or {}
    return {
        "id": str(user.id),
        "name": user.name,
        "role": user.role,
        "projects": None
        if user.projects is None
        else [{"id": str(p), "name": names.get(p)} for p in user.projects],
        "disabled": user.disabled,
        "created_at": iso(user.created_at),
        "updated_at": iso(user.updated_at),
    }


def _token_json(token: UserToken, owner: str | None) -> dict[str, Any]:
    return {
        "id": str(token.id),
        "kind": "personal",
        "user_id": str(token.user_id),
        "user": owner,
        "name": token.name,
        "scope": token.scope,
        "created_at": iso(token.created_at),
        "expires_at": None if token.expires_at is None else iso(token.expires_at),
        "last_used_at": None if token.last_used_at is None else iso(token.last_used_at),
        "revoked_at": None if token.revoked_at is None else iso(token.revoked_at),
    }


def _legacy_json(token: ApiToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "kind": "legacy",
        "user_id": None,
        "user": None,
        "name": token.name,
        "scope": "admin",
        "created_at": iso(token.created_at),
        "expires_at": None,
        "last_used_at": None if token.last_used_at is None else iso(token.last_used_at),
        "revoked_at": None,
    }


def _name(value: object, what: str = "name") -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise ApiError(400, "bad_request", f"{what}: a string of 1 to {MAX_NAME} characters")
    check_text(value)
    if value != value.strip() or not value.isprintable():
        raise ApiError(400, "bad_request", f"{what}: printable, without surrounding spaces")
    return value


def _password(value: object) -> str:
    problem = check_new_password(value)
    if problem is not None:
        raise ApiError(400, "bad_request", problem)
    assert isinstance(value, str)
    check_text(value)
    return value


class AccountRoutes:
    def __init__(
        self,
        store: Store,
        auth: Auth,
        *,
        throttle: SignInThrottle,
        account_throttle: SignInThrottle | None = None,
    ) -> None:
        self._store = store
        self._auth = auth
        self._throttle = throttle
        self._accounts = account_throttle if account_throttle is not None else AccountThrottle()

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", "/session", self.sign_in),
            ("GET", "/session", self._whoami),
            ("DELETE", "/session", self.sign_out),
            ("DELETE", "/sessions", self._sign_out_everywhere),
            ("GET", "/setup", self._setup_state),
            ("POST", "/setup", self.setup),
            ("GET", "/users", self._users),
            ("POST", "/users", self._create_user),
            ("POST", "/users/{id}/disable", self._disable),
            ("POST", "/users/{id}/enable", self._enable),
            ("POST", "/users/{id}/password", self._reset_password),
            ("GET", "/tokens", self._tokens),
            ("POST", "/tokens", self._create_token),
            ("DELETE", "/tokens/{id}", self._revoke_token),
        ]

    async def _audit(
        self,
        request: Request,
        action: str,
        subject: str,
        *,
        actor: str | None = None,
        outcome: str = "ok",
        **details: Any,
    ) -> None:
        await self._store.audit(
            action,
            subject,
            {"source": request.source, "outcome": outcome, **details},
            actor=actor if actor is not None else request.actor,
        )

    def _check_throttle(self, source: str, account: str | None) -> None:
        waits = [self._throttle.retry_after(source)]
        if account is not None:
            waits.append(self._accounts.retry_after(account))
        wait = max((w for w in waits if w is not None), default=None)
        if wait is not None:
            raise ApiError(
                429,
                "too_many_attempts",
                f"too many failed sign-ins: wait {wait} s",
                headers=((b"retry-after", str(wait).encode()),),
            )

    def _session_answer(self, session: str) -> dict[str, Any]:
        # "session" goes into the cookie (HttpOnly), not the body (api.py moves it).
        return {
            "session": session,
            "csrf_token": self._auth.csrf_token(session),
            "expires_in": int(self._auth.session_seconds),
        }

    # -- sign-in -----------------------------------------------------------------------

    async def sign_in(self, request: Request) -> Response:
        body = request.json_object()
        source = request.source
        token = body.get("token")
        if token is not None:
            self._check_throttle(source, None)
            if not isinstance(token, str) or not token or len(token) > 1024:
                raise ApiError(400, "bad_request", 'give a token as {"token": ...}')
            opened = await self._auth.open_session(token)
            if opened is None:
                self._throttle.failed(source)
                await self._audit(
                    request, "session.sign_in", "token", outcome="refused", by="token"
                )
                raise ApiError(401, "unauthorized", "unknown token")
            self._throttle.succeeded(source)
            session, who = opened
            await self._audit(request, "session.sign_in", who.actor, actor=who.actor, by="token")
            return 200, self._session_answer(session)
        name, password = body.get("name"), body.get("password")
        if not isinstance(name, str) or not isinstance(password, str) or not name:
            raise ApiError(
                400, "bad_request", 'give {"name": ..., "password": ...} or {"token": ...}'
            )
        check_text(name)
        name = name[:MAX_NAME]
        self._check_throttle(source, name)
        found = await self._store.user_password(name)
        user, stored = found if found is not None else (None, None)
        ok = await verify_password(stored, password)
        if not ok or user is None or user.disabled:
            self._throttle.failed(source)
            self._accounts.failed(name)
            why = "disabled" if ok and user is not None else "bad_credentials"
            await self._audit(
                request,
                "session.sign_in",
                f"user:{name}",
                outcome="refused",
                by="password",
                reason=why,
            )
            raise ApiError(401, "unauthorized", "unknown name or wrong password")
        self._throttle.succeeded(source)
        self._accounts.forgive(name)
        session = await self._auth.open_user_session(user)
        await self._audit(
            request, "session.sign_in", f"user:{name}", actor=user.name, by="password"
        )
        return 200, self._session_answer(session)

    async def sign_out(self, request: Request) -> Response:
        _, session = credentials(request.headers)
        if session is not None:
            await self._auth.close_session(session)
        return 204, None

    async def _whoami(self, request: Request) -> Response:
        p = _principal(request)
        return 200, {
            "name": p.name,
            "actor": p.actor,
            "kind": "legacy_token" if p.legacy else ("token" if p.scope else "user"),
            "user_id": None if p.user_id is None else str(p.user_id),
            "role": p.role,
            "scope": p.scope,
            "projects": None if p.projects is None else sorted(str(x) for x in p.projects),
            "by_cookie": p.by_cookie,
        }

    async def _sign_out_everywhere(self, request: Request) -> Response:
        p = _principal(request)
        ended = await self._auth.close_all_sessions(p)
        subject = f"user:{p.name}" if p.user_id is not None else f"api-token:{p.name}"
        await self._audit(request, "session.sign_out_everywhere", subject, sessions=ended)
        return 200, {"sessions_ended": ended}

    # -- first-run setup ---------------------------------------------------------------

    async def _setup_state(self, request: Request) -> Response:
        return 200, {"needed": await self._store.count_users() == 0}

    async def setup(self, request: Request) -> Response:
        source = request.source
        self._check_throttle(source, None)
        body = request.json_object()
        if not self._auth.setup_code_matches(body.get("code")):
            self._throttle.failed(source)
            await self._audit(request, "setup", "first-admin", outcome="refused")
            raise ApiError(401, "unauthorized", "wrong setup code: use the link the brain wrote")
        name, password = _name(body.get("name")), _password(body.get("password"))
        now = self._auth.now()
        user = User(
            id=uuid.uuid4(),
            name=name,
            role="admin",
            projects=None,
            disabled=False,
            created_at=now,
            updated_at=now,
        )
        if not await self._store.create_user(
            user, await hash_password(password), only_if_first=True
        ):
            raise ApiError(409, "setup_done", "this brain has users already: sign in")
        self._throttle.succeeded(source)
        await self._audit(
            request, "user.created", f"user:{name}", actor=name, role="admin", setup=True
        )
        return 201, {
            **self._session_answer(await self._auth.open_user_session(user)),
            "user": user_json(user),
        }

    # -- users (admin) -------------------------------------------------------------------

    async def _project_names(self) -> dict[uuid.UUID, str]:
        return {p.id: p.name for p in await self._store.list_projects()}

    async def _users(self, request: Request) -> Response:
        names = await self._project_names()
        return 200, page([user_json(u, names) for u in await self._store.list_users()], None)

    async def _projects_param(self, value: object) -> tuple[uuid.UUID, ...] | None:
        if value is None:
            return None
        if not isinstance(value, list) or len(value) > 1000:
            raise ApiError(400, "bad_request", "projects: null (all) or a list of names or ids")
        ids = []
        for ref in value:
            if not isinstance(ref, str):
                raise ApiError(400, "bad_request", "projects: names or ids (strings)")
            check_text(ref)
            project = await self._store.find_project(ref)
            if project is None:
                raise ApiError(404, "not_found", f"no project {ref!r}")
            ids.append(project.id)
        return tuple(dict.fromkeys(ids))

    async def _create_user(self, request: Request) -> Response:
        body = request.json_object()
        name = _name(body.get("name"))
        role = body.get("role", "viewer")
        if role not in ROLES:
            raise ApiError(400, "bad_request", f"role: one of {', '.join(ROLES)}")
        password = _password(body.get("password"))
        projects = await self._projects_param(body.get("projects"))
        now = self._auth.now()
        user = User(
            id=uuid.uuid4(),
            name=name,
            role=role,
            projects=projects,
            disabled=False,
            created_at=now,
            updated_at=now,
        )
        try:
            await self._store.create_user(user, await hash_password(password))
        except DirectoryConflict as exc:
            raise ApiError(409, "name_taken", str(exc)) from None
        await self._audit(
            request,
            "user.created",
            f"user:{name}",
            role=role,
            projects=None if projects is None else [str(p) for p in projects],
        )
        return 201, user_json(user, await self._project_names())

    async def _user_of(self, request: Request) -> User:
        user_id = uuid_param(request.params["id"], "id")
        user = await self._store.find_user(str(user_id))
        if user is None:
            raise ApiError(404, "not_found", f"no user {user_id}")
        return user

    async def _set_disabled(self, request: Request, disabled: bool) -> Response:
        user = await self._user_of(request)
        if disabled and user.id == _principal(request).user_id:
            raise ApiError(409, "self", "you cannot disable yourself")
        changed = await self._store.update_user(user.id, disabled=disabled)
        if changed is None:
            raise ApiError(404, "not_found", f"no user {user.id}")
        verb = "disabled" if disabled else "enabled"
        await self._audit(request, f"user.{verb}", f"user:{user.name}")
        return 200, user_json(changed, await self._project_names())

    async def _disable(self, request: Request) -> Response:
        return await self._set_disabled(request, True)

    async def _enable(self, request: Request) -> Response:
        return await self._set_disabled(request, False)

    async def _reset_password(self, request: Request) -> Response:
        user = await self._user_of(request)
        password = _password(request.json_object().get("password"))
        changed = await self._store.update_user(
            user.id, password_hash=await hash_password(password)
        )
        if changed is None:
            raise ApiError(404, "not_found", f"no user {user.id}")
        await self._audit(request, "user.password_reset", f"user:{user.name}")
        return 200, user_json(changed, await self._project_names())

    # -- personal tokens ---------------------------------------------------------------

    async def _tokens(self, request: Request) -> Response:
        p = _principal(request)
        everyone = request.query.get("all") in ("1", "true")
        if everyone and not allowed("admin", p.role, p.scope):
            raise ApiError(403, "forbidden", "only an admin lists everyone's tokens")
        if everyone and p.projects is not None:
            raise ApiError(
                403, "narrowed", "an admin narrowed to projects lists only their own tokens"
            )
        names = {u.id: u.name for u in await self._store.list_users()}
        if everyone:
            items = [_legacy_json(t) for t in await self._store.list_api_tokens()]
            items += [
                _token_json(t, names.get(t.user_id)) for t in await self._store.list_user_tokens()
            ]
        elif p.user_id is None:
            raise ApiError(
                409, "legacy_token", "a legacy admin token owns no tokens: use ?all=true"
            )
        else:
            items = [_token_json(t, p.name) for t in await self._store.list_user_tokens(p.user_id)]
        return 200, page(items, None)

    async def _create_token(self, request: Request) -> Response:
        p = _principal(request)
        if p.user_id is None:
            raise ApiError(
                409, "legacy_token", "a legacy admin token cannot own tokens: sign in as a user"
            )
        if p.scope is not None:
            raise ApiError(403, "forbidden", "tokens are made by a signed-in user, not by a token")
        body = request.json_object()
        name = _name(body.get("name"))
        scope = body.get("scope", "read")
        if scope not in TOKEN_SCOPES:
            raise ApiError(400, "bad_request", f"scope: one of {', '.join(TOKEN_SCOPES)}")
        if not SCOPES[scope] <= _role_actions(p.role):
            raise ApiError(403, "forbidden", f"a {p.role} cannot make a token of scope {scope}")
        expires_at = None
        if body.get("expires_in_days") is not None:
            days = body["expires_in_days"]
            if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 1830:
                raise ApiError(400, "bad_request", "expires_in_days: an integer from 1 to 1830")
            expires_at = epoch(self._auth.now() + days * 86400.0, "expires_in_days")
        owner = await self._store.find_user(str(p.user_id))
        if owner is None or owner.disabled:
            raise ApiError(404, "not_found", "no such user")
        live = [t for t in await self._store.list_user_tokens(owner.id) if t.revoked_at is None]
        if len(live) >= MAX_TOKENS_PER_USER:
            raise ApiError(409, "too_many_tokens", f"at most {MAX_TOKENS_PER_USER} live tokens")
        secret, record = await self._auth.new_user_token(owner, name, scope, expires_at)
        await self._audit(
            request, "token.created", f"user-token:{record.id}", name=name, scope=scope
        )
        # The secret is in this answer only: the store keeps its keyed hash.
        return 201, {**_token_json(record, owner.name), "token": secret}

    async def _revoke_token(self, request: Request) -> Response:
        p = _principal(request)
        ref = request.params["id"]
        # Others' tokens are brain-wide: not an admin's who is narrowed to projects.
        is_admin = allowed("admin", p.role, p.scope) and p.projects is None
        try:
            token_id = uuid.UUID(ref)
        except ValueError:
            token_id = None
        if token_id is None:
            # A legacy admin token, by the id `GET /tokens?all=true` shows.
            if not is_admin:
                raise ApiError(403, "forbidden", "only an admin revokes legacy admin tokens")
            matches = [t for t in await self._store.list_api_tokens() if t.id == ref.lower()]
            if not matches:
                raise ApiError(404, "not_found", f"no token {ref!r}")
            [legacy] = matches
            await self._store.revoke_api_token(legacy.token_hash)
            await self._audit(
                request, "admin.token.revoked", f"api-token:{legacy.name}", id=legacy.id
            )
            return 200, {**_legacy_json(legacy), "revoked_at": iso(self._auth.now())}
        owner = None if is_admin else p.user_id
        if owner is None and not is_admin:
            raise ApiError(404, "not_found", f"no token {ref!r}")
        revoked = await self._store.revoke_user_token(token_id, user_id=owner, now=self._auth.now())
        if revoked is None:
            raise ApiError(404, "not_found", f"no live token {token_id} of yours")
        await self._audit(request, "token.revoked", f"user-token:{revoked.id}", name=revoked.name)
        user = await self._store.find_user(str(revoked.user_id))
        answer = _token_json(revoked, None if user is None else user.name)
        answer["revoked_at"] = iso(self._auth.now())
        return 200, answer


def _role_actions(role: str) -> frozenset[str]:
    return ROLE_ACTIONS.get(role, frozenset())


def _principal(request: Request) -> Principal:
    if request.principal is None:  # a public route never calls these
        raise ApiError(401, "unauthorized", "sign in: a bearer token or a session")
    return request.principal

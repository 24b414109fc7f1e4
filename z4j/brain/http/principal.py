"""Who a signed-in request is: name, role, projects, and how they signed in.

Kept apart from auth.py so that the request (`_request.py`) and the policy
checks can name it without importing the store.
"""

from __future__ import annotations

import uuid

import attrs

__all__ = ["Principal"]


@attrs.frozen(kw_only=True)
class Principal:
    """A signed-in caller.

    A user (``user_id`` set) signs in with a password (a session) or one of
    their personal tokens (``scope`` set: bearer, or a session it opened).
    A legacy admin token has no user: ``name`` is the token's, role admin.
    A federation token (``federation`` set) is a peer region's hub: ``name``
    is the token's, its role ``federation`` (or ``federation_commands``),
    which admits the federation peer routes alone (policy.py).
    """

    name: str
    role: str
    user_id: uuid.UUID | None = None
    # Project ids the user is narrowed to; None: every project.
    projects: frozenset[uuid.UUID] | None = None
    scope: str | None = None  # a personal token's scope
    token_name: str | None = None  # the token signed in with, if any
    token_hash: bytes | None = None
    token_id: uuid.UUID | None = None  # a personal token's id
    session: str | None = None
    federation: bool = False

    @property
    def by_cookie(self) -> bool:
        return self.session is not None

    @property
    def legacy(self) -> bool:
        return self.user_id is None

    @property
    def actor(self) -> str:
        """How audit rows and commands name the caller."""
        if self.federation:
            return f"federation:{self.name}"
        if self.user_id is None:
            return f"token:{self.name}"
        if self.token_name is not None:
            return f"{self.name}/token:{self.token_name}"
        return self.name

    def sees(self, project_id: uuid.UUID | None) -> bool:
        """May this caller look at that project (None: not in any project)?"""
        return self.projects is None or project_id in self.projects

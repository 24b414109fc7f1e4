"""``z4j user create/list/disable/enable/reset-password``: accounts from the
brain's host, on the store directly (like ``z4j admin token``), for when no
one can sign in yet or an admin locked themselves out.

A password is read from the terminal (twice) or, piped, from the first line
of stdin: never from the command line, where ``ps`` and shell history see it.
Every change is audited as ``cli:<os user>``.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ._cli_out import emit, iso
from .config import Config

if TYPE_CHECKING:
    from .store.base import Store, User

__all__ = ["ROLES", "USER_COMMANDS", "add_user_parser"]

# store.base.ROLES, written out so building the parser imports no store (a test
# keeps the two equal).
ROLES = ("admin", "operator", "viewer")


def add_user_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    config_flags: Callable[[argparse.ArgumentParser], None],
    json_flag: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add ``user`` and its actions, each with the configuration flags."""
    user = sub.add_parser("user", help="dashboard and API accounts: create, list, disable")
    user_sub = user.add_subparsers(dest="action", required=True)
    create = user_sub.add_parser(
        "create",
        help="create a user (the password is read from the terminal or stdin)",
    )
    create.add_argument("name")
    create.add_argument("--role", choices=ROLES, default="viewer", help="default viewer")
    create.add_argument(
        "--project",
        action="append",
        default=None,
        help="narrow the user to this project (name or id; repeat for more); default all",
    )
    config_flags(create)
    listing = user_sub.add_parser("list", help="list users: id, name, role, projects, state")
    json_flag(listing)
    config_flags(listing)
    for verb, what in (
        ("disable", "disable a user: their sessions and tokens stop working at once"),
        ("enable", "enable a disabled user"),
        ("reset-password", "set a user's password (read like create's); their sessions end"),
    ):
        one = user_sub.add_parser(verb, help=what)
        one.add_argument("ref", metavar="NAME_OR_ID")
        config_flags(one)


def _read_password() -> str:
    from .brain.http.passwords import check_new_password

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise ValueError("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    problem = check_new_password(password)
    if problem is not None:
        raise ValueError(problem)
    return password


def _actor() -> str:
    from .cli import _actor as actor

    return actor()


async def _user_of(store: Store, ref: str) -> User:
    user = await store.find_user(ref)
    if user is None:
        raise ValueError(f"no user {ref!r}")
    return user


async def _create(args: argparse.Namespace, config: Config, store: Store) -> None:
    from .brain.http.passwords import hash_password
    from .store.base import User

    projects = None
    if args.project is not None:
        found = []
        for ref in args.project:
            project = await store.find_project(ref)
            if project is None:
                raise ValueError(f"no project {ref!r}")
            found.append(project.id)
        projects = tuple(dict.fromkeys(found))
    password = _read_password()
    now = time.time()
    user = User(
        id=uuid.uuid4(),
        name=args.name,
        role=args.role,
        projects=projects,
        disabled=False,
        created_at=now,
        updated_at=now,
    )
    await store.create_user(user, await hash_password(password))
    await store.audit(
        "user.created",
        f"user:{user.name}",
        {"role": user.role, "source": "cli", "outcome": "ok"},
        actor=_actor(),
    )
    print(f"created {user.role} {user.name} ({user.id})")


async def _list(args: argparse.Namespace, config: Config, store: Store) -> None:
    names = {p.id: p.name for p in await store.list_projects()}
    users = await store.list_users()
    width = max([len(u.name) for u in users] + [4])

    def text() -> str:
        lines = [f"{'ID':<36}  {'NAME':<{width}}  {'ROLE':<8}  {'STATE':<8}  PROJECTS"]
        for u in users:
            projects = (
                "all" if u.projects is None else ",".join(names.get(p, str(p)) for p in u.projects)
            )
            state = "disabled" if u.disabled else "active"
            lines.append(f"{u.id!s:<36}  {u.name:<{width}}  {u.role:<8}  {state:<8}  {projects}")
        return "\n".join(lines)

    # The shape GET /api/v1/users gives each user.
    items = [
        {
            "id": str(u.id),
            "name": u.name,
            "role": u.role,
            "projects": None
            if u.projects is None
            else [{"id": str(p), "name": names.get(p)} for p in u.projects],
            "disabled": u.disabled,
            "created_at": iso(u.created_at),
            "updated_at": iso(u.updated_at),
        }
        for u in users
    ]
    emit(args, items, text)


async def _set_disabled(store: Store, ref: str, disabled: bool) -> None:
    user = await _user_of(store, ref)
    await store.update_user(user.id, disabled=disabled)
    verb = "disabled" if disabled else "enabled"
    await store.audit(
        f"user.{verb}", f"user:{user.name}", {"source": "cli", "outcome": "ok"}, actor=_actor()
    )
    print(f"{verb} {user.name}" + ("; their sessions have ended" if disabled else ""))


async def _disable(args: argparse.Namespace, config: Config, store: Store) -> None:
    await _set_disabled(store, args.ref, True)


async def _enable(args: argparse.Namespace, config: Config, store: Store) -> None:
    await _set_disabled(store, args.ref, False)


async def _reset_password(args: argparse.Namespace, config: Config, store: Store) -> None:
    from .brain.http.passwords import hash_password

    user = await _user_of(store, args.ref)
    password = _read_password()
    await store.update_user(user.id, password_hash=await hash_password(password))
    await store.audit(
        "user.password_reset",
        f"user:{user.name}",
        {"source": "cli", "outcome": "ok"},
        actor=_actor(),
    )
    print(f"set the password of {user.name}; their sessions have ended")


USER_COMMANDS: dict[str, Callable[[argparse.Namespace, Config, Store], Awaitable[None]]] = {
    "create": _create,
    "list": _list,
    "disable": _disable,
    "enable": _enable,
    "reset-password": _reset_password,
}

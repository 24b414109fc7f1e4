"""``z4j federation token create/list/revoke``: the tokens peer hubs read this region with.

A region issues a token to each hub that may federate it; the hub keeps it
in its peers file (Z4J_FEDERATION_PEERS_FILE, docs/scaling.md). Read-only
unless made with ``--allow-commands``; ``--expires`` bounds its life. The
store keeps a keyed hash only: the token is printed once. Every change is
audited as ``cli:<os user>``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ._cli_out import emit, iso
from .config import Config

if TYPE_CHECKING:
    from .store.base import FederationToken, Store

__all__ = ["FEDERATION_COMMANDS", "add_federation_parser", "parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# A token lives at most this long (a forgotten one should not outlive its hub).
MAX_EXPIRY_SECONDS = 5 * 365 * 86400


def parse_duration(text: str) -> float:
    """``90d``, ``12h``, ``30m``, ``45s`` (or bare seconds) as seconds."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"a duration like 90d, 12h, 30m or 45s, not {text!r}")
    seconds = int(match[1]) * _UNITS[match[2] or "s"]
    if not 0 < seconds <= MAX_EXPIRY_SECONDS:
        raise argparse.ArgumentTypeError("more than 0 and at most 5 years")
    return float(seconds)


def _token_name(text: str) -> str:
    if not text or text != text.strip() or not text.isprintable() or len(text) > 100:
        raise argparse.ArgumentTypeError(
            f"1 to 100 printable characters, without surrounding spaces: {text!r}"
        )
    return text


def add_federation_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    config_flags: Callable[[argparse.ArgumentParser], None],
    json_flag: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add ``federation token`` and its actions, each with the configuration flags."""
    federation = sub.add_parser(
        "federation", help="federation: tokens that peer regions' hubs read this region with"
    )
    federation_sub = federation.add_subparsers(dest="action", required=True)
    token = federation_sub.add_parser("token", help="create, list and revoke federation tokens")
    token_sub = token.add_subparsers(dest="token_action", required=True)
    create = token_sub.add_parser(
        "create",
        help="make a federation token for a hub and print it (shown only now)",
        description="Make a token a hub puts in its Z4J_FEDERATION_PEERS_FILE to read this "
        "region: its summary, agents, events, commands and audit, and nothing else. "
        "Read-only unless --allow-commands. It is shown only now: the store keeps its "
        "keyed hash.",
    )
    create.add_argument("--name", required=True, type=_token_name, help="the hub it is for")
    grant = create.add_mutually_exclusive_group()
    grant.add_argument(
        "--read-only", action="store_true", help="read only (the default), said out loud"
    )
    grant.add_argument(
        "--allow-commands",
        action="store_true",
        help="the hub may also send commands to this region's agents, each one confirmed "
        "by its operator naming this region; both regions audit them",
    )
    create.add_argument(
        "--expires",
        type=parse_duration,
        default=None,
        metavar="DURATION",
        help="it stops working this long from now: 90d, 12h, 30m (default: never)",
    )
    config_flags(create)
    listing = token_sub.add_parser(
        "list", help="list federation tokens: id, name, grant, state (never the secret)"
    )
    json_flag(listing)
    config_flags(listing)
    revoke = token_sub.add_parser(
        "revoke", help="revoke a federation token: its hub's next request gets 401"
    )
    revoke.add_argument("ref", metavar="NAME_OR_ID", help="the token's id, or its name")
    config_flags(revoke)


def _actor() -> str:
    from .cli import _actor as actor

    return actor()


def _grant(token: FederationToken) -> str:
    return "commands" if token.allow_commands else "read-only"


def _state(token: FederationToken, now: float) -> str:
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and token.expires_at <= now:
        return "expired"
    return "active"


async def _create(args: argparse.Namespace, config: Config, store: Store) -> None:
    from . import keys
    from .store.base import FederationToken

    secret = keys.new_federation_token()
    now = time.time()
    token = FederationToken(
        id=uuid.uuid4(),
        name=args.name,
        allow_commands=bool(args.allow_commands),
        created_at=now,
        expires_at=None if args.expires is None else now + args.expires,
        last_used_at=None,
        revoked_at=None,
        token_hash=keys.federation_token_hash(keys.master_secret(config), secret),
    )
    await store.add_federation_token(token)
    await store.audit(
        "federation.token.create",
        f"federation-token:{token.id}",
        {
            "name": token.name,
            "allow_commands": token.allow_commands,
            "expires_at": iso(token.expires_at),
        },
        actor=_actor(),
    )
    print(secret)
    grant = "may read and send commands" if token.allow_commands else "may read (read-only)"
    print(
        f"Federation token {token.id} for {token.name!r}: {grant}. It is shown only now: "
        "put it in the hub's Z4J_FEDERATION_PEERS_FILE.",
        file=sys.stderr,
    )


async def _list(args: argparse.Namespace, config: Config, store: Store) -> None:
    tokens = await store.list_federation_tokens()
    now = time.time()
    width = max([len(t.name) for t in tokens] + [4])

    def text() -> str:
        lines = [f"{'ID':<36}  {'NAME':<{width}}  {'GRANT':<9}  {'STATE':<7}  EXPIRES"]
        for t in tokens:
            lines.append(
                f"{t.id!s:<36}  {t.name:<{width}}  {_grant(t):<9}  {_state(t, now):<7}  "
                f"{iso(t.expires_at) or 'never'}"
            )
        return "\n".join(lines)

    emit(
        args,
        [
            {
                "id": str(t.id),
                "name": t.name,
                "allow_commands": t.allow_commands,
                "state": _state(t, now),
                "created_at": iso(t.created_at),
                "expires_at": iso(t.expires_at),
                "last_used_at": iso(t.last_used_at),
                "revoked_at": iso(t.revoked_at),
            }
            for t in tokens
        ],
        text,
    )


async def _revoke(args: argparse.Namespace, config: Config, store: Store) -> None:
    live = [t for t in await store.list_federation_tokens() if t.revoked_at is None]
    matches = [t for t in live if str(t.id) == args.ref.lower()] or [
        t for t in live if t.name == args.ref
    ]
    if not matches:
        raise ValueError(f"no live federation token with id or name {args.ref!r}")
    if len(matches) > 1:
        ids = ", ".join(str(t.id) for t in matches)
        raise ValueError(
            f"{len(matches)} federation tokens are named {args.ref!r}: give an id ({ids})"
        )
    [token] = matches
    revoked = await store.revoke_federation_token(token.id, now=time.time())
    if revoked is None:
        raise ValueError(f"federation token {token.id} was revoked meanwhile")
    await store.audit(
        "federation.token.revoked",
        f"federation-token:{token.id}",
        {"name": token.name, "allow_commands": token.allow_commands},
        actor=_actor(),
    )
    print(f"revoked federation token {token.id} ({token.name}); its hub's next request gets 401")


FEDERATION_COMMANDS: dict[str, Callable[[argparse.Namespace, Config, Store], Awaitable[None]]] = {
    "create": _create,
    "list": _list,
    "revoke": _revoke,
}

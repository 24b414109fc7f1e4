"""Federation in tests: tokens made in a region's store, a hub's peers file."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from .. import keys
from ..config import Config
from ..store import store_for
from ..store.base import FederationToken

__all__ = ["federation_token", "write_peers_file"]


async def federation_token(
    config: Config, name: str = "hub", *, allow_commands: bool = False
) -> str:
    """A new federation token of the region ``config`` runs, made in its store directly."""
    secret = keys.new_federation_token()
    store = store_for(config)
    try:
        await store.migrate()
        await store.add_federation_token(
            FederationToken(
                id=uuid.uuid4(),
                name=name,
                allow_commands=allow_commands,
                created_at=time.time(),
                expires_at=None,
                last_used_at=None,
                revoked_at=None,
                token_hash=keys.federation_token_hash(keys.master_secret(config), secret),
            )
        )
    finally:
        await store.aclose()
    return secret


def write_peers_file(path: Path, peers: Mapping[str, Mapping[str, str]]) -> Path:
    """A hub's Z4J_FEDERATION_PEERS_FILE: {name: {"token": ..., "url": ..., "ca": ...}}."""
    lines = []
    for name, table in peers.items():
        lines.append(f"[{name}]")
        lines += [f'{key} = "{value}"' for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path

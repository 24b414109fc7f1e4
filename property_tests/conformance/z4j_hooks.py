"""Hooks for a z4j brain, through its store: what ``z4j command send`` does.

An operator mints commands and revokes agents through the store, from any
process; the brain holding the socket picks them up with its sweep (within
about a second). These hooks do the same from the suite's process, given
the brain's own settings (data dir, database URL), and read the stored
events and the buffer file to see where acknowledged records landed.
`opamp_config_hook` stores a configuration for an OpAMP agent, as ``PUT
/api/v1/opamp/agents/{uid}/config`` does.
"""

from __future__ import annotations

import functools
import itertools
import json
import sqlite3
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import psycopg
import trio

from z4j import keys
from z4j.brain.commands import Commands
from z4j.brain.http.auth import Auth
from z4j.config import Config
from z4j.protocol.opamp import ConfigFile, config_hash
from z4j.store import store_for
from z4j.store.base import OpampConfig, Store
from z4j.testing.brain import buffer_rows

from .target import Hooks

__all__ = ["COMMAND_TIMEOUT_SECONDS", "opamp_config_hook", "store_hooks"]

T = TypeVar("T")
# Long enough that no command times out while an example holds it.
COMMAND_TIMEOUT_SECONDS = 600


def _with_store(config: Config, use: Callable[[Store], Awaitable[T]]) -> T:
    """Run ``use(store)`` in a Trio run of its own (blocking), then close the store."""

    async def main() -> T:
        store = store_for(config, application_name="z4j-conformance")
        try:
            return await use(store)
        finally:
            await store.aclose()

    return trio.run(main)


class _StoredEvents:
    """Reads every stored event's body; parses each row once (checks read often)."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._parsed: dict[int, dict[str, Any]] = {}

    def _rows(self) -> list[tuple[int, Any]]:
        config = self._config
        if config.database_url is not None:
            with psycopg.connect(config.database_url) as conn:
                try:
                    return conn.execute("SELECT id, body::text FROM events").fetchall()
                except psycopg.errors.UndefinedTable:
                    return []
        if not config.sqlite_store_path.exists():
            return []
        db = sqlite3.connect(config.sqlite_store_path)
        try:
            return db.execute("SELECT id, body FROM events").fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            db.close()

    def __call__(self) -> list[dict[str, Any]]:
        bodies = []
        for row_id, body in self._rows():
            parsed = self._parsed.get(row_id)
            if parsed is None:
                parsed = self._parsed[row_id] = orjson.loads(body)
            bodies.append(parsed)
        return bodies


def store_hooks(config: Config) -> Hooks:
    """Every hook, for the z4j brain that runs with ``config``'s store and buffer."""
    stored_events = _StoredEvents(config)

    def drained() -> bool:
        return buffer_rows(config) == 0

    def mint_command(agent_id: str, action: str, parameters: dict[str, Any]) -> str:
        async def mint(store: Store) -> str:
            record = await Commands(store).send(
                uuid.UUID(agent_id),
                action,
                parameters=parameters,
                timeout_seconds=COMMAND_TIMEOUT_SECONDS,
                issued_by="conformance",
            )
            return str(record.id)

        return _with_store(config, mint)

    def command_state(command_id: str) -> str | None:
        async def state(store: Store) -> str | None:
            record = await store.get_command(uuid.UUID(command_id))
            return None if record is None else record.state

        return _with_store(config, state)

    def cancel_command(command_id: str) -> None:
        async def cancel(store: Store) -> None:
            await Commands(store).cancel(uuid.UUID(command_id), actor="conformance")

        _with_store(config, cancel)

    def revoke_agent(agent_id: str) -> None:
        async def revoke(store: Store) -> None:
            await store.revoke_agent(uuid.UUID(agent_id))

        _with_store(config, revoke)

    return Hooks(
        stored_events=stored_events,
        drained=drained if config.resolved_buffer_path.exists() else None,
        mint_command=mint_command,
        command_state=command_state,
        cancel_command=cancel_command,
        revoke_agent=revoke_agent,
    )


def opamp_config_hook(
    config: Config,
    token: str,
    run: Callable[[Callable[[Store], Awaitable[Any]]], Any] | None = None,
    *,
    api: str | None = None,
) -> Callable[[str], str | None]:
    """`Hooks.opamp_config` for a z4j brain: a new configuration (new each call)
    for an agent of the project ``token`` belongs to; its hash.

    With ``api`` (the brain's base URL, ``http://host:port``) it is pushed as
    an operator would, ``PUT /api/v1/opamp/agents/{uid}/config`` with an admin
    token made in the store: the brain learns of it at once (on SQLite it
    answers from what it wrote itself, and sees writes made behind its back
    only within a second). Without, it is written to the store directly.
    ``run(use)`` runs ``use(store)`` (by default on a store opened for the call)."""
    with_store = run or functools.partial(_with_store, config)
    count = itertools.count()
    token_hash = keys.opamp_token_hash(keys.master_secret(config), token)
    admin: list[str] = []

    def desire(instance_uid: str) -> str | None:
        body = f"conformance: {next(count)}\n"
        files = {"conformance.yaml": {"body": body, "content_type": "text/yaml"}}
        digest = config_hash(
            {"conformance.yaml": ConfigFile(body=body.encode(), content_type="text/yaml")}
        )
        if api is not None:
            if not admin:

                async def mint(store: Store) -> tuple[str, str]:
                    project_id = await store.opamp_token_project(token_hash)
                    if project_id is None:
                        raise RuntimeError("the OpAMP token is unknown to the store")
                    made = await Auth(store, keys.master_secret(config)).new_token("conformance")
                    return made, str(project_id)

                admin.extend(with_store(mint))
            request = urllib.request.Request(
                f"{api}/api/v1/opamp/agents/{instance_uid}/config?project={admin[1]}",
                data=json.dumps({"files": files}).encode(),
                method="PUT",
                headers={"Authorization": f"Bearer {admin[0]}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                if response.status != 200:
                    raise RuntimeError(f"PUT config answered {response.status}")
            return digest.hex()

        async def put(store: Store) -> None:
            project_id = await store.opamp_token_project(token_hash)
            if project_id is None:
                raise RuntimeError("the OpAMP token is unknown to the store")
            now = time.time()
            stored = OpampConfig(
                project_id=project_id,
                instance_uid=instance_uid,
                config_hash=digest.hex(),
                files=files,
                created_at=now,
                created_by="conformance",
                status="pending",
                error_message="",
                status_at=now,
            )
            await store.put_opamp_config(stored, actor="conformance")

        with_store(put)
        return digest.hex()

    return desire

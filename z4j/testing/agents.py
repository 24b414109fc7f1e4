"""Provisioning for tests and benchmarks: a project and an agent in a store."""

from __future__ import annotations

import uuid

from .. import keys
from ..config import Config
from ..store import store_for

__all__ = ["provision"]


async def provision(
    config: Config, *, project: str = "demo", agent: str = "bare"
) -> tuple[str, str, uuid.UUID]:
    """Create a project and an agent; return (token, project secret, agent id)."""
    master = keys.master_secret(config)
    store = store_for(config)
    try:
        await store.migrate()
        created_project = await store.create_project(project)
        token = keys.new_agent_token()
        created = await store.create_agent(
            created_project.id, agent, keys.token_hash(master, token)
        )
    finally:
        await store.aclose()
    return token, keys.project_secret_text(master, created_project.id), created.id

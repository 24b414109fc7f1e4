"""Provisioning in the store (store/provisioning.py), on both stores.

Times are passed in (``now``), as the API passes its clock's: nothing here
sleeps through a grace. Covered: archiving revokes a project's agents and
stops new ones; a token rotation keeps the old token working until its
end, never lengthens an end already set, and forgets tokens ended long
ago; a secret rotation moves the generation on and keeps the previous one
verifying for its grace only (a second rotation drops the older one); what
the brain's sweep reads (`credential_deadlines`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from z4j.config import Config
from z4j.store import Store, store_for
from z4j.store.provisioning import ENDED_TOKENS_KEPT_SECONDS

NOW = 1_000_000.0
DAY = 86_400.0


@asynccontextmanager
async def opened(config: Config) -> AsyncIterator[Store]:
    store = store_for(config)
    try:
        await store.migrate()
        yield store
    finally:
        await store.aclose()


def h(n: int) -> bytes:
    """A token hash (the store never sees tokens)."""
    return n.to_bytes(32, "big")


async def test_archive_revokes_the_agents_and_takes_no_new_ones(config: Config) -> None:
    async with opened(config) as store:
        project = await store.create_project("shop")
        other = await store.create_project("other")
        a = await store.create_agent(project.id, "a", h(1))
        b = await store.create_agent(project.id, "b", h(2))
        await store.revoke_agent(b.id)
        kept = await store.create_agent(other.id, "c", h(3))

        revoked = await store.archive_project(project.id, now=NOW)
        assert revoked is not None and [x.id for x in revoked] == [a.id]  # b was already
        assert await store.archive_project(project.id, now=NOW + 1) is None
        assert await store.archive_project(uuid.uuid4(), now=NOW) is None

        archived = await store.find_project(str(project.id))
        assert archived is not None and archived.archived and archived.archived_at == NOW
        assert await store.agent_login(h(1)) is None
        assert await store.agent_by_token(h(1)) is None
        login = await store.agent_login(h(3))
        assert login is not None and login.agent.id == kept.id
        try:
            await store.create_agent(project.id, "late", h(4))
        except LookupError as exc:
            assert "archived" in str(exc)
        else:
            raise AssertionError("an archived project took an agent")
        assert await store.rotate_project_secret(project.id, now=NOW, grace_seconds=60) is None
        listed = {p.name: p for p in await store.list_projects()}
        assert listed["shop"].archived and not listed["other"].archived


async def test_a_rotated_token_works_until_its_grace_ends(config: Config) -> None:
    async with opened(config) as store:
        project = await store.create_project("shop")
        agent = await store.create_agent(project.id, "a", h(1))
        fresh = await store.agent_login(h(1))
        assert fresh is not None and fresh.token_expires_at is None

        ends = await store.rotate_agent_token(agent.id, h(2), now=NOW, grace_seconds=DAY)
        assert ends == NOW + DAY
        old, new = await store.agent_login(h(1)), await store.agent_login(h(2))
        assert old is not None and old.token_expires_at == NOW + DAY and old.agent.id == agent.id
        assert new is not None and new.token_expires_at is None
        assert await store.token_graces(now=NOW) == {agent.id: NOW + DAY}
        assert await store.token_graces(now=NOW + DAY) == {}

        # A second rotation: the first token keeps its (earlier) end, the
        # second one gets the new grace.
        await store.rotate_agent_token(agent.id, h(3), now=NOW + 10, grace_seconds=2 * DAY)
        first, second = await store.agent_login(h(1)), await store.agent_login(h(2))
        assert first is not None and first.token_expires_at == NOW + DAY
        assert second is not None and second.token_expires_at == NOW + 10 + 2 * DAY
        # ...and a shorter one shortens every older token's end.
        await store.rotate_agent_token(agent.id, h(4), now=NOW + 20, grace_seconds=0)
        deadlines = await store.credential_deadlines()
        assert deadlines.tokens == {h(1): NOW + 20, h(2): NOW + 20, h(3): NOW + 20}

        # Tokens that ended long ago are forgotten at the next rotation.
        later = NOW + 20 + ENDED_TOKENS_KEPT_SECONDS + 1
        await store.rotate_agent_token(agent.id, h(5), now=later, grace_seconds=60)
        deadlines = await store.credential_deadlines()
        assert deadlines.tokens == {h(4): later + 60}
        assert await store.agent_login(h(1)) is None

        await store.revoke_agent(agent.id)
        assert await store.rotate_agent_token(agent.id, h(6), now=later, grace_seconds=1) is None
        assert (
            await store.rotate_agent_token(uuid.uuid4(), h(7), now=later, grace_seconds=1) is None
        )
        assert await store.agent_login(h(5)) is None


async def test_agent_by_token_ends_a_rotated_token_by_the_stores_clock(config: Config) -> None:
    async with opened(config) as store:
        project = await store.create_project("shop")
        agent = await store.create_agent(project.id, "a", h(1))
        # Rotated "an hour ago" with a minute's grace: over by the real clock.
        await store.rotate_agent_token(agent.id, h(2), now=time.time() - 3600, grace_seconds=60)
        assert await store.agent_by_token(h(1)) is None
        found = await store.agent_by_token(h(2))
        assert found is not None and found.id == agent.id


async def test_a_rotated_secret_keeps_the_previous_one_for_its_grace(config: Config) -> None:
    async with opened(config) as store:
        project = await store.create_project("shop")
        await store.create_agent(project.id, "a", h(1))
        assert project.secret_generations(NOW) == (0,)

        rotated = await store.rotate_project_secret(project.id, now=NOW, grace_seconds=DAY)
        assert rotated is not None
        assert rotated.secret_generation == 1 and rotated.previous_secret_expires_at == NOW + DAY
        assert rotated.secret_generations(NOW) == (1, 0)
        assert rotated.secret_generations(NOW + DAY) == (1,)
        login = await store.agent_login(h(1))
        assert login is not None and login.project == rotated

        # Rotating again within the grace: generation 0 stops at once.
        again = await store.rotate_project_secret(project.id, now=NOW + 5, grace_seconds=60)
        assert again is not None and again.secret_generations(NOW + 5) == (2, 1)
        assert again.secret_generations(NOW + 65) == (2,)
        deadlines = await store.credential_deadlines()
        assert deadlines.projects[project.id] == again
        assert await store.rotate_project_secret(uuid.uuid4(), now=NOW, grace_seconds=1) is None

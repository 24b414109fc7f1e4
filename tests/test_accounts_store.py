"""Accounts in both stores: users, personal tokens, sessions (store/accounts.py).

Each test runs against SQLite and a real Postgres (the `config` fixture).
"""

from __future__ import annotations

import uuid

import pytest
import trio

from z4j.config import Config
from z4j.store import DirectoryConflict, Store
from z4j.store.base import User, UserToken
from z4j.testing.store import open_store, query


def user(name: str, role: str = "viewer", **changes: object) -> User:
    values: dict[str, object] = {
        "id": uuid.uuid4(),
        "name": name,
        "role": role,
        "projects": None,
        "disabled": False,
        "created_at": 1000.0,
        "updated_at": 1000.0,
    }
    values.update(changes)
    return User(**values)  # type: ignore[arg-type]


def token(owner: User, name: str = "ci", **changes: object) -> UserToken:
    values: dict[str, object] = {
        "id": uuid.uuid4(),
        "user_id": owner.id,
        "name": name,
        "scope": "read",
        "created_at": 1000.0,
        "expires_at": None,
        "last_used_at": None,
        "revoked_at": None,
    }
    values.update(changes)
    return UserToken(**values)  # type: ignore[arg-type]


async def test_users_round_trip_and_names_are_unique(config: Config) -> None:
    async with open_store(config) as store:
        project = uuid.uuid4()
        alice = user("alice", "operator", projects=(project,))
        assert await store.count_users() == 0
        assert await store.create_user(alice, "hash-a")
        assert await store.find_user("alice") == alice
        assert await store.find_user(str(alice.id)) == alice
        assert await store.user_password("alice") == (alice, "hash-a")
        with pytest.raises(DirectoryConflict):
            await store.create_user(user("alice"), "hash-b")
        assert not await store.create_user(user("bob"), "x", only_if_first=True)
        changed = await store.update_user(alice.id, role="admin", projects=None)
        assert changed is not None and changed.role == "admin" and changed.projects is None
        assert [u.name for u in await store.list_users()] == ["alice"]
        assert await store.update_user(uuid.uuid4(), disabled=True) is None


async def test_one_first_user_of_many_made_at_once(config: Config) -> None:
    async with open_store(config) as first:
        stores: list[Store] = [first]
        async with open_store(config) as second, open_store(config) as third:
            stores += [second, third]
            made: list[bool] = []

            async def make(store: Store, n: int) -> None:
                made.append(await store.create_user(user(f"u{n}"), "x", only_if_first=True))

            async with trio.open_nursery() as nursery:
                for n, store in enumerate(stores):
                    nursery.start_soon(make, store, n)
            assert sorted(made) == [False, False, True]
            assert await first.count_users() == 1


async def test_tokens_live_until_revoked_expired_or_owner_disabled(config: Config) -> None:
    async with open_store(config) as store:
        alice = user("alice")
        await store.create_user(alice, "x")
        ci = token(alice, expires_at=5000.0)
        await store.add_user_token(ci, b"h" * 32)
        found = await store.user_token_owner(b"h" * 32, now=2000.0)
        assert found is not None and found[0] == ci and found[1].name == "alice"
        assert await store.user_token_owner(b"h" * 32, now=5000.0) is None  # expired
        await store.user_token_used(b"h" * 32, now=2500.0)
        [listed] = await store.list_user_tokens(alice.id)
        assert listed.last_used_at == 2500.0
        assert await store.list_user_tokens(uuid.uuid4()) == []
        # only its owner's, when the owner is named
        assert await store.revoke_user_token(ci.id, user_id=uuid.uuid4(), now=3000.0) is None
        await store.update_user(alice.id, disabled=True)
        assert await store.user_token_owner(b"h" * 32, now=2000.0) is None
        await store.update_user(alice.id, disabled=False)
        assert await store.user_token_owner(b"h" * 32, now=2000.0) is not None
        revoked = await store.revoke_user_token(ci.id, user_id=alice.id, now=3000.0)
        assert revoked is not None and revoked.id == ci.id
        assert await store.user_token_owner(b"h" * 32, now=2000.0) is None
        assert await store.revoke_user_token(ci.id, now=3000.0) is None  # once
        [listed] = await store.list_user_tokens()
        assert listed.revoked_at == 3000.0


async def test_sessions_end_by_expiry_idleness_token_and_everywhere(config: Config) -> None:
    async with open_store(config) as store:
        alice = user("alice")
        await store.create_user(alice, "x")
        ci = token(alice)
        await store.add_user_token(ci, b"t" * 32)
        for n, token_id in enumerate([None, None, None, ci.id]):
            await store.add_user_session(
                bytes([n]) * 32, user_id=alice.id, token_id=token_id, now=100.0, expires_at=1000.0
            )
        live = await store.user_session(b"\x00" * 32, now=150.0, idle_seconds=60.0)
        assert live is not None and live.user == alice and live.token is None
        # idle past the limit: gone (and deleted)
        assert await store.user_session(b"\x01" * 32, now=161.0, idle_seconds=60.0) is None
        assert await store.user_session(b"\x01" * 32, now=101.0, idle_seconds=60.0) is None
        # touched, it lives on; past its expiry, not
        await store.touch_user_session(b"\x02" * 32, now=900.0)
        assert await store.user_session(b"\x02" * 32, now=950.0, idle_seconds=60.0) is not None
        assert await store.user_session(b"\x02" * 32, now=1000.0, idle_seconds=1e9) is None
        by_token = await store.user_session(b"\x03" * 32, now=110.0, idle_seconds=60.0)
        assert by_token is not None and by_token.token == ci
        await store.revoke_user_token(ci.id, now=120.0)
        assert await store.user_session(b"\x03" * 32, now=121.0, idle_seconds=60.0) is None
        await store.add_user_session(
            b"\x04" * 32, user_id=alice.id, token_id=None, now=100.0, expires_at=1000.0
        )
        assert await store.drop_user_sessions(alice.id) == 2
        assert query(config, "SELECT count(*) FROM user_sessions") == [(0,)]

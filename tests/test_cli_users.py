"""``z4j user``: accounts from the brain's host, as an operator meets them."""

from __future__ import annotations

from pathlib import Path

import trio

from z4j.brain.http.passwords import verify_password
from z4j.config import load_config
from z4j.store import store_for
from z4j.testing.brain import run_z4j


def _signs_in(env: dict[str, str], name: str, password: str) -> bool:
    """Would this name and password pass the brain's sign-in check?"""

    async def check() -> bool:
        store = store_for(load_config(env=env))
        try:
            found = await store.user_password(name)
            return (
                found is not None
                and not found[0].disabled
                and await verify_password(found[1], password)
            )
        finally:
            await store.aclose()

    return trio.run(check)


def test_user_create_list_disable_enable_and_reset_password(tmp_path: Path) -> None:
    env = {"Z4J_DATA_DIR": str(tmp_path)}
    made = run_z4j("user", "create", "ada", "--role", "admin", env=env, stdin="first password\n")
    assert made.returncode == 0, made.stderr
    assert "first password" not in made.stdout + made.stderr
    assert _signs_in(env, "ada", "first password")
    run_z4j("user", "create", "vic", env=env, stdin="viewer password\n")

    taken = run_z4j("user", "create", "ada", env=env, stdin="another password\n")
    assert taken.returncode == 1 and len(taken.stderr.strip().splitlines()) == 1
    short = run_z4j("user", "create", "bob", env=env, stdin="short\n")
    assert short.returncode == 1 and "password" in short.stderr
    assert (
        run_z4j("user", "create", "x", "--project", "nope", env=env, stdin="x" * 12).returncode == 1
    )

    listed = run_z4j("user", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert rows[0] == ["ID", "NAME", "ROLE", "STATE", "PROJECTS"]
    assert sorted((r[1], r[2], r[3], r[4]) for r in rows[1:]) == [
        ("ada", "admin", "active", "all"),
        ("vic", "viewer", "active", "all"),
    ]
    assert "password" not in listed.stdout

    assert run_z4j("user", "disable", "ada", env=env).returncode == 0
    assert not _signs_in(env, "ada", "first password")
    assert "disabled" in run_z4j("user", "list", env=env).stdout
    assert run_z4j("user", "enable", "ada", env=env).returncode == 0
    reset = run_z4j("user", "reset-password", "ada", env=env, stdin="second password\n")
    assert reset.returncode == 0, reset.stderr
    assert not _signs_in(env, "ada", "first password")
    assert _signs_in(env, "ada", "second password")
    missing = run_z4j("user", "disable", "nobody", env=env)
    assert missing.returncode == 1 and "no user 'nobody'" in missing.stderr

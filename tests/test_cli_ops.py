"""Operator commands: migrate --check, backup and its documented restore,
doctor, --json on every list and show, and what the CLI imports and shows."""

from __future__ import annotations

import argparse
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import psycopg

from z4j.cli import _parser
from z4j.cli_users import ROLES
from z4j.ingest import connect
from z4j.store.base import ROLES as STORE_ROLES
from z4j.store.migrations import MIGRATIONS
from z4j.testing.brain import BrainProcess, run_z4j

LAST = MIGRATIONS[-1].version
DOCS = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


def z4j(
    *args: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    result = run_z4j(*args, env=env, stdin=stdin)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def ok(*args: str, env: dict[str, str], stdin: str | None = None) -> str:
    result = z4j(*args, env=env, stdin=stdin)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout


# -- what `z4j --version` and `z4j send` load ----------------------------------------------

_MODULES_AFTER = """
import sys
from z4j.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(" ".join(sorted(sys.modules)))
"""


def _modules_after(*argv: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", _MODULES_AFTER, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    return set(done.stdout.splitlines()[-1].split())


def test_version_and_send_do_not_import_the_brain(tmp_path: Path) -> None:
    """They took 1.4-1.6 s importing the brain, Hypercorn and psycopg (a store)."""
    heavy = {"z4j.brain", "z4j.store", "hypercorn", "psycopg", "z4j.supervisor"}
    version = _modules_after("--version")
    assert "z4j.cli" in version
    assert not heavy & version
    assert "trio" not in version
    records = tmp_path / "records.json"
    records.write_text('[{"t": "log"}]')
    # Nothing listens on port 1: send fails, after importing all it needs.
    send = _modules_after("send", "--ingest", "127.0.0.1:1", str(records))
    assert "z4j.ingest" in send
    assert not heavy & send
    assert "trio" not in send  # the blocking client needs no event loop library


def test_help_lists_only_the_settings_a_command_reads() -> None:
    def help_of(*args: str) -> str:
        return z4j(*args, "--help", env={}).stdout

    for command in (("project", "list"), ("migrate",), ("user", "list")):
        text = help_of(*command)
        assert "--data-dir" in text and "--database-url" in text
        assert "--drain-workers" not in text and "--ingest-max-frame-bytes" not in text
        assert "docs/configuration.md" in text
    assert "--buffer-path" in help_of("dead-letters", "list")
    assert "--http-bind" in help_of("agent", "create")  # it prints where agents connect
    send = " ".join(help_of("send").split())
    assert "--data-dir" not in send and "durably in its buffer" in send
    assert "--drain-workers" in help_of("brain") and "--drain-workers" in help_of("doctor")
    assert len(help_of("project", "list").splitlines()) < 60


def test_the_cli_roles_are_the_stores() -> None:
    assert ROLES == STORE_ROLES


# -- --json ------------------------------------------------------------------------------


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[Any]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _leaves(sub, (*path, name))
    return found or [(path, parser)]


def test_every_list_and_show_command_takes_json() -> None:
    leaves = dict(_leaves(_parser()))
    named = [p for p in leaves if p[-1] in ("list", "show")]
    assert len(named) >= 8
    for path in named:
        flags = {s for a in leaves[path]._actions for s in a.option_strings}
        assert "--json" in flags, path


def test_json_lists_are_arrays_and_shows_are_objects(tmp_path: Path) -> None:
    env = {"Z4J_DATA_DIR": str(tmp_path)}
    project_id = ok("project", "create", "shop", env=env).split()[0]
    ok("agent", "create", "--project", "shop", "web-1", env=env)
    ok("admin", "token", "--name", "ci", env=env)
    ok("opamp", "token", "create", "--project", "shop", "--name", "edge", env=env)
    ok("user", "create", "ada", "--role", "admin", env=env, stdin="correct horse battery\n")
    command_id = ok("command", "send", "--agent", "web-1", "ping", env=env).strip()

    def listed(*args: str) -> list[dict[str, Any]]:
        value = orjson.loads(ok(*args, "--json", env=env))
        assert isinstance(value, list)
        return value

    assert listed("project", "list") == [{"id": project_id, "name": "shop", "archived_at": None}]
    [agent] = listed("agent", "list")
    assert agent["project"] == "shop" and agent["name"] == "web-1" and agent["revoked"] is False
    [admin] = listed("admin", "token", "list")
    assert admin["name"] == "ci" and admin["last_used_at"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT.*\+00:00", admin["created_at"])
    [edge] = listed("opamp", "token", "list")
    assert (edge["name"], edge["project"], edge["project_id"]) == ("edge", "shop", project_id)
    [user] = listed("user", "list")
    assert (user["name"], user["role"], user["projects"], user["disabled"]) == (
        "ada",
        "admin",
        None,
        False,
    )
    assert "password" not in orjson.dumps(user).decode()

    shown = orjson.loads(ok("command", "show", command_id, "--json", env=env))
    assert shown["id"] == command_id and shown["state"] == "pending"
    settings = orjson.loads(ok("config", "--json", env={**env, "Z4J_SECRET": "s" * 40}))
    assert settings["Z4J_DATA_DIR"] == str(tmp_path) and settings["Z4J_SECRET"] == "********"

    # The same rows for people.
    assert ok("project", "list", env=env).split() == [project_id, "shop"]


# -- migrate --check ---------------------------------------------------------------------


def test_migrate_check_on_the_embedded_store(tmp_path: Path) -> None:
    env = {"Z4J_DATA_DIR": str(tmp_path / "data")}
    fresh = z4j("migrate", "--check", env=env)
    assert fresh.returncode == 1
    assert fresh.stdout.strip().startswith(f"pending migrations: 1-{LAST} (schema not created yet")
    assert not (tmp_path / "data").exists()  # --check made nothing

    ok("migrate", env=env)
    current = z4j("migrate", "--check", env=env)
    assert (current.returncode, current.stdout.strip()) == (
        0,
        f"schema is up to date (version {LAST})",
    )

    db = sqlite3.connect(tmp_path / "data" / "store.sqlite3")
    with db:
        db.execute("DELETE FROM schema_version WHERE version = ?", (LAST,))
    db.close()
    behind = z4j("migrate", "--check", env=env)
    assert behind.returncode == 1
    assert behind.stdout.startswith(f"pending migrations: {LAST} (schema at version {LAST - 1}")


def _pg_versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [v for (v,) in conn.execute("SELECT version FROM schema_version ORDER BY version")]


def test_migrate_check_on_postgres(tmp_path: Path, pg_url: str) -> None:
    env = {"Z4J_DATA_DIR": str(tmp_path), "Z4J_DATABASE_URL": pg_url}
    fresh = z4j("migrate", "--check", env=env)
    assert fresh.returncode == 1 and f"pending migrations: 1-{LAST} " in fresh.stdout
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('schema_version')").fetchone() == (None,)

    ok("migrate", env=env)
    assert z4j("migrate", "--check", env=env).returncode == 0

    # A release whose last migration this database has not had yet.
    with psycopg.connect(pg_url) as conn:
        conn.execute("DELETE FROM schema_version WHERE version = %s", (LAST,))
    behind = z4j("migrate", "--check", env=env)
    assert behind.returncode == 1
    assert behind.stdout.startswith(f"pending migrations: {LAST} (schema at version {LAST - 1}")
    assert _pg_versions(pg_url) == list(range(1, LAST))  # never applied by --check

    # A database a newer release migrated.
    with psycopg.connect(pg_url) as conn:
        conn.execute(
            "INSERT INTO schema_version (version, name) VALUES (%s, 'x'), (9999, 'y')", (LAST,)
        )
    ahead = z4j("migrate", "--check", env=env)
    assert ahead.returncode == 1 and "does not know (9999)" in ahead.stdout

    # Unreachable: status 2, one line.
    gone = z4j("migrate", "--check", env={**env, "Z4J_DATABASE_URL": pg_url + "_missing"})
    assert gone.returncode == 2 and len(gone.stderr.strip().splitlines()) == 1
    assert gone.stderr.startswith("z4j migrate --check: cannot read the schema: ")


# -- backup and restore ------------------------------------------------------------------


def _restore_block() -> str:
    """The shell block docs/operations.md gives for a restore."""
    text = DOCS.read_text()
    section = text[text.index("### `z4j backup PATH` and restoring it") :]
    match = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert match is not None
    return match.group(1)


def _store_rows(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(data_dir / "store.sqlite3")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def _stored_events(data_dir: Path) -> int:
    return int(_store_rows(data_dir, "SELECT count(*) FROM events")[0][0])


def test_backup_of_a_running_brain_restored_as_documented(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {
        "Z4J_DATA_DIR": str(data),
        "Z4J_HTTP_BIND": "127.0.0.1:0",
        "Z4J_INGEST_BIND": "127.0.0.1:0",
        "Z4J_DRAIN_LINGER_MS": "0",
    }
    backup = tmp_path / "backups" / "z4j.sqlite3"
    brain = BrainProcess(env, log_path=tmp_path / "brain.log")
    try:
        ok("project", "create", "before", env=env)
        with connect(*brain.ingest) as client:
            assert client.send_many([[{"t": "log", "n": n} for n in range(50)]]) == [True]
        deadline = time.monotonic() + 30  # a hang bound, not a speed check
        while _stored_events(data) < 50:
            assert time.monotonic() < deadline, brain.log_text()
            time.sleep(0.05)

        out = ok("backup", str(backup), env=env)
        assert out.startswith(f"backed up {data / 'store.sqlite3'} to {backup}: ")
        assert out.strip().endswith(f"schema version {LAST}")
        assert backup.stat().st_mode & 0o077 == 0
        again = z4j("backup", str(backup), env=env)
        assert again.returncode == 1 and "exists" in again.stderr

        ok("project", "create", "after", env=env)  # not in the backup
    finally:
        brain.stop()

    subprocess.run(
        ["bash", "-euc", _restore_block()],
        env={"DATA_DIR": str(data), "BACKUP": str(backup), "PATH": "/usr/bin:/bin"},
        check=True,
        timeout=60,
    )
    assert (data / "replaced" / "store.sqlite3").exists()

    brain = BrainProcess(env, log_path=tmp_path / "brain.log")
    try:
        names = [p["name"] for p in orjson.loads(ok("project", "list", "--json", env=env))]
        assert names == ["before"]
        assert _stored_events(data) == 50
    finally:
        brain.stop()


def test_backup_refuses_a_postgres_store_and_a_missing_one(tmp_path: Path) -> None:
    pg = z4j("backup", str(tmp_path / "b"), env={"Z4J_DATABASE_URL": "postgresql://h/db"})
    assert pg.returncode == 1 and "pg_dump" in pg.stderr
    none = z4j("backup", str(tmp_path / "b"), env={"Z4J_DATA_DIR": str(tmp_path / "nothing")})
    assert none.returncode == 1 and "no store at" in none.stderr
    assert not (tmp_path / "b").exists()


# -- doctor ------------------------------------------------------------------------------


def _doctor(*args: str, env: dict[str, str]) -> tuple[int, dict[str, tuple[str, str]]]:
    result = z4j("doctor", "--json", *args, env=env)
    report = orjson.loads(result.stdout)
    assert report["ok"] is (result.returncode == 0)
    return result.returncode, {c["check"]: (c["status"], c["detail"]) for c in report["checks"]}


def test_doctor_on_the_embedded_store(tmp_path: Path) -> None:
    env = {"Z4J_DATA_DIR": str(tmp_path / "data")}
    status, checks = _doctor(env=env)
    assert status == 0
    assert [k for k in checks] == ["settings", "store", "schema", "clock", "disk"]
    assert checks["settings"][0] == "ok" and checks["store"][0] == "ok"
    assert checks["schema"] == ("warn", checks["schema"][1])
    assert checks["schema"][1].startswith(f"pending migrations: 1-{LAST}")
    assert checks["clock"][0] == "skip" and "SQLite" in checks["clock"][1]
    assert checks["disk"][0] in ("ok", "warn")

    ok("migrate", env=env)
    text = z4j("doctor", env=env)
    lines = text.stdout.splitlines()
    assert text.returncode == 0 and len(lines) == 5
    assert re.match(r"ok +schema +schema is up to date", lines[2])

    # A disk below the bound fails, and so does the command.
    status, checks = _doctor("--min-free-mib", str(2**40), env=env)
    assert status == 1 and checks["disk"][0] == "fail"

    # Settings the brain would refuse: one failure, the rest skipped.
    refused = z4j("doctor", env={**env, "Z4J_HTTP_BIND": "0.0.0.0:7700"})
    assert refused.returncode == 1
    assert refused.stdout.splitlines()[0].startswith("fail  settings  Z4J_HTTP_BIND=0.0.0.0:7700")
    assert all(line.startswith("skip") for line in refused.stdout.splitlines()[1:])
    status, checks = _doctor(env={**env, "Z4J_BUFFER_MAX_ROWS": "lots"})
    assert status == 1 and checks["settings"] == (
        "fail",
        "Z4J_BUFFER_MAX_ROWS: must be a whole number, got 'lots'",
    )


def test_doctor_on_postgres_checks_the_clock(tmp_path: Path, pg_url: str) -> None:
    env = {"Z4J_DATA_DIR": str(tmp_path), "Z4J_DATABASE_URL": pg_url}
    ok("migrate", env=env)
    status, checks = _doctor(env=env)
    assert status == 0, checks
    assert checks["store"] == ("ok", "the Postgres store answers")
    assert checks["schema"][0] == "ok"
    # The test's Postgres runs on this host: one clock, so well within a second.
    assert checks["clock"][0] == "ok"
    assert re.fullmatch(
        r"(ahead of|behind) Postgres by \d+\.\d{3} s \(± \d+\.\d{3} s\)", checks["clock"][1]
    )

    status, checks = _doctor(env={**env, "Z4J_DATABASE_URL": pg_url + "_missing"})
    assert status == 1 and checks["store"][0] == "fail"
    assert checks["schema"][0] == "skip" and checks["clock"][0] == "skip"


def test_settings_flags_hold_before_or_after_a_nested_action() -> None:
    parser = _parser()
    for argv in (
        ["admin", "token", "--data-dir", "X", "list"],
        ["admin", "token", "list", "--data-dir", "X"],
        ["admin", "token", "--data-dir", "X"],
    ):
        assert parser.parse_args(argv).data_dir == "X", argv

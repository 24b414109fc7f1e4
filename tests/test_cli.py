"""The z4j command as a user meets it: exit codes and one-line messages."""

from __future__ import annotations

import re
import socket
import sqlite3
import subprocess
import uuid
from pathlib import Path

import pytest

from z4j import keys
from z4j.config import load_config
from z4j.protocol.agent.signing import decode_secret
from z4j.store.migrations import MIGRATIONS
from z4j.testing.brain import run_z4j


def z4j(
    *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return run_z4j(*args, env=env or {}, stdin=stdin)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_bad_setting_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    result = z4j("brain", env={"Z4J_BUFFER_MAX_ROWS": "lots", "Z4J_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "z4j: configuration error: Z4J_BUFFER_MAX_ROWS: must be a whole number, got 'lots'"
    )


def test_migrate_on_the_embedded_store(tmp_path: Path) -> None:
    first = z4j("migrate", "--data-dir", str(tmp_path))
    every = ", ".join(str(m.version) for m in MIGRATIONS)
    assert first.returncode == 0 and first.stdout.strip() == f"applied migrations: {every}"
    again = z4j("migrate", "--data-dir", str(tmp_path))
    assert again.returncode == 0 and again.stdout.strip() == "schema is up to date"


def test_send_to_nothing_listening_is_a_clear_error() -> None:
    port = _closed_port()
    result = z4j("send", "--ingest", f"127.0.0.1:{port}", stdin='[{"t": "log"}]')
    assert result.returncode == 2
    assert result.stderr.startswith(f"z4j send: 127.0.0.1:{port}: ")
    assert "Traceback" not in result.stderr


def test_send_refuses_a_batch_below_one() -> None:
    result = z4j("send", "--batch", "0", stdin='[{"t": "log"}]')
    assert result.returncode == 2
    assert "must be 1 or more" in result.stderr


def test_config_masks_secrets() -> None:
    result = z4j(
        "config",
        env={"Z4J_INGEST_TOKEN": "t0ken", "Z4J_DATABASE_URL": "postgresql://u:pw@db:5432/z4j"},
    )
    assert result.returncode == 0
    assert "Z4J_INGEST_TOKEN=********" in result.stdout
    assert "Z4J_DATABASE_URL=postgresql://u:********@db:5432/z4j" in result.stdout
    assert "t0ken" not in result.stdout and "pw@" not in result.stdout


# -- provisioning: projects and agents ---------------------------------------------------


def _ok(*args: str, env: dict[str, str] | None = None) -> str:
    result = z4j(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def _fails(*args: str, env: dict[str, str] | None = None) -> str:
    """The one line on stderr of a command that exits 1."""
    result = z4j(*args, env=env)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _field(output: str, label: str) -> str:
    match = re.search(rf"^{label}:\s+(\S+)", output, re.MULTILINE)
    assert match is not None, output
    return match.group(1)


def _store_rows(data_dir: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    db = sqlite3.connect(data_dir / "store.sqlite3")
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def test_provision_a_project_and_an_agent(tmp_path: Path) -> None:
    data = ("--data-dir", str(tmp_path))
    created = _ok("project", "create", "shop", *data)
    project_id, name = created.split()
    assert name == "shop" and uuid.UUID(project_id).version == 4
    _ok("project", "create", "blog", *data)
    listed = _ok("project", "list", *data).splitlines()
    assert [line.split("  ")[1] for line in listed] == ["blog", "shop"]  # by name
    assert f"{project_id}  shop" in listed

    output = _ok("agent", "create", "--project", "shop", "web-1", *data)
    agent_id = _field(output, "agent id")
    token = _field(output, "token")
    secret = _field(output, "signing secret")
    assert token.startswith("z4j_") and len(token) > 40
    assert "shown only now" in output
    # The secret is what a z4j-bare agent accepts, and what the brain derives
    # for this project from the master secret in the same data directory.
    assert len(decode_secret(secret)) == 32
    master = keys.master_secret(load_config(env={}, overrides={"data_dir": tmp_path}))
    assert secret == keys.project_secret_text(master, uuid.UUID(project_id))
    hint = next(line for line in output.splitlines() if "Z4J_BRAIN_URL=" in line)
    for assignment in (
        "Z4J_BRAIN_URL=http://127.0.0.1:7700",
        f"Z4J_TOKEN={token}",
        f"Z4J_PROJECT_ID={project_id}",
        f"Z4J_HMAC_SECRET={secret}",
    ):
        assert assignment in hint.split()

    # Only the token's keyed hash is stored, never the token itself.
    stored = _store_rows(tmp_path, "SELECT token_hash, agent_id FROM agent_tokens")
    assert stored == [(keys.token_hash(master, token), agent_id)]
    assert token.encode() not in (tmp_path / "store.sqlite3").read_bytes()

    # By project id too; and each agent gets its own token.
    second = _ok("agent", "create", "--project", project_id, "web-2", *data)
    assert _field(second, "token") != token
    assert _field(second, "signing secret") == secret
    _ok("agent", "create", "--project", "blog", "web-1", *data)

    lines = _ok("agent", "list", *data).splitlines()
    assert [line.split()[1:] for line in lines] == [
        ["blog", "web-1"],
        ["shop", "web-1"],
        ["shop", "web-2"],
    ]
    assert f"{agent_id}  shop  web-1" in lines
    only_shop = _ok("agent", "list", "--project", "shop", *data).splitlines()
    assert [line.split()[2] for line in only_shop] == ["web-1", "web-2"]

    revoked = _ok("agent", "revoke", "web-2", "--project", "shop", *data)
    assert revoked.startswith("revoked agent web-2 (")
    _ok("agent", "revoke", agent_id, *data)  # by id, no project needed
    lines = _ok("agent", "list", "--project", "shop", *data).splitlines()
    assert [line.split()[2:] for line in lines] == [["web-1", "revoked"], ["web-2", "revoked"]]
    again = z4j("agent", "revoke", agent_id, *data)
    assert again.returncode == 0 and "revoked already" in again.stderr

    actions = _store_rows(tmp_path, "SELECT action, actor FROM audit_events ORDER BY id")
    assert [a for a, _ in actions] == [
        "project.create",
        "project.create",
        "agent.create",
        "agent.create",
        "agent.create",
        "agent.revoke",
        "agent.revoke",
    ]
    assert all(str(actor).startswith("cli") for _, actor in actions)


def test_provisioning_errors_are_one_line_and_exit_1(tmp_path: Path) -> None:
    data = ("--data-dir", str(tmp_path))
    assert _fails("agent", "create", "--project", "nope", "web", *data) == (
        "z4j agent create: no project 'nope'"
    )
    _ok("project", "create", "shop", *data)
    assert _fails("project", "create", "shop", *data) == (
        "z4j project create: a project named 'shop' exists already"
    )
    _ok("agent", "create", "--project", "shop", "web", *data)
    assert _fails("agent", "create", "--project", "shop", "web", *data) == (
        "z4j agent create: project 'shop' has an agent named 'web' already"
    )
    assert _fails("agent", "list", "--project", "nope", *data) == (
        "z4j agent list: no project 'nope'"
    )
    assert _fails("agent", "revoke", "nope", *data) == "z4j agent revoke: no agent 'nope'"
    assert _fails("agent", "revoke", "nope", "--project", "shop", *data) == (
        "z4j agent revoke: no agent 'nope' in project 'shop'"
    )
    assert _fails("agent", "revoke", str(uuid.uuid4()), *data).startswith(
        "z4j agent revoke: no agent '"
    )
    # A name in two projects needs --project.
    _ok("project", "create", "blog", *data)
    _ok("agent", "create", "--project", "blog", "web", *data)
    assert _fails("agent", "revoke", "web", *data) == (
        "z4j agent revoke: 2 agents are named 'web': give --project"
    )
    _ok("agent", "revoke", "web", "--project", "blog", *data)
    assert _fails("agent", "create", "--project", "blog", "web", *data) == (
        "z4j agent create: project 'blog' has an agent named 'web' already "
        "(revoked; names stay taken)"
    )


@pytest.mark.parametrize("name", [str(uuid.uuid4()), " padded", ""])
def test_names_that_would_confuse_lookups_are_refused(tmp_path: Path, name: str) -> None:
    result = z4j("project", "create", name, "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument name" in result.stderr


def test_agent_create_uses_z4j_secret_when_set(tmp_path: Path) -> None:
    master = "m" * 40
    env = {"Z4J_SECRET": master, "Z4J_DATA_DIR": str(tmp_path)}
    project_id = _ok("project", "create", "shop", env=env).split()[0]
    output = _ok("agent", "create", "--project", "shop", "web", env=env)
    expected = keys.project_secret_text(master.encode(), uuid.UUID(project_id))
    assert _field(output, "signing secret") == expected
    assert not (tmp_path / "secret").exists()


def test_provisioning_on_postgres(tmp_path: Path, pg_url: str) -> None:
    """The same commands against the Postgres store (``--database-url``)."""
    env = {"Z4J_SECRET": "s" * 40}
    data = ("--data-dir", str(tmp_path), "--database-url", pg_url)
    project_id = _ok("project", "create", "shop", *data, env=env).split()[0]
    output = _ok("agent", "create", "--project", "shop", "web", *data, env=env)
    agent_id = _field(output, "agent id")
    assert _ok("agent", "list", *data, env=env).splitlines() == [f"{agent_id}  shop  web"]
    assert _fails("project", "create", "shop", *data, env=env) == (
        "z4j project create: a project named 'shop' exists already"
    )
    _ok("agent", "revoke", "web", "--project", project_id, *data, env=env)
    assert _ok("agent", "list", *data, env=env).split()[-1] == "revoked"
    assert not (tmp_path / "store.sqlite3").exists()


def test_provisioning_without_a_reachable_store_is_one_line(tmp_path: Path) -> None:
    url = f"postgresql://z4j@127.0.0.1:{_closed_port()}/z4j"
    line = _fails("project", "list", "--data-dir", str(tmp_path), "--database-url", url)
    assert line.startswith("z4j project list: postgres: ")


def test_admin_tokens_are_listed_without_secrets_and_revoked_by_name_or_id(
    tmp_path: Path,
) -> None:
    env = {"Z4J_DATA_DIR": str(tmp_path)}
    first = z4j("admin", "token", "--name", "ci", env=env).stdout.strip()
    second = z4j("admin", "token", "--name", "laptop", env=env).stdout.strip()
    z4j("admin", "token", "--name", "laptop", env=env)
    listed = z4j("admin", "token", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert first not in listed.stdout and second not in listed.stdout
    # The secret part can hold "_" itself (URL-safe base64): cut the prefix, not at "_".
    assert first.removeprefix(keys.API_TOKEN_PREFIX)[:8] not in listed.stdout
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "CREATED", "LAST", "USED"]
    rows = [line.split() for line in lines[1:]]
    assert [r[1] for r in rows] == ["ci", "laptop", "laptop"] and all(
        r[-1] == "never" for r in rows
    )

    ambiguous = z4j("admin", "token", "revoke", "laptop", env=env)
    assert ambiguous.returncode == 1 and "give an id" in ambiguous.stderr
    assert z4j("admin", "token", "revoke", "ci", env=env).returncode == 0
    assert z4j("admin", "token", "revoke", rows[1][0], env=env).returncode == 0
    gone = z4j("admin", "token", "revoke", "ci", env=env)
    assert gone.returncode == 1 and "no admin token" in gone.stderr
    left = z4j("admin", "token", "list", env=env).stdout.splitlines()[1:]
    assert [r.split()[0] for r in left] == [rows[2][0]]


def test_opamp_tokens_are_made_per_project_listed_without_secrets_and_revoked(
    tmp_path: Path,
) -> None:
    data = ("--data-dir", str(tmp_path))
    project_id = _ok("project", "create", "fleet", *data).split()[0]
    created = z4j("opamp", "token", "create", "--project", "fleet", "--name", "collectors", *data)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith(keys.OPAMP_TOKEN_PREFIX) and len(token) > 40
    assert "shown only now" in created.stderr and "/v1/opamp" in created.stderr
    # What the brain checks a bearer token against: its keyed hash, and the project.
    master = keys.master_secret(load_config(env={}, overrides={"data_dir": tmp_path}))
    stored = _store_rows(tmp_path, "SELECT project_id, token_hash FROM opamp_tokens")
    assert stored == [(project_id, keys.opamp_token_hash(master, token))]

    lines = _ok("opamp", "token", "list", *data).splitlines()
    assert lines[0].split() == ["ID", "PROJECT", "CREATED", "NAME"]
    [row] = [line.split() for line in lines[1:]]
    assert (row[1], row[-1]) == ("fleet", "collectors")
    assert token.removeprefix(keys.OPAMP_TOKEN_PREFIX)[:8] not in "\n".join(lines)

    assert _fails("opamp", "token", "create", "--project", "nope", *data) == (
        "z4j opamp token: no project 'nope'"
    )
    assert _ok("opamp", "token", "revoke", row[0], *data).startswith("revoked OpAMP token")
    assert _store_rows(tmp_path, "SELECT count(*) FROM opamp_tokens") == [(0,)]  # gone at once
    assert "no OpAMP token" in _fails("opamp", "token", "revoke", "feedface00000000", *data)


def test_the_brain_command_shortens_the_gil_switch_interval(tmp_path: Path) -> None:
    """`z4j brain` sets Z4J_GIL_SWITCH_INTERVAL_US (cli.tune_interpreter); 0 keeps Python's."""
    import sys

    from z4j.cli import tune_interpreter
    from z4j.config import load_config

    before = sys.getswitchinterval()
    try:
        tune_interpreter(load_config(env={}, overrides={"data_dir": tmp_path}))
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        sys.setswitchinterval(0.005)
        tune_interpreter(
            load_config(env={"Z4J_GIL_SWITCH_INTERVAL_US": "0"}, overrides={"data_dir": tmp_path})
        )
        assert sys.getswitchinterval() == pytest.approx(0.005)
    finally:
        sys.setswitchinterval(before)

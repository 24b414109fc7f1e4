"""The z4j command as a user meets it: exit codes and one-line messages."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def z4j(
    *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("Z4J_")}
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "z4j", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=clean,
        timeout=60,
    )


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
    assert first.returncode == 0 and first.stdout.strip() == "applied migrations: 1, 2"
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

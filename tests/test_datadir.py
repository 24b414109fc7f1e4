"""The data directory is private, and one brain serves an SQLite store.

Issue 13, items 8 (modes) and 10 (operator traps).
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
import trio

from z4j._datadir import BrainAlreadyRunning
from z4j.brain import serve_brain
from z4j.config import ConfigError
from z4j.testing.brain import make_config, run_z4j, running_brain, wait_until


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_new_data_dir_and_every_file_in_it_are_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with trio.fail_after(30):
        async with running_brain(make_config(data)):
            # The store exists once migrations ran; the buffer from the start.
            await wait_until((data / "store.sqlite3").exists)
    assert mode(data) == 0o700
    files = sorted(p.name for p in data.iterdir())
    assert {"buffer.sqlite3", "store.sqlite3", "secret", "brain.lock"} <= set(files)
    open_files = {p.name: oct(mode(p)) for p in data.iterdir() if mode(p) & 0o077}
    assert open_files == {}, f"readable by others: {open_files}"


async def test_files_an_older_brain_left_world_readable_are_tightened(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with trio.fail_after(30):
        async with running_brain(make_config(data)):
            await wait_until((data / "store.sqlite3").exists)
    for name in ("store.sqlite3", "buffer.sqlite3"):
        os.chmod(data / name, 0o644)
    os.chmod(data, 0o755)
    with trio.fail_after(30):
        async with running_brain(make_config(data)):
            pass
    assert mode(data / "store.sqlite3") == 0o600
    assert mode(data / "buffer.sqlite3") == 0o600
    assert mode(data) == 0o755, "an existing directory is the operator's: warned about, not changed"


async def test_a_second_brain_on_one_sqlite_store_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = make_config(data)
    # Even with a buffer file of its own (the hint the buffer lock gives),
    # the second brain would share the first one's store.
    second = make_config(data, buffer_path=tmp_path / "other-buffer.sqlite3")
    with trio.fail_after(30):
        async with running_brain(first):
            refused = pytest.RaisesExc(BrainAlreadyRunning, match="Z4J_DATA_DIR")
            with pytest.RaisesGroup(refused, flatten_subgroups=True):
                async with running_brain(second):
                    pass  # pragma: no cover - must not start
            assert not (tmp_path / "other-buffer.sqlite3").exists(), "refused before creating"
        # Once the first stops, the data dir is free again.
        async with running_brain(second):
            pass


async def test_so_reuseport_on_sqlite_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", so_reuseport=True)
    with trio.fail_after(60), pytest.raises(ConfigError, match="Z4J_DATABASE_URL"):
        await serve_brain(config)
    assert not (tmp_path / "data").exists(), "refused before creating anything"


def test_the_command_line_says_why_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    env = {
        "Z4J_DATA_DIR": str(tmp_path / "data"),
        "Z4J_INGEST_BIND": "127.0.0.1:0",
        "Z4J_HTTP_BIND": "127.0.0.1:0",
        "Z4J_SO_REUSEPORT": "true",
    }
    result = run_z4j("brain", env=env)
    assert result.returncode == 2, result.stderr
    assert "Z4J_SO_REUSEPORT=true" in result.stderr
    assert "Traceback" not in result.stderr
    # A refusal from inside the brain's start-up checks, too.
    env = {**env, "Z4J_SO_REUSEPORT": "false", "Z4J_HTTP_BIND": "0.0.0.0:0"}
    result = run_z4j("brain", env=env)
    assert result.returncode == 2, result.stderr
    assert "Z4J_SECRET" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


async def test_a_port_in_use_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = make_config(tmp_path / "data", http_bind=f"127.0.0.1:{port}")
        with trio.fail_after(60), pytest.raises(OSError, match="address in use") as refused:
            await serve_brain(config)
    # On SQLite the hint must not be the SO_REUSEPORT one (see the test above).
    assert "Z4J_SO_REUSEPORT" not in str(refused.value)
    assert not (tmp_path / "data").exists(), (
        "no data dir, buffer or store for a brain that cannot serve"
    )

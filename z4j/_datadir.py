"""The data directory: private to the brain's user, and one brain's on SQLite.

Internal. The data directory holds the master secret, the buffer (payloads
not yet drained) and, by default, the SQLite store with its token hashes:
nothing in it is for other users of the host, so directories are made 0700
and files 0600 (SQLite gives its -wal and -shm files the database file's
mode). A file left more open by an older version is tightened; a directory
that already exists is left as the operator set it, with a warning if
others can read it.

The embedded SQLite store serves one brain process. Two brains on one data
directory would each drain into the same store while splitting the clients
between them, and `Z4J_SO_REUSEPORT` would hand one port's connections to
both: `SqliteBrainLock` and `check_single_brain` refuse that at start, with
a message that says what to do instead.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from pathlib import Path

from .config import Config, ConfigError

__all__ = [
    "BrainAlreadyRunning",
    "SqliteBrainLock",
    "check_single_brain",
    "private_dir",
    "private_file",
]

log = logging.getLogger("z4j.datadir")

_DIR_MODE = 0o700
_FILE_MODE = 0o600


class BrainAlreadyRunning(Exception):
    """Another brain process holds this data directory's SQLite store."""


def private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) as 0700; warn if it exists open to others.

    An existing directory is never changed: it may be shared (``/tmp``, a
    home directory) and is the operator's to set.
    """
    try:
        path.mkdir(mode=_DIR_MODE, parents=True)
    except FileExistsError:
        info = path.stat()
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077 and not mode & stat.S_ISVTX and path not in _warned:
            _warned.add(path)
            log.warning(
                "%s is open to other users of this host (mode %04o); the brain keeps its "
                "secret, buffer and store there: chmod 700 %s",
                path,
                mode,
                path,
            )


def private_file(path: Path) -> None:
    """Create ``path`` empty as 0600 if missing (so SQLite opens it with that mode), else tighten it."""
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    except FileExistsError:
        info = path.stat()
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077 and info.st_uid == os.geteuid():
            os.chmod(path, _FILE_MODE)
            log.info("tightened the permissions of %s from %04o to %04o", path, mode, _FILE_MODE)
    else:
        os.close(fd)


_warned: set[Path] = set()


def check_single_brain(config: Config) -> None:
    """Refuse settings that would run two brains on one SQLite store."""
    if config.so_reuseport and not config.uses_postgres:
        raise ConfigError(
            "Z4J_SO_REUSEPORT=true shares the ports between brain processes, but each brain on "
            "the embedded SQLite store has a store of its own, so the clients would be split "
            "over stores that never meet. Run one brain on SQLite, or set Z4J_DATABASE_URL to "
            "a Postgres database that every instance shares (then `z4j brain --instances N`)."
        )


class SqliteBrainLock:
    """An exclusive lock on ``DATA_DIR/brain.lock`` while a brain serves its SQLite store.

    Only `serve_brain` takes it: `z4j project create` and the other commands
    may still open the store beside a running brain.
    """

    def __init__(self, data_dir: Path) -> None:
        private_dir(data_dir)
        self.path = data_dir / "brain.lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BrainAlreadyRunning(
                f"another brain (pid {holder}) is serving the SQLite store in {data_dir}. "
                "The embedded store serves one brain: stop that one, or give this one its own "
                "Z4J_DATA_DIR (a separate brain with its own data), or move both to a shared "
                "Postgres store (Z4J_DATABASE_URL) to run several."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1

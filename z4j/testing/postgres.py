"""A throwaway PostgreSQL cluster for tests and benchmarks.

Finds the server binaries (``Z4J_PG_BIN``, ``/usr/lib/postgresql/*/bin``,
``PATH``, or the ``pgserver`` wheel), runs ``initdb`` into a temporary
directory and starts ``postgres`` on a free loopback port. initdb and
postgres refuse to run as root, so as root the cluster runs as the
``postgres`` user (or ``nobody``) through ``runuser``.

Tests may `stop` and `start` it again (fault tests); the data survives.

`PostgresCluster.standby` makes a streaming hot standby of a running cluster
with ``pg_basebackup -R`` (read-replica tests). initdb's defaults are what
that needs, so the primary is started as any other: ``wal_level=replica``,
``max_wal_senders=10``, and ``--auth=trust`` writes pg_hba lines that let
local TCP connections replicate. The standby streams through a replication
slot (WAL it has not received is kept for it), dropped when it is closed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

__all__ = ["ExternalPostgres", "PostgresCluster", "find_pg_bin"]


def find_pg_bin() -> Path:
    """The directory holding initdb, pg_ctl and postgres."""
    if os.environ.get("Z4J_PG_BIN"):
        return Path(os.environ["Z4J_PG_BIN"])
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True
    )
    for candidate in candidates:
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    try:
        import pgserver  # type: ignore[import-not-found]

        return Path(pgserver.__file__).parent / "pginstall" / "bin"
    except ImportError:
        pass
    raise RuntimeError(
        "no PostgreSQL server binaries found: install Debian's postgresql package, "
        "pip install pgserver, set Z4J_PG_BIN, or give Z4J_TEST_DATABASE_URL"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
            return user
        except KeyError:
            continue
    raise RuntimeError("running as root with no 'postgres' or 'nobody' user to run the server")


class PostgresCluster:
    """One cluster in a temporary directory. Use as a context manager."""

    def __init__(
        self,
        *,
        fsync: bool = False,
        settings: dict[str, str] | None = None,
        initdb: bool = True,
    ) -> None:
        """``initdb=False``: an empty directory for a data directory made otherwise."""
        self.bin = find_pg_bin()
        self.user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="z4j-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.fsync = fsync
        self.settings = settings or {}
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        # A standby's replication slot on its primary: (primary, slot name).
        self._slot: tuple[PostgresCluster, str] | None = None
        if initdb:
            self._initdb()

    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        return ["runuser", "-u", self.user, "--", *cmd] if self.user else cmd

    def _initdb(self) -> None:
        subprocess.run(
            self._cmd(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ),
            check=True,
            capture_output=True,
        )

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self, timeout: float = 30.0) -> None:
        options = [
            f"-p {self.port}",
            "-c listen_addresses=127.0.0.1",
            f"-k {self.root}",
            f"-c fsync={'on' if self.fsync else 'off'}",
            "-c max_connections=200",
            *(f"-c {k}={v}" for k, v in self.settings.items()),
        ]
        subprocess.run(
            self._cmd(
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.root / "server.log"),
                "-o",
                " ".join(options),
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ),
            check=True,
            capture_output=True,
        )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``, or ``immediate`` for a crash-like stop)."""
        subprocess.run(
            self._cmd("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"),
            check=False,
            capture_output=True,
        )

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
        if self._slot is not None:
            primary, slot = self._slot
            self._slot = None
            with psycopg.connect(primary.url, autocommit=True, connect_timeout=5) as conn:
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE slot_name = %s",
                    (slot,),
                )

    # -- streaming replication -----------------------------------------------------

    def standby(self) -> PostgresCluster:
        """A hot standby of this running cluster, on a port of its own (not
        started): ``pg_basebackup -R`` streams a copy and writes
        ``standby.signal`` and ``primary_conninfo``. Close it when done: that
        drops its replication slot here, or this cluster would keep WAL for it."""
        standby = PostgresCluster(fsync=self.fsync, settings=self.settings, initdb=False)
        slot = f"z4j_standby_{standby.port}"
        try:
            subprocess.run(
                standby._cmd(
                    "pg_basebackup",
                    "-D",
                    str(standby.data),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    "-R",  # standby.signal + primary_conninfo
                    "-X",
                    "stream",
                    "-c",
                    "fast",  # an immediate checkpoint, not a spread one
                    "-C",
                    "-S",
                    slot,
                    "--no-sync",
                ),
                check=True,
                capture_output=True,
            )
        except subprocess.CalledProcessError as exc:
            shutil.rmtree(standby.root, ignore_errors=True)
            raise RuntimeError(
                f"pg_basebackup failed: {exc.stderr.decode(errors='replace').strip()}"
            ) from None
        standby._slot = (self, slot)
        return standby

    def promote(self) -> None:
        """End recovery: the standby becomes a primary of its own (a new timeline)."""
        subprocess.run(
            self._cmd("pg_ctl", "-D", str(self.data), "-w", "promote"),
            check=True,
            capture_output=True,
        )

    def freeze(self, *, backends_of: str | None = None) -> list[int]:
        """SIGSTOP the server's processes, as a host that went silent (its
        sockets stay open, nothing answers); only the backends whose
        ``application_name`` starts with ``backends_of`` if given. Returns
        the pids for `thaw`."""
        if backends_of is not None:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                rows = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE starts_with(application_name, %s)",
                    (backends_of,),
                ).fetchall()
            pids = [int(pid) for (pid,) in rows]
        else:
            postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
            pids = [postmaster, *_children(postmaster)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        return pids

    @staticmethod
    def thaw(pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


class ExternalPostgres:
    """A server we were pointed at: usable, but not ours to stop."""

    def __init__(self, url: str) -> None:
        self.url = url

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        info["dbname"] = name
        return psycopg.conninfo.make_conninfo("", **info)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

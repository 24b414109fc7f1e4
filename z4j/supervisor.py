"""``z4j brain --instances N``: N brain processes on one host, one supervisor.

One Trio process, one event loop: a brain uses about one core, so a host
with more cores runs more processes. Each child is ``python -m z4j brain``
on the configuration the supervisor checked, handed over as ``Z4J_*``
variables (so a child restarted later runs what its siblings run, even if
the settings file changed meanwhile), with:

- SO_REUSEPORT on: every child binds the same Z4J_INGEST_BIND and
  Z4J_HTTP_BIND and the kernel spreads new connections across them;
- its own buffer file (`buffer_path_for`): instance 1 keeps the file a
  single process uses, instance *i* > 1 uses ``<stem>-<i><suffix>``
  (``buffer-2.sqlite3``), so going from one process to several and back
  never strands acknowledged rows in instance 1's file;
- its own row in ``instances`` (a new id at each start; the name is the
  default ``HOST:PID``, or ``Z4J_INSTANCE_NAME-<i>``).

Theory of operation
-------------------

**Link.** Each child holds one end of a socketpair (``--supervisor-fd``).
It writes ``ready <instance id>`` once it serves; the supervisor never
writes. However the supervisor dies (SIGKILL included), the kernel closes
its end, the child reads EOF and stops gracefully, within
Z4J_SHUTDOWN_GRACE_SECONDS: no child outlives its supervisor by more than
that. PR_SET_PDEATHSIG would not do: Trio starts processes from a worker
thread, the death signal follows the *thread* that forked and Trio retires
idle threads, so children would be killed at random; it is Linux-only too,
and it kills, where EOF lets a child answer what it holds first.

**Restarts.** A child that exits when no stop was asked is started again
after a delay that doubles from 0.5 s up to 30 s, per slot; a child that
ran 60 s or more starts the count again. Every exit and restart is logged.
A child that fails (exits non-zero) before its slot was ever ready stops
the supervisor with status 1: a port or a buffer file in use, a refused
setting, does not get better by restarting, and retrying forever would
hide it.

**Stop.** The first SIGINT or SIGTERM is forwarded to every child, and
nothing is restarted from then on; each child answers what it holds and
exits 0 within Z4J_SHUTDOWN_GRACE_SECONDS. Another signal more than a
second later is forwarded too (children then stop at once). A child still
running Z4J_SHUTDOWN_GRACE_SECONDS + 10 s after the first signal is
killed. The supervisor exits 0 when every child stopped cleanly, else 1.
Children stay in the supervisor's process group, so a Ctrl-C in a terminal
reaches them directly too; a brain takes a repeat within a second as the
same signal, so the forwarded copy changes nothing.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

import attrs
import trio

from .config import Config, ConfigError, check_bind_is_safe, config_env, parse_bind

__all__ = [
    "SupervisorLink",
    "buffer_path_for",
    "check_instances",
    "restart_delay",
    "stranded_buffers",
    "supervise",
]

log = logging.getLogger("z4j.supervisor")

RESTART_FIRST_DELAY = 0.5
RESTART_MAX_DELAY = 30.0
STABLE_SECONDS = 60.0  # a child up this long resets its slot's backoff
KILL_MARGIN = 10.0  # beyond the grace period (a brain then still closes its store)
REPEAT_WINDOW = 1.0  # a repeat within this is the same signal delivered twice


def check_instances(config: Config) -> None:
    """Refuse, before anything starts, settings the brain(s) would refuse, saying what to change.

    Runs the brain's own start-up checks too, so `z4j brain` answers a bad
    setting with one line and exit status 2, not a traceback from inside
    the task tree.
    """
    from ._datadir import check_single_brain

    n = config.instances
    if n > 1 and not config.uses_postgres:
        raise ConfigError(
            f"{n} instances need the Postgres store (set Z4J_DATABASE_URL): the embedded "
            "SQLite store serves one process"
        )
    for name, bind in (
        ("Z4J_INGEST_BIND", config.ingest_bind),
        ("Z4J_HTTP_BIND", config.http_bind),
    ):
        if n > 1 and parse_bind(bind)[1] == 0:
            raise ConfigError(
                f"{n} instances need fixed ports: {name}={bind} asks for a free port, which "
                "each process would pick on its own; give a port number to share"
            )
    check_single_brain(config)
    check_bind_is_safe(config)


def buffer_path_for(config: Config, instance: int) -> Path:
    """Instance 1 keeps the single-process buffer file; instance i > 1 gets ``<stem>-<i>``."""
    base = config.resolved_buffer_path
    if instance == 1:
        return base
    return base.with_name(f"{base.stem}-{instance}{base.suffix}")


def stranded_buffers(config: Config) -> list[tuple[Path, int]]:
    """Buffer files of instances beyond Z4J_INSTANCES that still hold payloads.

    Rows in them were acknowledged by an earlier run with more instances and
    drain only when a brain opens the file again.
    """
    base = config.resolved_buffer_path
    pattern = re.compile(rf"{re.escape(base.stem)}-(\d+){re.escape(base.suffix)}")
    try:
        names = sorted(os.listdir(base.parent))
    except OSError:
        return []
    found = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or int(match.group(1)) <= max(1, config.instances):
            continue
        path = base.parent / name
        try:
            db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                rows = int(db.execute("SELECT count(*) FROM payloads").fetchone()[0])
            finally:
                db.close()
        except sqlite3.Error:
            continue
        if rows:
            found.append((path, rows))
    return found


def restart_delay(failures: int) -> float:
    """Seconds before the ``failures``-th restart in a row of one slot."""
    return min(RESTART_MAX_DELAY, RESTART_FIRST_DELAY * 2.0 ** max(0, failures - 1))


async def supervise(config: Config, env: Mapping[str, str] | None = None) -> int:
    """Run ``config.instances`` brains until a signal stops them; the exit status."""
    from . import keys

    # Children would race to create DATA_DIR/secret (one could read it
    # empty): make it here first, once.
    await trio.to_thread.run_sync(keys.master_secret, config)
    return await Supervisor(config, os.environ if env is None else env).run()


@attrs.define(eq=False)
class _Slot:
    index: int
    env: dict[str, str]
    buffer_path: Path
    process: trio.Process | None = None
    ever_ready: bool = False
    failures: int = 0  # unexpected exits in a row


class Supervisor:
    """The N slots, the signals, and the exit status (see the module's header)."""

    def __init__(self, config: Config, env: Mapping[str, str]) -> None:
        base = {k: v for k, v in env.items() if k != "Z4J_CONFIG"}
        base.update(config_env(config))  # every setting, so the file is not read again
        base["Z4J_INSTANCES"] = "1"
        base["Z4J_SO_REUSEPORT"] = "true"
        self._slots = []
        for index in range(1, config.instances + 1):
            child = dict(base)
            path = buffer_path_for(config, index)
            child["Z4J_BUFFER_PATH"] = str(path)
            if config.instance_name is not None:
                child["Z4J_INSTANCE_NAME"] = f"{config.instance_name}-{index}"
            self._slots.append(_Slot(index, child, path))
        self._grace = config.shutdown_grace_seconds
        self._stopping = trio.Event()
        self._stop_at = 0.0
        self._failed = False

    async def run(self) -> int:
        log.info(
            "starting %d instances sharing ingest %s and http %s (SO_REUSEPORT)",
            len(self._slots),
            self._slots[0].env["Z4J_INGEST_BIND"],
            self._slots[0].env["Z4J_HTTP_BIND"],
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(self._watch_signals)
            async with trio.open_nursery() as slots:
                for slot in self._slots:
                    slots.start_soon(self._keep_running, slot)
            nursery.cancel_scope.cancel()
        if self._failed:
            return 1
        log.info("all %d instances stopped", len(self._slots))
        return 0

    def _stop(self, signum: int) -> None:
        if not self._stopping.is_set():
            self._stop_at = trio.current_time()
            self._stopping.set()
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        for slot in self._slots:
            if slot.process is not None and slot.process.returncode is None:
                slot.process.send_signal(signum)

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        first_at = 0.0
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                if not self._stopping.is_set():
                    log.info(
                        "%s: stopping %d instances gracefully (send again to stop them at once)",
                        signal.Signals(signum).name,
                        len(self._slots),
                    )
                    first_at = trio.current_time()
                    self._stop(signum)
                elif trio.current_time() - first_at < REPEAT_WINDOW:
                    continue
                else:
                    log.warning("second signal: stopping the instances now")
                    self._forward(signum)

    async def _keep_running(self, slot: _Slot) -> None:
        while not self._stopping.is_set():
            started = trio.current_time()
            code = await self._run_child(slot)
            ran = trio.current_time() - started
            pid = slot.process.pid if slot.process is not None else 0
            if self._stopping.is_set():
                if code != 0:
                    log.warning("instance %d (pid %d) %s", slot.index, pid, _exit_text(code))
                    self._failed = True
                return
            if code != 0 and not slot.ever_ready:
                log.error(
                    "instance %d (pid %d) %s before it was ready (its log is above); "
                    "stopping the others",
                    slot.index,
                    pid,
                    _exit_text(code),
                )
                self._failed = True
                self._stop(signal.SIGTERM)
                return
            slot.failures = 1 if ran >= STABLE_SECONDS else slot.failures + 1
            delay = restart_delay(slot.failures)
            log.warning(
                "instance %d (pid %d) %s after %.1f s; restarting it in %g s",
                slot.index,
                pid,
                _exit_text(code),
                ran,
                delay,
            )
            with trio.move_on_after(delay):
                await self._stopping.wait()

    async def _run_child(self, slot: _Slot) -> int:
        """Start the slot's child, wait for it to exit; its return code."""
        ours, theirs = socket.socketpair()
        with ours:
            try:
                process = await trio.lowlevel.open_process(
                    [
                        sys.executable,
                        "-m",
                        "z4j",
                        "brain",
                        f"--supervisor-fd={theirs.fileno()}",
                        f"--supervised-instance={slot.index}",
                    ],
                    env=slot.env,
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                )
            finally:
                theirs.close()  # the child's copy is the only one left: EOF when it dies
            slot.process = process
            log.info(
                "instance %d started (pid %d, buffer %s)", slot.index, process.pid, slot.buffer_path
            )
            if self._stopping.is_set():
                process.send_signal(signal.SIGTERM)  # started while a stop was under way
            try:
                async with trio.open_nursery() as nursery:
                    link_closed = trio.Event()
                    nursery.start_soon(self._read_link, slot, process, ours, link_closed)
                    nursery.start_soon(self._kill_when_overdue, slot, process)
                    await process.wait()
                    with trio.move_on_after(1.0):  # a "ready" still unread
                        await link_closed.wait()
                    nursery.cancel_scope.cancel()
            finally:
                if process.returncode is None:  # we are being cancelled: do not orphan it
                    with trio.CancelScope(shield=True):
                        process.send_signal(signal.SIGTERM)
                        with trio.move_on_after(self._grace + KILL_MARGIN):
                            await process.wait()
                        if process.returncode is None:
                            process.kill()
                            await process.wait()
        assert process.returncode is not None
        return process.returncode

    async def _read_link(
        self, slot: _Slot, process: trio.Process, sock: socket.socket, closed: trio.Event
    ) -> None:
        link = trio.socket.from_stdlib_socket(sock)
        pending = b""
        try:
            while chunk := await link.recv(4096):
                pending += chunk
                while b"\n" in pending:
                    line, _, pending = pending.partition(b"\n")
                    words = line.decode(errors="replace").split()
                    if words[:1] == ["ready"]:
                        slot.ever_ready = True
                        log.info(
                            "instance %d ready (pid %d, instance id %s)",
                            slot.index,
                            process.pid,
                            words[1] if len(words) > 1 else "?",
                        )
        except OSError:
            pass
        finally:
            closed.set()

    async def _kill_when_overdue(self, slot: _Slot, process: trio.Process) -> None:
        await self._stopping.wait()
        await trio.sleep_until(self._stop_at + self._grace + KILL_MARGIN)
        log.error(
            "instance %d (pid %d) still running %g s after the stop: killing it",
            slot.index,
            process.pid,
            self._grace + KILL_MARGIN,
        )
        self._failed = True
        process.kill()


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class SupervisorLink:
    """A child's end of the link: say when it serves; stop when the supervisor is gone."""

    def __init__(self, fd: int) -> None:
        os.set_inheritable(fd, False)  # not for anything this process starts
        self._sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))

    async def ready(self, instance_id: uuid.UUID) -> None:
        message = f"ready {instance_id}\n".encode()
        try:
            while message:
                message = message[await self._sock.send(message) :]
        except OSError:
            pass  # the supervisor is gone: watch() sees the EOF

    async def watch(self, shutdown: trio.Event) -> None:
        """Return once the supervisor is gone, having set ``shutdown``."""
        try:
            while await self._sock.recv(64):
                pass  # the supervisor never writes; read to EOF
        except OSError:
            pass
        if not shutdown.is_set():
            log.warning("the supervisor is gone: stopping gracefully")
            shutdown.set()

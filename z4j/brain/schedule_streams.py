"""Grant each scheduler's stream to a worker that can publish it: ``schedule.external.activate``.

A z4j-bare (1.13) scheduler adapter publishes nothing until the brain
grants it a stream epoch (z4j.schedules). This service does, for every
(project, scheduler) that a connected worker can publish: its hello names
the scheduler (``schedulers``), advertises a stable snapshot for it
(``external_schedule_stable_snapshot_v1`` in its capabilities) and speaks
the protocol (``external_schedule_protocol_v1`` in ``runtime_features``).

- **Ids.** The stream id is fixed per project and scheduler (a UUID5, the
  same on every brain: an adapter refuses a new epoch on another stream).
  Each grant is the next ``epoch_number`` with a fresh ``epoch_uuid``; the
  adapter instance id names the worker (``<agent id>/<worker id>``).
- **When.** A grant is made when a worker connects (the agent endpoint's
  ``on_worker`` hook wakes this service) and by a sweep every
  SWEEP_SECONDS on the leader: to the stream's holder again when it
  reconnected since its grant (a restarted process has lost its epoch, and
  must be given a newer one), or when its activation failed (after a
  back-off); to another live candidate when the holder is gone. One holder
  at a time: a second worker publishing the same scheduler of a project is
  left alone while the first is connected.
- **Once.** The grant is a compare-and-set on the epoch in the store, so
  replicas and repeated notices make one grant per connection; the
  activation goes to that worker only (``target.worker_id``), and a
  previous one still waiting is cancelled.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import trio

from ..protocol.agent.untrusted import loggable
from ..schedules import RUNTIME_FEATURE, SNAPSHOT_CAPABILITY, activation
from ..stats import ThrottledLog
from ..store.base import ScheduleStream, Store, WorkerInfo
from .lifetime import until
from .links import CommandDesk, CommandError

__all__ = ["ACTIVATE", "ScheduleStreams", "publishes"]

log = logging.getLogger("z4j.schedules")

ACTIVATE = "schedule.external.activate"
SWEEP_SECONDS = 15.0
NOTICE_DELAY_SECONDS = 0.5  # a connect is noticed before its worker row is stored
RETRY_SECONDS = 5.0  # a failed activation is granted again after this, doubling to
RETRY_CAP_SECONDS = 300.0
ACTIVATE_TIMEOUT_SECONDS = 60
_FAILED = ("failed", "timeout", "cancelled")
_RECONNECT_SLACK = 0.001  # seconds: the same connect time, read back from the store

Key = tuple[uuid.UUID, str]  # (project, scheduler)


def publishes(worker: WorkerInfo) -> list[str]:
    """The schedulers a worker can publish under a grant."""
    if RUNTIME_FEATURE not in worker.runtime_features:
        return []
    return [s for s in worker.schedulers if SNAPSHOT_CAPABILITY in worker.capabilities.get(s, ())]


class ScheduleStreams:
    def __init__(
        self,
        store: Store,
        commands: CommandDesk,
        *,
        store_ready: trio.Event,
        is_leader: Callable[[], bool] = lambda: True,
        sweep_seconds: float = SWEEP_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``is_leader``: whether this replica sweeps every worker (notices of
        workers connected here are handled on any replica)."""
        self._store = store
        self._commands = commands
        self._store_ready = store_ready
        self._is_leader = is_leader
        self._sweep_seconds = sweep_seconds
        self._clock = clock
        self._noticed: set[uuid.UUID] = set()
        self._wake = trio.Event()
        self._failures: dict[Key, int] = {}
        self._log = ThrottledLog(log)

    def worker_changed(self, agent_id: uuid.UUID, worker_id: str, state: str) -> None:
        """A worker of ``agent_id`` connected or went away (the agent endpoint's hook)."""
        self._noticed.add(agent_id)
        self._wake.set()

    async def serve(
        self, *, shutdown: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Grant on notices and on the sweep, until ``shutdown`` (nothing to hand
        over: grants live in the store)."""
        async with until(shutdown):
            task_status.started()
            await self._store_ready.wait()
            next_sweep = trio.current_time()
            while True:
                with trio.move_on_at(next_sweep):
                    await self._wake.wait()
                if self._wake.is_set():
                    self._wake = trio.Event()
                    await trio.sleep(NOTICE_DELAY_SECONDS)
                noticed, self._noticed = self._noticed, set()
                sweep = trio.current_time() >= next_sweep
                if sweep:
                    next_sweep = trio.current_time() + self._sweep_seconds
                try:
                    if sweep and self._is_leader():
                        await self.run_once()
                    elif noticed:
                        await self.run_once(noticed)
                except Exception as exc:
                    self._noticed |= noticed
                    self._log.warning("round", "granting schedule streams failed: %s", exc)

    async def run_once(self, agents: set[uuid.UUID] | None = None) -> int:
        """Grant what needs granting (only streams that ``agents``' workers can
        publish or hold, when given); how many grants were made."""
        now = self._clock()
        projects = {a.id: a.project_id for a in await self._store.list_agents() if not a.revoked}
        candidates: dict[Key, list[WorkerInfo]] = {}
        for worker in await self._store.list_workers():
            project = projects.get(worker.agent_id)
            if worker.disconnected_at is None and project is not None:
                for scheduler in publishes(worker):
                    candidates.setdefault((project, scheduler), []).append(worker)
        streams = {(s.project_id, s.scheduler): s for s in await self._store.schedule_streams()}
        granted = 0
        for key in sorted(candidates, key=lambda k: (str(k[0]), k[1])):
            live = sorted(candidates[key], key=lambda w: (w.connected_at, str(w.agent_id)))
            stream = streams.get(key)
            if agents is not None and not (
                any(w.agent_id in agents for w in live)
                or (stream is not None and stream.agent_id in agents)
            ):
                continue
            chosen = await self._choose(key, stream, live, now)
            if chosen is None:
                continue
            worker, retry = chosen
            if retry:
                self._failures[key] = self._failures.get(key, 0) + 1
            else:
                self._failures.pop(key, None)
            if await self._grant(key, stream, worker, now):
                granted += 1
        return granted

    async def _choose(
        self, key: Key, stream: ScheduleStream | None, live: list[WorkerInfo], now: float
    ) -> tuple[WorkerInfo, bool] | None:
        """The worker to grant the stream to now, if any, and whether that
        retries a failed activation."""
        if stream is None:
            return live[0], False
        holder = next(
            (w for w in live if (w.agent_id, w.worker_id) == (stream.agent_id, stream.worker_id)),
            None,
        )
        if holder is None:  # gone, or no longer publishing it
            return live[0], False
        if holder.connected_at > stream.worker_connected_at + _RECONNECT_SLACK:
            return holder, False  # reconnected (maybe restarted) since its grant
        if await self._failed(key, stream, now):
            return holder, True
        return None

    async def _failed(self, key: Key, stream: ScheduleStream, now: float) -> bool:
        """Whether the grant's activation failed, long enough ago to try again."""
        ended = stream.granted_at
        if stream.command_id is not None:
            record = await self._store.get_command(stream.command_id)
            if record is not None and record.state not in _FAILED:
                return False
            if record is not None and record.finished_at is not None:
                ended = record.finished_at
        failures = self._failures.get(key, 0)
        wait = min(RETRY_CAP_SECONDS, RETRY_SECONDS * 2.0 ** max(0, failures - 1))
        return now - ended >= wait

    async def _grant(
        self, key: Key, stream: ScheduleStream | None, worker: WorkerInfo, now: float
    ) -> bool:
        project, scheduler = key
        granted = await self._store.grant_schedule_stream(
            project,
            scheduler,
            agent_id=worker.agent_id,
            worker_id=worker.worker_id,
            worker_connected_at=worker.connected_at,
            expected_epoch=0 if stream is None else stream.epoch_number,
            at=now,
        )
        if granted is None:
            return False  # granted meanwhile (another replica, another notice)
        if stream is not None and stream.command_id is not None:
            await self._commands.cancel(stream.command_id, actor="schedules")
        try:
            record = await self._commands.send(
                worker.agent_id,
                ACTIVATE,
                target={"scheduler": scheduler, "worker_id": worker.worker_id},
                parameters=activation(granted),
                timeout_seconds=ACTIVATE_TIMEOUT_SECONDS,
                issued_by="schedules",
            )
        except CommandError as exc:  # revoked meanwhile: the grant waits for a retry
            self._log.warning("send", "cannot activate %s: %s", loggable(scheduler), exc)
            return True
        await self._store.schedule_stream_command(
            project, scheduler, granted.epoch_number, record.id
        )
        log.info(
            "granted %s of project %s, epoch %d, to worker %s of agent %s",
            loggable(scheduler),
            project,
            granted.epoch_number,
            loggable(worker.worker_id),
            worker.agent_id,
        )
        return True

"""Tasks that went quiet: ask their agent what became of them, and apply the answer.

A task can stay "started" for ever in the projection when its last events
were lost before they reached an agent's spool (a worker killed mid-task,
an event the engine never emitted). Every Z4J_TASK_RECONCILE_SECONDS, on
the leader only, the reconciler counts the tasks received or started longer
ago than Z4J_TASK_STUCK_SECONDS (the ``z4j_tasks_stuck`` gauge), and sends
``reconcile_task`` for a few of them to the agent the projection names. The
z4j adapters answer with the engine's own view (``engine_state``: pending,
started, success, failure or unknown); a finished one is folded into the
task as an event of its own (``reconcile:<command id>``), so the fold stays
idempotent and a late real event still counts.

It also copies the workers' last reported queue depths into the
``z4j_queue_depth`` gauge, since /metrics is rendered without the store.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import trio

from ..stats import BrainStats, ThrottledLog
from ..store.base import Store, TaskFilter
from ..tasks import TaskEvent
from .http.queues_api import queue_health
from .lifetime import until
from .links import CommandDesk, CommandError

__all__ = ["ASK_PER_ROUND", "Reconciler"]

log = logging.getLogger("z4j.reconciler")

ASK_PER_ROUND = 20  # reconcile_task commands one round sends at most
_ANSWERS = {"success": "task.succeeded", "failure": "task.failed"}


class Reconciler:
    def __init__(
        self,
        store: Store,
        commands: CommandDesk,
        stats: BrainStats,
        *,
        store_ready: trio.Event,
        stuck_seconds: float,
        interval: float,
        is_leader: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._commands = commands
        self._stats = stats
        self._store_ready = store_ready
        self._stuck_seconds = stuck_seconds
        self._interval = interval
        self._is_leader = is_leader
        self._clock = clock
        self._asked: dict[tuple[uuid.UUID, str, str], float] = {}  # task -> when asked
        self._pending: dict[uuid.UUID, tuple[uuid.UUID, uuid.UUID, str, str]] = {}
        self._log = ThrottledLog(log)

    async def serve(
        self, *, shutdown: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """A round every interval while this replica leads, until ``shutdown``
        (questions still open are asked again by the next leader)."""
        async with until(shutdown):
            task_status.started()
            await self._store_ready.wait()
            while True:
                if self._is_leader():
                    try:
                        await self.run_once()
                    except Exception as exc:
                        self._log.warning("round", "reconciling tasks failed, will retry: %s", exc)
                await trio.sleep(self._interval)

    async def run_once(self) -> int:
        """One round: gauges, answers to apply, new questions. Returns questions sent."""
        now = self._clock()
        await self._read_depths()
        await self._apply_answers()
        before = now - self._stuck_seconds
        self._stats.tasks.stuck = await self._store.stuck_counts(before=before)
        asked = 0
        for state in ("started", "received"):
            if asked >= ASK_PER_ROUND:
                break
            quiet = await self._store.list_tasks(
                TaskFilter(state=state, until=before, limit=ASK_PER_ROUND)
            )
            for task in quiet:
                key = (task.project_id, task.engine, task.task_id)
                if task.agent_id is None or now - self._asked.get(key, -1e18) < self._stuck_seconds:
                    continue
                try:
                    record = await self._commands.send(
                        task.agent_id,
                        "reconcile_task",
                        target={"engine": task.engine, "task_id": task.task_id},
                        parameters={"engine": task.engine, "task_id": task.task_id},
                        issued_by="reconciler",
                    )
                except CommandError as exc:  # a revoked agent: nobody to ask
                    self._log.warning("send", "cannot reconcile %s: %s", task.task_id, exc)
                    self._asked[key] = now
                    continue
                self._asked[key] = now
                self._pending[record.id] = (task.project_id, task.agent_id, *key[1:])
                asked += 1
                if asked >= ASK_PER_ROUND:
                    break
        self._forget(now)
        return asked

    async def _apply_answers(self) -> None:
        for command_id, (project_id, agent_id, engine, task_id) in list(self._pending.items()):
            record = await self._store.get_command(command_id)
            if record is None or record.state in ("pending", "dispatched"):
                continue
            del self._pending[command_id]
            if record.state != "completed" or not isinstance(record.result, dict):
                continue
            kind = _ANSWERS.get(str(record.result.get("engine_state")))
            if kind is None:  # pending, started, unknown: nothing to apply
                continue
            data: dict[str, Any] = {"reconciled": True}
            if kind == "task.failed" and record.result.get("exception"):
                data["traceback"] = str(record.result["exception"])  # celery: the traceback
            event = TaskEvent(
                project_id=project_id.bytes,
                agent_id=agent_id.bytes,
                worker_id=record.worker_id,
                event_id=f"reconcile:{command_id}",
                kind=kind,
                engine=engine,
                task_id=task_id,
                at=record.finished_at if record.finished_at is not None else self._clock(),
                data=data,
            )
            await self._store.fold_task_events([event])
            log.info("reconciled %s task %s: %s", engine, task_id, kind)

    async def _read_depths(self) -> None:
        depths: dict[tuple[str, str], int] = {}
        for worker in await self._store.list_workers():
            if worker.disconnected_at is None:
                for engine, health in queue_health(worker).items():
                    for queue, depth in health["depths"].items():
                        depths[engine, queue] = max(depth, depths.get((engine, queue), 0))
        self._stats.tasks.queue_depth = depths

    def _forget(self, now: float) -> None:
        """Questions asked longer ago than the threshold may be asked again."""
        self._asked = {k: t for k, t in self._asked.items() if now - t < self._stuck_seconds}

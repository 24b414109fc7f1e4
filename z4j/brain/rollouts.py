"""The rollout task: advance running OpAMP rollouts, on the leader only.

Every ``interval`` (1 s by default), or at once when `poke`d (a rollout was
created or resumed), while this replica holds the leader lease: each
running rollout's next step is decided by z4j.opamp_rollouts from the
statuses of its assigned agents, and taken in the store (assign the next
stage, halt, complete). A stage's agents are then nudged (`OpampNudges`),
so WebSocket agents get their configuration at once; HTTP agents read it
on their next poll. Each rollout that changed (a step, or its counts) is
reported through ``on_change`` as its API JSON, for the dashboard.

Two leaders for a moment (a lease handed over) cannot assign a stage twice:
the store assigns only from the stage it expects, and halts or completes
only a running rollout (store/opamp_rollouts.py). The task also sets the
rollout gauges (`BrainStats.opamp_rollouts`, ...), so only the leader's
/metrics shows them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import trio

from ..opamp_rollouts import Assign, Complete, Halt, Progress, Wait, decide, stage_ends
from ..stats import BrainStats, ThrottledLog
from ..store.base import OpampRollout, Store
from .http.opamp_rollouts_api import rollout_json
from .lifetime import until
from .links import OpampNudges

__all__ = ["ROLLOUT_INTERVAL_SECONDS", "Rollouts"]

POKED_ROUND_SECONDS = 0.2  # a poked round waits this long for the burst to end

log = logging.getLogger("z4j.opamp.rollouts")

ROLLOUT_INTERVAL_SECONDS = 1.0
ACTOR = "rollouts"  # the audit actor of a halt or completion the task decides


def _ignore(item: dict[str, Any]) -> None:
    pass


class Rollouts:
    def __init__(
        self,
        store: Store,
        stats: BrainStats,
        *,
        store_ready: trio.Event,
        nudges: OpampNudges | None = None,
        on_change: Callable[[dict[str, Any]], None] = _ignore,
        is_leader: Callable[[], bool] = lambda: True,
        interval: float = ROLLOUT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``on_change``: called with a rollout's API JSON when it moved (the
        dashboard's ``opamp_rollout`` message)."""
        self._store = store
        self._stats = stats
        self._store_ready = store_ready
        self._nudges = nudges
        self._on_change = on_change
        self._is_leader = is_leader
        self._interval = interval
        self._clock = clock
        self._wake = trio.Event()
        self._shown: dict[uuid.UUID, OpampRollout] = {}  # what on_change last had
        self._log = ThrottledLog(log)

    def poke(self) -> None:
        """Run a round now rather than at the next interval."""
        self._wake.set()

    async def serve(
        self, *, shutdown: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """A round every interval (or when poked) while this replica leads, until ``shutdown``."""
        async with until(shutdown):
            task_status.started()
            await self._store_ready.wait()
            while True:
                if self._is_leader():
                    try:
                        await self.run_once()
                    except Exception as exc:
                        self._log.warning("run", "rollouts round failed, will retry: %s", exc)
                else:
                    self._shown.clear()  # the next leader shows what it finds
                with trio.move_on_after(self._interval):
                    await self._wake.wait()
                    # Pokes come in bursts (each agent's acknowledgement):
                    # one round for a burst, a few a second at most.
                    await trio.sleep(POKED_ROUND_SECONDS)
                self._wake = trio.Event()

    async def run_once(self) -> None:
        """Advance every running rollout as far as it can go now; set the gauges."""
        running = await self._store.list_opamp_rollouts(state="running")
        latest = [await self._advance(rollout) for rollout in running]
        changed = [r for r in latest if self._shown.get(r.id) != r]
        if changed:
            names = {p.id: p.name for p in await self._store.list_projects()}
            for rollout in changed:
                self._on_change(rollout_json(rollout, names.get(rollout.project_id)))
        self._shown = {r.id: r for r in latest if r.state == "running"}
        by_state, statuses = await self._store.opamp_gauges()
        self._stats.opamp_rollouts = by_state
        self._stats.opamp_config_status = statuses
        self._stats.opamp_rollout_stage = {str(r.id): r.stage for r in self._shown.values()}

    async def _advance(self, rollout: OpampRollout) -> OpampRollout:
        """Take steps until the rollout waits or stops; its last record."""
        for _ in range(rollout.stages + 2):  # each stage at most once, then complete
            if rollout.state != "running":
                return rollout
            step = decide(
                stage=rollout.stage,
                ends=stage_ends(rollout.targets, rollout.canary_percent, rollout.batch_size),
                progress=Progress.of(rollout.counts),
                failure_threshold_percent=rollout.failure_threshold_percent,
                accepted_failures=rollout.accepted_failures,
            )
            now = self._clock()
            if isinstance(step, Wait):
                return rollout
            if isinstance(step, Assign):
                uids = await self._store.assign_opamp_rollout_stage(
                    rollout.id, stage=step.stage, end=step.end, now=now
                )
                if uids and self._nudges is not None:
                    self._nudges.changed(rollout.project_id, uids)
                if uids is not None:
                    log.info(
                        "rollout %s: stage %d of %d assigned to %d agents",
                        rollout.id,
                        step.stage,
                        rollout.stages,
                        len(uids),
                    )
            elif isinstance(step, Halt | Complete):
                to_state = "halted" if isinstance(step, Halt) else "completed"
                reason = step.reason if isinstance(step, Halt) else None
                try:
                    await self._store.transition_opamp_rollout(
                        rollout.id, to_state=to_state, reason=reason, actor=ACTOR, now=now
                    )
                except (LookupError, ValueError):
                    pass  # moved (or gone) meanwhile: the next round sees it as it is
                else:
                    log.info(
                        "rollout %s %s%s", rollout.id, to_state, f": {reason}" if reason else ""
                    )
            found = await self._store.get_opamp_rollout(rollout.id)
            if found is None:
                return rollout
            rollout = found
        return rollout

"""OpAMP rollouts in the store and the leader's rollout task, on both stores.

The task (brain/rollouts.py) is driven round by round (`run_once`) with a
fixed clock; agents' acknowledgements are written as the transport writes
them (`write_opamp_states`). Covered: targets fixed by the selector at
the start (capability, project, later agents), stages assigned once each
with their agents nudged, the halt past the threshold mid-stage, resume
accepting the failures so far, completion, superseded targets, the
compare-and-set against a second leader, the gauges, the dashboard JSON,
and every audit row.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from z4j.brain.links import OpampNudges
from z4j.brain.rollouts import Rollouts
from z4j.config import Config
from z4j.opamp_rollouts import order_targets
from z4j.stats import BrainStats
from z4j.store import Store, store_for
from z4j.store.base import OpampAgent, OpampConfig
from z4j.store.opamp import StateWrite, StatusWrite

NOW = 1_000_000.0
FILES = {"collector.yaml": {"body": "receivers: {}\n", "content_type": "text/yaml"}}
HASH = "ab" * 32
PROD = {"service.name": "checkout", "deployment.environment": "prod"}


@asynccontextmanager
async def opened(config: Config) -> AsyncIterator[Store]:
    store = store_for(config)
    try:
        await store.migrate()
        yield store
    finally:
        await store.aclose()


def uid(n: int) -> bytes:
    return n.to_bytes(16, "big")


async def add_agent(
    store: Store,
    project_id: uuid.UUID,
    n: int,
    *,
    identifying: dict[str, Any],
    non_identifying: dict[str, Any] | None = None,
    accepts: bool = True,
    reported: dict[str, Any] | None = None,
) -> None:
    agent = OpampAgent(
        project_id=project_id,
        instance_uid=uid(n).hex(),
        identifying=identifying,
        non_identifying=non_identifying or {},
        capabilities=["REPORTS_STATUS", *(["ACCEPTS_REMOTE_CONFIG"] if accepts else [])],
        health=None,
        effective_config=None,
        remote_config_status=reported,
        sequence_num=0,
        transport="http",
        first_seen=NOW,
        last_seen=NOW,
        disconnected_at=None,
    )
    await store.write_opamp_states([StateWrite(agent, None, None)])


async def report(store: Store, project_id: uuid.UUID, uids: list[bytes], status: str) -> None:
    """The agents' acknowledgements, as the transport writes them."""
    for u in uids:
        moved = StatusWrite(
            project_id=project_id,
            instance_uid=u,
            config_hash=bytes.fromhex(HASH),
            status=status,
            error_message="bad yaml" if status == "failed" else "",
            now=NOW,
        )
        assert await store.write_opamp_states([StateWrite(None, None, moved)]) == 1


def nudged(nudges: OpampNudges) -> set[tuple[uuid.UUID, bytes]]:
    """The agents the task said were changed here (taken, as the WebSocket endpoint takes them)."""
    wanted = nudges.take_wanted()
    assert all(wanted.values())  # made here, not announced by another replica
    return set(wanted)


async def assigned_uids(store: Store, project_id: uuid.UUID, rollout_id: uuid.UUID) -> set[bytes]:
    return {
        bytes.fromhex(a.instance_uid)
        for a in await store.list_opamp_agents(project_id)
        if (c := await store.get_opamp_config(project_id, bytes.fromhex(a.instance_uid)))
        is not None
        and c.rollout_id == rollout_id
    }


async def test_a_rollout_goes_in_stages_halts_past_the_threshold_resumes_and_completes(
    config: Config,
) -> None:
    async with opened(config) as store:
        edge = await store.create_project("edge")
        other = await store.create_project("other")
        # 20 targets: prod checkout agents accepting remote config (one of
        # them matches by a non-identifying attribute); one already runs it.
        for n in range(19):
            await add_agent(store, edge.id, n, identifying=PROD)
        await add_agent(
            store,
            edge.id,
            19,
            identifying={"service.name": "checkout"},
            non_identifying={"deployment.environment": "prod"},
            reported={"last_remote_config_hash": HASH, "status": "applied", "error_message": ""},
        )
        # Not targets: no capability, another environment, another project.
        await add_agent(store, edge.id, 20, identifying=PROD, accepts=False)
        await add_agent(store, edge.id, 21, identifying={**PROD, "deployment.environment": "dev"})
        await add_agent(store, other.id, 22, identifying=PROD)

        rollout = await store.create_opamp_rollout(
            uuid.uuid4(),
            project_id=edge.id,
            selector=PROD,
            files=FILES,
            config_hash=HASH,
            canary_percent=10,
            batch_size=5,
            failure_threshold_percent=20,
            actor="api",
            now=NOW,
        )
        assert (rollout.state, rollout.stage, rollout.stages, rollout.targets) == (
            "running",
            0,
            5,
            20,
        )
        # An agent that appears later does not join it.
        await add_agent(store, edge.id, 23, identifying=PROD)

        stats = BrainStats()
        nudges = OpampNudges()
        shown: list[dict[str, Any]] = []
        ready = trio.Event()
        ready.set()
        task = Rollouts(
            store,
            stats,
            store_ready=ready,
            nudges=nudges,
            on_change=shown.append,
            clock=lambda: NOW,
        )

        # Round 1: the canary (2 of 20, the first in stage order), nudged, shown.
        await task.run_once()
        canary = await assigned_uids(store, edge.id, rollout.id)
        ordered = order_targets(rollout.id, [uid(n) for n in range(20)])
        assert canary == set(ordered[:2]) and nudged(nudges) == {(edge.id, u) for u in canary}
        assert shown[-1]["stage"] == 1 and shown[-1]["project"] == "edge"
        assert shown[-1]["counts"]["pending"] + shown[-1]["counts"]["applied"] == 2
        config_row = await store.get_opamp_config(edge.id, next(iter(canary)))
        assert config_row is not None and config_row.created_by == f"rollout:{rollout.id}"
        assert config_row.files == FILES
        assert stats.opamp_rollouts == {"running": 1}
        assert stats.opamp_rollout_stage == {str(rollout.id): 1}

        # Nothing reported: no new stage, nothing shown again.
        count = len(shown)
        await task.run_once()
        assert len(shown) == count and nudged(nudges) == set()

        # The canary applies: stage 2 (5 more).
        await report(store, edge.id, sorted(canary), "applied")
        await task.run_once()
        second = await assigned_uids(store, edge.id, rollout.id) - canary
        assert len(second) == 5 and nudged(nudges) == {(edge.id, u) for u in second}
        # One failure in 7 (14%): under the threshold, stage 3 follows.
        failing = sorted(second)
        await report(store, edge.id, failing[:1], "failed")
        await report(store, edge.id, failing[1:], "applied")
        await task.run_once()
        third = await assigned_uids(store, edge.id, rollout.id) - canary - second
        assert len(third) == 5
        # Two more fail (3 of 12: 25%): halted at once, the others still pending.
        await report(store, edge.id, sorted(third)[:2], "failed")
        await task.run_once()
        halted = await store.get_opamp_rollout(rollout.id)
        assert halted is not None and halted.state == "halted" and halted.stage == 3
        assert halted.halted_reason == "3 of 12 assigned agents failed: over the 20% threshold"
        assert halted.counts["failed"] == 3 and halted.counts["pending"] >= 2
        assert shown[-1]["state"] == "halted" and shown[-1]["halted_reason"]
        assert stats.opamp_rollouts == {"halted": 1} and stats.opamp_rollout_stage == {}
        assert stats.opamp_config_status["failed"] == 3
        # Halted: nothing assigned, however many rounds.
        await report(store, edge.id, sorted(third)[2:], "applied")
        await task.run_once()
        assert len(await assigned_uids(store, edge.id, rollout.id)) == 12

        # Resumed: the 3 failures are accepted; stages 4 and 5 follow.
        resumed = await store.transition_opamp_rollout(
            rollout.id, to_state="running", actor="api", now=NOW
        )
        assert (resumed.state, resumed.accepted_failures, resumed.halted_reason) == (
            "running",
            3,
            None,
        )
        reported = canary | second | third
        for _ in range(2):
            await task.run_once()
            pending = await assigned_uids(store, edge.id, rollout.id) - reported
            assert len(pending) in (5, 3)
            await report(store, edge.id, sorted(pending), "applied")
            reported |= pending
        await task.run_once()
        done = await store.get_opamp_rollout(rollout.id)
        assert done is not None and (done.state, done.stage, done.assigned) == ("completed", 5, 20)
        assert done.counts == {
            "pending": 0,
            "applying": 0,
            "applied": 17,
            "failed": 3,
            "superseded": 0,
        }
        targeted = await assigned_uids(store, edge.id, rollout.id)
        assert targeted == {uid(n) for n in range(20)}
        assert await store.get_opamp_config(other.id, uid(22)) is None
        assert await store.get_opamp_config(edge.id, uid(23)) is None
        assert shown[-1]["state"] == "completed"
        with pytest.raises(ValueError, match="completed"):
            await store.transition_opamp_rollout(
                rollout.id, to_state="running", actor="api", now=NOW
            )

        audit = await store.list_audit(limit=500)
        mine = [a for a in audit if a.subject == f"opamp-rollout:{rollout.id}"]
        assert [a.action for a in reversed(mine)] == [
            "opamp.rollout.created",
            "opamp.rollout.stage",
            "opamp.rollout.stage",
            "opamp.rollout.stage",
            "opamp.rollout.halted",
            "opamp.rollout.resumed",
            "opamp.rollout.stage",
            "opamp.rollout.stage",
            "opamp.rollout.completed",
        ]
        assert mine[-1].details["targets"] == 20 and mine[-1].details["selector"] == PROD
        assert mine[4].actor == "rollouts" and "3 of 12" in mine[4].details["reason"]
        pushes = [a for a in audit if a.action == "opamp.config.pushed"]
        assert len(pushes) == 20
        assert {a.actor for a in pushes} == {f"rollout:{rollout.id}"}
        assert {a.details["rollout_id"] for a in pushes} == {str(rollout.id)}
        acks = [a for a in audit if a.action in ("opamp.config.applied", "opamp.config.failed")]
        failed = [a for a in acks if a.action == "opamp.config.failed"]
        assert len(failed) == 3 and failed[0].details["error_message"] == "bad yaml"
        assert {a.details["rollout_id"] for a in acks} == {str(rollout.id)}


async def test_superseded_targets_settle_and_a_second_leader_cannot_assign_twice(
    config: Config,
) -> None:
    async with opened(config) as store:
        edge = await store.create_project("edge")
        for n in range(4):
            await add_agent(store, edge.id, n, identifying=PROD)
        rollout = await store.create_opamp_rollout(
            uuid.uuid4(),
            project_id=edge.id,
            selector={},
            files=FILES,
            config_hash=HASH,
            canary_percent=50,
            batch_size=10,
            failure_threshold_percent=0,
            actor="api",
            now=NOW,
        )
        assert rollout.stages == 2
        first = await store.assign_opamp_rollout_stage(rollout.id, stage=1, end=2, now=NOW)
        assert first is not None and len(first) == 2
        # The other leader, a moment late, with the same decision: refused.
        assert await store.assign_opamp_rollout_stage(rollout.id, stage=1, end=2, now=NOW) is None
        # An operator pushes another configuration to one, deletes the other's.
        await store.put_opamp_config(
            OpampConfig(
                project_id=edge.id,
                instance_uid=first[0].hex(),
                config_hash="cd" * 32,
                files=FILES,
                created_at=NOW,
                created_by="api",
                status="pending",
                error_message="",
                status_at=NOW,
            ),
            actor="api",
        )
        assert await store.delete_opamp_config(edge.id, first[1], actor="api")
        found = await store.get_opamp_rollout(rollout.id)
        assert found is not None and found.counts["superseded"] == 2
        ready = trio.Event()
        ready.set()
        await Rollouts(store, BrainStats(), store_ready=ready, clock=lambda: NOW).run_once()
        found = await store.get_opamp_rollout(rollout.id)
        assert found is not None and (found.stage, found.assigned) == (2, 4)

        # Cancelled: no more moves but none; listed by project and state.
        cancelled = await store.transition_opamp_rollout(
            rollout.id, to_state="cancelled", actor="api", now=NOW
        )
        assert cancelled.state == "cancelled"
        with pytest.raises(ValueError):
            await store.transition_opamp_rollout(
                rollout.id, to_state="halted", actor="api", now=NOW
            )
        with pytest.raises(LookupError):
            await store.transition_opamp_rollout(
                uuid.uuid4(), to_state="halted", actor="api", now=NOW
            )
        assert [r.id for r in await store.list_opamp_rollouts(edge.id)] == [rollout.id]
        assert await store.list_opamp_rollouts(edge.id, state="running") == []
        with pytest.raises(LookupError):
            await store.create_opamp_rollout(
                uuid.uuid4(),
                project_id=uuid.uuid4(),
                selector={},
                files=FILES,
                config_hash=HASH,
                canary_percent=10,
                batch_size=1,
                failure_threshold_percent=0,
                actor="api",
                now=NOW,
            )
        # An agent that already runs the configuration shows applied at once,
        # and the rollout completes without waiting for it to report.
        await add_agent(
            store,
            edge.id,
            9,
            identifying={"service.name": "already"},
            reported={"last_remote_config_hash": HASH, "status": "applied", "error_message": ""},
        )
        already = await store.create_opamp_rollout(
            uuid.uuid4(),
            project_id=edge.id,
            selector={"service.name": "already"},
            files=FILES,
            config_hash=HASH,
            canary_percent=100,
            batch_size=1,
            failure_threshold_percent=0,
            actor="api",
            now=NOW,
        )
        await Rollouts(store, BrainStats(), store_ready=ready, clock=lambda: NOW).run_once()
        running = await store.get_opamp_config(edge.id, uid(9))
        assert running is not None and running.status == "applied"
        found = await store.get_opamp_rollout(already.id)
        assert found is not None and found.state == "completed"

        # No targets at all: it completes on the first round.
        empty = await store.create_opamp_rollout(
            uuid.uuid4(),
            project_id=edge.id,
            selector={"service.name": "nothing"},
            files=FILES,
            config_hash=HASH,
            canary_percent=10,
            batch_size=1,
            failure_threshold_percent=0,
            actor="api",
            now=NOW,
        )
        assert (empty.targets, empty.stages) == (0, 0)
        await Rollouts(store, BrainStats(), store_ready=ready, clock=lambda: NOW).run_once()
        found = await store.get_opamp_rollout(empty.id)
        assert found is not None and found.state == "completed"

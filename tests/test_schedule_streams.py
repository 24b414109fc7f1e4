"""ScheduleStreams: who is granted each scheduler's stream, and when (brain/schedule_streams.py).

Rounds are run by hand (`run_once`) over a real store, with the real
command service (no live sessions: commands wait as pending) and a clock
the test moves, so each rule is seen on its own; tests/test_schedules_api.py
runs the service inside a brain.
"""

from __future__ import annotations

import uuid

import trio

from z4j.brain.commands import Commands
from z4j.brain.schedule_streams import ScheduleStreams
from z4j.config import Config
from z4j.store.base import ScheduleStream, Store
from z4j.testing.store import open_store

OWNER = "huey-periodic"
T0 = 1_800_000_000.0
PUBLISHER = {
    "schedulers": [OWNER],
    "capabilities": {OWNER: ["external_schedule_stable_snapshot_v1", "list"]},
    "runtime_features": ["external_schedule_protocol_v1"],
}


class Setup:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.now = [T0]
        self.commands = Commands(store)
        ready = trio.Event()
        ready.set()
        self.streams = ScheduleStreams(
            store, self.commands, store_ready=ready, clock=lambda: self.now[0]
        )
        self.agent = uuid.UUID(int=0)
        self.project = uuid.UUID(int=0)

    async def seed(self) -> None:
        project = await self.store.create_project("p")
        agent = await self.store.create_agent(project.id, "a", b"h" * 32)
        self.project, self.agent = project.id, agent.id

    async def connect(self, worker: str, at: float, **hello: object) -> None:
        await self.store.worker_connected(
            self.agent,
            worker,
            role=None,
            hello={"protocol_version": "2", "worker_id": worker, **PUBLISHER, **hello},
            instance_id=uuid.uuid4(),
            at=at,
        )

    async def stream(self) -> ScheduleStream:
        [stream] = await self.store.schedule_streams()
        return stream

    async def activations(self) -> list[tuple[str, str, int]]:
        """(worker, state, epoch) of every activation command, oldest first."""
        records = await self.store.list_commands(limit=100)
        return [
            (r.target["worker_id"], r.state, r.parameters["epoch_number"])
            for r in reversed(records)
            if r.action == "schedule.external.activate"
        ]


async def test_one_grant_per_connection_and_a_newer_one_after_a_reconnect(config: Config) -> None:
    async with open_store(config) as store:
        s = Setup(store)
        await s.seed()
        await s.connect("w-1", T0)
        assert await s.streams.run_once() == 1
        first = await s.stream()
        assert (first.epoch_number, first.worker_id, first.agent_id) == (1, "w-1", s.agent)
        assert first.adapter_instance_id == f"{s.agent}/w-1"
        assert first.command_id is not None
        [record] = await store.list_commands()
        assert record.target == {"scheduler": OWNER, "worker_id": "w-1"}
        assert record.parameters == {
            "owner": OWNER,
            "source_scope": '{"kind":"scheduler-owner","owner":"huey-periodic","version":1}',
            "stream_id": first.stream_id,
            "epoch_uuid": first.epoch_uuid,
            "epoch_number": 1,
            "adapter_instance_id": f"{s.agent}/w-1",
            "stable_source": True,
        }
        # Again, and on a notice: nothing more for the same connection.
        assert await s.streams.run_once() == 0
        assert await s.streams.run_once({s.agent}) == 0
        # The worker connects again (a restart with the same id, or a reconnect).
        await s.connect("w-1", T0 + 30)
        s.now[0] = T0 + 31
        assert await s.streams.run_once({s.agent}) == 1
        second = await s.stream()
        assert (second.epoch_number, second.stream_id) == (2, first.stream_id)
        assert second.epoch_uuid != first.epoch_uuid
        # The first activation, never delivered, is cancelled.
        assert await s.activations() == [("w-1", "cancelled", 1), ("w-1", "pending", 2)]


async def test_a_failed_activation_is_retried_after_a_growing_back_off(config: Config) -> None:
    async with open_store(config) as store:
        s = Setup(store)
        await s.seed()
        await s.connect("w-1", T0)
        await s.streams.run_once()
        for epoch, wait in ((1, 5.0), (2, 5.0), (3, 10.0), (4, 20.0)):
            stream = await s.stream()
            assert stream.epoch_number == epoch and stream.command_id is not None
            await store.transition_command(
                stream.command_id, from_states=("pending",), to_state="failed", at=s.now[0]
            )
            s.now[0] += wait - 1
            assert await s.streams.run_once() == 0, epoch  # not yet
            s.now[0] += 1
            assert await s.streams.run_once() == 1, epoch
        # Completed: held, and no more grants.
        stream = await s.stream()
        assert stream.command_id is not None
        await store.transition_command(
            stream.command_id, from_states=("pending",), to_state="completed", at=s.now[0]
        )
        s.now[0] += 3600
        assert await s.streams.run_once() == 0


async def test_one_holder_while_it_is_connected_then_another(config: Config) -> None:
    async with open_store(config) as store:
        s = Setup(store)
        await s.seed()
        await s.connect("w-1", T0)
        await s.connect("w-2", T0 + 1)
        # Not publishers: no runtime feature, or no stable snapshot.
        await s.connect("old", T0, runtime_features=[])
        await s.connect("unstable", T0, capabilities={OWNER: ["list"]})
        assert await s.streams.run_once() == 1
        assert (await s.stream()).worker_id == "w-1"  # the longest connected
        assert await s.streams.run_once() == 0
        await store.worker_disconnected(s.agent, "w-1", at=T0 + 5)
        assert await s.streams.run_once({uuid.uuid4()}) == 0  # a notice about others
        assert await s.streams.run_once({s.agent}) == 1
        stream = await s.stream()
        assert (stream.worker_id, stream.epoch_number) == ("w-2", 2)
        # w-1 comes back: w-2 holds the stream while it is connected.
        await s.connect("w-1", T0 + 10)
        assert await s.streams.run_once() == 0
        assert [w for w, _, _ in await s.activations()] == ["w-1", "w-2"]

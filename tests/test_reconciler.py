"""The reconciler: a task that went quiet is asked about, and the engine's answer applied.

A raw agent reports a task started long ago and nothing after; the brain
(with a short stuck threshold) counts it stuck, sends ``reconcile_task`` to
that agent, and folds the answer into the task. The agent answers as the
z4j adapters do (``engine_state``).
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson
import trio

from z4j.config import Config
from z4j.protocol.agent import frames as f
from z4j.testing.agents import admin_token, provision, raw_agent
from z4j.testing.brain import running_brain, wait_until
from z4j.testing.http import http_request


def started_long_ago(task_id: str, n: int) -> f.AgentEvent:
    raw = {
        "id": f"quiet-{task_id}",
        "kind": "task.started",
        "engine": "celery",
        "task_id": task_id,
        "occurred_at": f"2026-12-01T08:00:{n:02d}+00:00",  # days before the test
        "data": {"task_name": "app.slow"},
    }
    return f.AgentEvent(id=raw["id"], kind="task.started", raw=raw)


async def answer_reconciles(
    agent: Any, answers: dict[str, dict[str, Any]], asked: list[str]
) -> None:
    """Answer every reconcile_task as an adapter would: ack, then the engine's view."""
    while True:
        frame = await agent.receive()
        if not isinstance(frame.payload, f.Command):
            continue
        task_id = frame.payload.target["task_id"]
        asked.append(task_id)
        claim = frame.payload.delivery_claim_token
        await agent.send(f.CommandAck(delivery_claim_token=claim), frame_id=frame.id)
        result = {"task_id": task_id, **answers[task_id]}
        await agent.send(
            f.CommandResult(status="success", result=result, delivery_claim_token=claim),
            frame_id=frame.id,
        )


async def test_a_quiet_task_is_asked_about_and_the_answer_applied(config: Config) -> None:
    config = attrs.evolve(config, task_stuck_seconds=60.0, task_reconcile_seconds=0.2)
    token, secret, _ = await provision(config)
    admin = await admin_token(config)
    answers = {
        "done": {"engine_state": "success", "finished_at": None, "exception": None},
        "broke": {"engine_state": "failure", "finished_at": None, "exception": "Traceback: E"},
        "running": {"engine_state": "started", "finished_at": None, "exception": None},
    }
    asked: list[str] = []

    async def task(task_id: str) -> dict[str, Any]:
        reply = await http_request(
            brain.addresses.http,
            "GET",
            f"/api/v1/tasks/celery/{task_id}",
            headers={"Authorization": f"Bearer {admin}"},
        )
        return orjson.loads(reply.body) if reply.status == 200 else {}

    with trio.fail_after(60):
        async with running_brain(config) as brain:
            async with (
                raw_agent(brain.addresses.http, token, secret, prove=True) as agent,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(answer_reconciles, agent, answers, asked)
                events = tuple(started_long_ago(t, n) for n, t in enumerate(answers))
                await agent.send(f.EventBatch(events=events), frame_id="b-1")

                async def settled() -> bool:
                    states = [(await task(t)).get("state") for t in answers]
                    return states == ["succeeded", "failed", "started"]

                await wait_until(settled, timeout=30)
                assert brain.stats.tasks.stuck == {"celery": 1}  # "running" is still stuck
                broke = await task("broke")
                assert broke["traceback"] == "Traceback: E"
                assert sorted(asked[:3]) == sorted(answers)
                # Asked once per threshold, not once per round.
                await trio.sleep(1.0)
                assert sorted(asked) == sorted(answers)
                nursery.cancel_scope.cancel()

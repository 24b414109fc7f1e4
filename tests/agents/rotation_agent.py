"""Run a real z4j-bare 1.13.0 agent that streams until told to stop, for rotation tests.

usage: rotation_agent.py BRAIN_URL TOKEN SECRET FIRST_ID STOP_FILE

Records a task event (ids UUID(int=FIRST_ID), UUID(int=FIRST_ID + 1), ...)
every 50 ms until STOP_FILE exists. Then, still connected, it reads which
of its events are still in its buffer (not yet acknowledged by the brain:
z4j-bare deletes an entry only on the brain's event_batch_ack), stops,
and prints one JSON line: {"emitted": [ids], "unacked": [ids]}. Read
before stopping, "unacked" may hold a few the brain acks a moment later,
so emitted minus unacked is a lower bound of what was acknowledged.
"""

import json
import re
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from z4j_bare import install_agent
from z4j_core.models import CommandResult, Event, EventKind

UUID_TEXT = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class FakeEngine:
    name = "fake"

    def capabilities(self) -> set[str]:
        return {"submit_task"}

    async def submit_task(self, name, *, args=(), kwargs=None, queue=None, eta=None, priority=None):
        return CommandResult(status="success", result={"task_id": "fake-" + name})


def unacked(runtime, emitted: set[str]) -> set[str]:
    """Event ids still in the agent's buffer (read under the buffer's own lock)."""
    buffer = runtime._buffer
    with buffer._lock:
        payloads = [row[0] for row in buffer._conn.execute("SELECT payload FROM entries")]
    found = set()
    for payload in payloads:
        data = payload if isinstance(payload, bytes) else str(payload).encode()
        found.update(m.decode() for m in UUID_TEXT.findall(data))
    return found & emitted


def main() -> None:
    url, token, secret, first, stop_file = sys.argv[1:6]
    runtime = install_agent(
        engines=[FakeEngine()],
        brain_url=url,
        token=token,
        project_id="test-project",
        hmac_secret=secret,
        agent_name="rotation-test",
    )
    project, agent = uuid.uuid4(), uuid.uuid4()  # required by the model; not sent
    emitted: list[str] = []
    n = int(first)
    while not Path(stop_file).exists():
        event_id = uuid.UUID(int=n)
        runtime.record_event(
            Event(
                id=event_id,
                project_id=project,
                agent_id=agent,
                engine="fake",
                task_id=f"t-{n}",
                kind=EventKind.TASK_SUCCEEDED,
                occurred_at=datetime.now(UTC),
                data={"n": n},
            )
        )
        emitted.append(str(event_id))
        n += 1
        time.sleep(0.05)
    left = unacked(runtime, set(emitted))
    runtime.stop()
    print(json.dumps({"emitted": emitted, "unacked": sorted(left)}), flush=True)


if __name__ == "__main__":
    main()

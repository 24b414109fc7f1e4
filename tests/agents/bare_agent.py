"""Run a real z4j-bare 1.13.0 agent (Apache-2.0) against a brain, for tests.

usage: bare_agent.py BRAIN_URL TOKEN SECRET EVENTS SECONDS

Emits EVENTS task events with ids UUID(int=1).. (stable, so a test can count
them), answers commands until SECONDS pass, then stops. z4j-bare needs an
engine adapter; a minimal fake one is enough (it ships none of its own).
"""

import sys
import time
import uuid
from datetime import UTC, datetime

from z4j_bare import install_agent
from z4j_core.models import CommandResult, Event, EventKind


class FakeEngine:
    name = "fake"

    def capabilities(self) -> set[str]:
        return {"submit_task"}

    async def submit_task(self, name, *, args=(), kwargs=None, queue=None, eta=None, priority=None):
        return CommandResult(status="success", result={"task_id": "fake-" + name})


def main() -> None:
    url, token, secret, events, seconds = sys.argv[1:6]
    runtime = install_agent(
        engines=[FakeEngine()],
        brain_url=url,
        token=token,
        project_id="test-project",
        hmac_secret=secret,
        agent_name="bare-test",
    )
    project, agent = uuid.uuid4(), uuid.uuid4()  # required by the model; not sent
    for n in range(int(events)):
        runtime.record_event(
            Event(
                id=uuid.UUID(int=n + 1),
                project_id=project,
                agent_id=agent,
                engine="fake",
                task_id=f"t-{n}",
                kind=EventKind.TASK_SUCCEEDED,
                occurred_at=datetime.now(UTC),
                data={"n": n},
            )
        )
    time.sleep(float(seconds))
    runtime.stop()


if __name__ == "__main__":
    main()

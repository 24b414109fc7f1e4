"""A real z4j-bare agent (the framework-free agent package) connected to a z4j brain.

`z4j agent create --project P NAME` ends with one line for z4j-bare::

    z4j-bare agent: Z4J_BRAIN_URL=http://host:7700 Z4J_TOKEN=... Z4J_PROJECT_ID=... Z4J_HMAC_SECRET=...

Give that line (or the whole output) to this example through the
environment or a file, never on the command line, where every user of the
machine can read it::

    z4j agent create --project demo worker-1 > agent.txt && chmod 600 agent.txt
    Z4J_AGENT_FILE=agent.txt python examples/bare_agent.py

    Z4J_AGENT_LINE="$(z4j agent create --project demo worker-1 | tail -1)" \\
        python examples/bare_agent.py

The four variables themselves (Z4J_BRAIN_URL, Z4J_TOKEN, Z4J_PROJECT_ID,
Z4J_HMAC_SECRET) work too. It reports one task event, answers the brain's
``submit_task`` command with a pretend task id, and runs until Ctrl+C, or
for Z4J_EXAMPLE_SECONDS. Needs ``pip install z4j-bare``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

KEYS = ("Z4J_BRAIN_URL", "Z4J_TOKEN", "Z4J_PROJECT_ID", "Z4J_HMAC_SECRET")
_PAIR = re.compile(r"\b(Z4J_[A-Z_]+)=(\S+)")


def agent_settings(env: dict[str, str]) -> dict[str, str]:
    """The four settings, from Z4J_AGENT_LINE, the file Z4J_AGENT_FILE, or
    the variables themselves (in that order of precedence)."""
    text = env.get("Z4J_AGENT_LINE", "")
    if not text and env.get("Z4J_AGENT_FILE"):
        text = Path(env["Z4J_AGENT_FILE"]).read_text(encoding="utf-8")
    found = {key: value for key, value in _PAIR.findall(text) if key in KEYS}
    settings = {key: found.get(key) or env.get(key, "") for key in KEYS}
    missing = [key for key, value in settings.items() if not value]
    if missing:
        raise SystemExit(
            f"missing {', '.join(missing)}: set Z4J_AGENT_LINE to the 'z4j-bare agent:' line "
            "that `z4j agent create` prints, or Z4J_AGENT_FILE to a file holding it"
        )
    return settings


class PretendEngine:
    """z4j-bare needs a queue engine adapter; this one pretends to run tasks."""

    name = "example"

    def capabilities(self) -> set[str]:
        return {"submit_task"}

    async def submit_task(self, name: str, **_: Any) -> Any:
        from z4j_core.models import CommandResult

        return CommandResult(status="success", result={"task_id": f"example-{name}"})


def main() -> None:
    settings = agent_settings(dict(os.environ))
    try:
        from z4j_bare import install_agent
        from z4j_core.models import Event, EventKind
    except ImportError:
        raise SystemExit("this example needs z4j-bare: pip install z4j-bare") from None

    runtime = install_agent(
        engines=[PretendEngine()],
        brain_url=settings["Z4J_BRAIN_URL"],
        token=settings["Z4J_TOKEN"],
        project_id=settings["Z4J_PROJECT_ID"],
        hmac_secret=settings["Z4J_HMAC_SECRET"],
        agent_name="bare-example",
    )
    runtime.record_event(
        Event(
            id=uuid.uuid4(),
            project_id=uuid.UUID(settings["Z4J_PROJECT_ID"]),
            agent_id=uuid.uuid4(),  # required by the model; the brain knows the agent by its token
            engine="example",
            task_id="example-1",
            kind=EventKind.TASK_SUCCEEDED,
            occurred_at=datetime.now(UTC),
            data={"example": True},
        )
    )
    print(f"z4j-bare agent running against {settings['Z4J_BRAIN_URL']}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    seconds = float(os.environ.get("Z4J_EXAMPLE_SECONDS", "0")) or None
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait(seconds)
    runtime.stop()
    print("stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())

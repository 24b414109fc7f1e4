"""What the suite is pointed at: addresses, credentials, known limits, hooks.

The suite talks to a brain only through its sockets. Three behaviours
cannot be seen from the sockets alone, so they go through optional hooks:

- where events landed (re-sent agent events and acknowledged ingest
  records are stored exactly once): `Hooks.stored_events`;
- minting a command, and reading its state: `Hooks.mint_command`,
  `Hooks.command_state` (operators mint commands out of band);
- revoking the agent: `Hooks.revoke_agent`;
- making an OpAMP server want an agent to run a configuration:
  `Hooks.opamp_config` (operators push configurations out of band).

A rule whose hook is missing is skipped and reported as such.
`shell_hooks` runs command lines, so any server can plug in; `z4j_hooks`
has hooks for our own brain.
"""

from __future__ import annotations

import functools
import json
import shlex
import subprocess
import time
from collections.abc import Callable
from typing import Any

import attrs

__all__ = [
    "AgentTarget",
    "Hooks",
    "IngestTarget",
    "OpampTarget",
    "Timeouts",
    "shell_hooks",
    "wait_for",
]

MiB = 1024 * 1024


@attrs.frozen(kw_only=True)
class AgentTarget:
    """A brain's /ws/agent, an agent's credentials and the limits we were told."""

    host: str
    port: int
    path: str = "/ws/agent"
    token: str
    secret: str
    worker_cap: int | None = 64
    frames_per_second: int | None = None  # rate limits: checked only when known
    events_per_second: int | None = None
    max_idle_wait: float = 40.0  # longest wait for the 4408 check, in seconds

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> AgentTarget:
        """``ws://HOST:PORT[/path]``; the path defaults to ``/ws/agent``."""
        scheme, _, rest = url.partition("://")
        if scheme != "ws" or not rest:
            raise ValueError(f"expected ws://HOST:PORT/ws/agent, got {url!r}")
        address, slash, path = rest.partition("/")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected ws://HOST:PORT/ws/agent, got {url!r}")
        return cls(
            host=host.strip("[]"),
            port=int(port),
            path=f"/{path}" if slash and path else "/ws/agent",
            **kwargs,
        )


@attrs.frozen(kw_only=True)
class IngestTarget:
    """A brain's ingest port and what we were told of its limits."""

    host: str
    port: int
    token: str | None = None
    max_frame_bytes: int = 10 * MiB
    max_inflated_bytes: int | None = None  # checked only when known
    # For the backpressure rule only: a brain whose drains do not run, and
    # the number of payloads its buffer holds. ``fresh``: it held none when
    # the example began, so exactly ``capacity`` payloads must be accepted.
    capacity: int | None = None
    fresh: bool = False


@attrs.frozen(kw_only=True)
class OpampTarget:
    """An OpAMP server's URL, a token it accepts, and what we were told of it.

    ``z4j_policy``: check the rules only z4j promises (`rules.py` names
    them), such as its exact ReportFullState policy.
    """

    scheme: str  # "http" or "https" (the plain HTTP transport)
    host: str
    port: int
    path: str = "/v1/opamp"
    token: str | None = None
    max_message_bytes: int = 10 * MiB
    z4j_policy: bool = False

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> OpampTarget:
        """``http[s]://HOST[:PORT][/path]``; the path defaults to ``/v1/opamp``."""
        scheme, _, rest = url.partition("://")
        if scheme not in ("http", "https") or not rest:
            raise ValueError(f"expected http://HOST:PORT/v1/opamp, got {url!r}")
        address, slash, path = rest.partition("/")
        host, colon, port = address.rpartition(":")
        if not colon or "]" in port:  # no port given
            host, port = address, "443" if scheme == "https" else "80"
        if not host or not port.isdigit():
            raise ValueError(f"expected http://HOST:PORT/v1/opamp, got {url!r}")
        return cls(
            scheme=scheme,
            host=host.strip("[]"),
            port=int(port),
            path=f"/{path}" if slash and path else "/v1/opamp",
            **kwargs,
        )


@attrs.frozen(kw_only=True)
class Timeouts:
    """How long the suite waits for what a correct brain does promptly."""

    reply: float = 10.0  # an ack, a hello_ack, an ingest reply
    close: float = 5.0  # a close after a violation
    delivery: float = 5.0  # a minted command reaching a live worker
    state: float = 5.0  # a command's state after its result
    stored: float = 30.0  # acknowledged events reaching the store
    quiet: float = 0.5  # no stray frame (a second ack) within this long


@attrs.frozen(kw_only=True)
class Hooks:
    """Out-of-band access to the brain. Each is optional; rules needing a missing one skip.

    - ``stored_events()``: every stored event's body (the ingest record or
      agent event object), in any order;
    - ``drained()``: True once nothing acknowledged is still on its way to
      the store; without it the suite waits for the stored set to stop changing;
    - ``mint_command(agent_id, action, parameters)``: the new command's id;
    - ``command_state(command_id)``: its state name (None: unknown id);
    - ``cancel_command(command_id)``: used at the end of an example on the
      commands it minted, so none left pending reaches a later example;
    - ``revoke_agent(agent_id)``;
    - ``opamp_config(instance_uid_hex)``: the OpAMP server should now offer
      that agent a new remote configuration; returns its hash (hex), if known.
    """

    stored_events: Callable[[], list[dict[str, Any]]] | None = None
    drained: Callable[[], bool] | None = None
    mint_command: Callable[[str, str, dict[str, Any]], str] | None = None
    command_state: Callable[[str], str | None] | None = None
    cancel_command: Callable[[str], None] | None = None
    revoke_agent: Callable[[str], None] | None = None
    opamp_config: Callable[[str], str | None] | None = None


def shell_hooks(
    *,
    events: str | None = None,
    mint: str | None = None,
    state: str | None = None,
    revoke: str | None = None,
    opamp_config: str | None = None,
) -> Hooks:
    """Hooks as command lines (split as a shell would, run without one).

    - ``events`` prints the stored events: a JSON array, or one object a line;
    - ``mint`` gets ``{agent_id}``, ``{action}`` and ``{parameters}`` (JSON)
      filled in and prints the command id (as ``z4j command send`` does);
    - ``state`` gets ``{id}`` and prints JSON with a ``state`` field (as
      ``z4j command show`` does);
    - ``revoke`` gets ``{agent_id}``;
    - ``opamp_config`` gets ``{instance_uid}`` (hex) and may print the new
      configuration's hash (hex) as its last line.
    """

    def run(template: str, **fields: str) -> str:
        argv = [part.format(**fields) for part in shlex.split(template)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr.strip()[-500:]}")
        return done.stdout

    def stored_events(template: str) -> list[dict[str, Any]]:
        text = run(template).strip()
        if text.startswith("["):
            rows: list[dict[str, Any]] = json.loads(text)
            return rows
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def mint_command(template: str, agent_id: str, action: str, parameters: dict[str, Any]) -> str:
        out = run(template, agent_id=agent_id, action=action, parameters=json.dumps(parameters))
        return out.strip().splitlines()[-1].strip()

    def command_state(template: str, command_id: str) -> str | None:
        try:
            out = run(template, id=command_id)
        except RuntimeError:
            return None
        found = json.loads(out).get("state")
        return None if found is None else str(found)

    def revoke_agent(template: str, agent_id: str) -> None:
        run(template, agent_id=agent_id)

    def desire_config(template: str, instance_uid: str) -> str | None:
        lines = run(template, instance_uid=instance_uid).strip().splitlines()
        last = lines[-1].strip().lower() if lines else ""
        return last if last and all(c in "0123456789abcdef" for c in last) else None

    return Hooks(
        stored_events=functools.partial(stored_events, events) if events else None,
        mint_command=functools.partial(mint_command, mint) if mint else None,
        command_state=functools.partial(command_state, state) if state else None,
        revoke_agent=functools.partial(revoke_agent, revoke) if revoke else None,
        opamp_config=functools.partial(desire_config, opamp_config) if opamp_config else None,
    )


def wait_for(check: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``check`` (blocking) until it returns something true; its last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)

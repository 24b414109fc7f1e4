"""Agent protocol v2 frames: frozen value objects, structured by cattrs.

Each frame type has a payload class; `Frame` is the envelope around one.
Structuring is strict about types (an int is a JSON int, a string a JSON
string) and lenient about extra keys, which are ignored: newer agents add
fields, and the protocol promises they are never rejected. Events, command
results and registry entries stay plain JSON objects: the brain stores them
as received.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import attrs
import cattrs
from attrs import validators as v

__all__ = [
    "ACTION_MAX_CHARS",
    "AGENT_TO_BRAIN",
    "BRAIN_TO_AGENT",
    "COMMAND_TIMEOUT_MAX_SECONDS",
    "PAYLOADS",
    "PROTOCOL_VERSION",
    "AgentEvent",
    "AgentStatus",
    "Command",
    "CommandAck",
    "CommandResult",
    "Error",
    "EventBatch",
    "EventBatchAck",
    "Frame",
    "Heartbeat",
    "Hello",
    "HelloAck",
    "RegistryDelta",
    "converter",
]

PROTOCOL_VERSION: Final = "2"
MAX_EVENTS_PER_BATCH: Final = 5000
MAX_ERROR_LENGTH: Final = 8192
#: A command's action and timeout as the wire allows them; the REST API
#: checks and publishes the same bounds (z4j/brain/http/limits.py).
ACTION_MAX_CHARS: Final = 80
COMMAND_TIMEOUT_MAX_SECONDS: Final = 3600

JsonObject = dict[str, Any]


def _str_max(n: int) -> Any:
    return _str_between(0, n)


def _str_between(lo: int, hi: int) -> Any:
    """One validator for type and length (every event runs it: kept to one call)."""

    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, str):
            raise TypeError(f"'{attribute.name}' must be a string, not {type(value).__name__}")
        if not lo <= len(value) <= hi:
            raise ValueError(
                f"'{attribute.name}' must be {lo} to {hi} characters long, not {len(value)}"
            )

    return check


def _opt_str_max(n: int) -> Any:
    return v.optional([v.instance_of(str), v.max_len(n)])


@attrs.frozen(kw_only=True)
class Hello:
    """First frame from an agent (unsigned): who is connecting."""

    protocol_version: str = attrs.field(validator=_str_max(40))
    agent_version: str = attrs.field(default="", validator=_str_max(40))
    framework: str = attrs.field(default="", validator=_str_max(40))
    engines: tuple[str, ...] = ()
    schedulers: tuple[str, ...] = ()
    capabilities: JsonObject = attrs.field(factory=dict)
    host: JsonObject = attrs.field(factory=dict)
    worker_id: str | None = attrs.field(default=None, validator=_opt_str_max(128))
    worker_role: str | None = attrs.field(default=None, validator=_opt_str_max(32))
    worker_pid: int | None = None
    worker_started_at: str | None = None
    runtime_features: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class HelloAck:
    """The brain's answer to hello (unsigned): the session's identity."""

    protocol_version: str
    brain_version: str
    agent_id: str = attrs.field(validator=_str_max(64))
    project_id: str = attrs.field(validator=_str_max(64))
    session_id: str = attrs.field(validator=_str_max(64))
    heartbeat_interval_seconds: int = attrs.field(default=10, validator=[v.ge(1), v.le(3600)])
    max_frame_size_bytes: int = attrs.field(
        default=1024 * 1024, validator=[v.ge(1024), v.le(64 * 1024 * 1024)]
    )


@attrs.frozen(kw_only=True)
class AgentEvent:
    """One event: its ``id`` is its identity (re-sent batches repeat it)."""

    id: str = attrs.field(validator=_str_between(1, 128))
    kind: str = attrs.field(validator=_str_between(1, 128))
    raw: JsonObject  # the event object as received, stored as its body


@attrs.frozen(kw_only=True)
class EventBatch:
    events: tuple[AgentEvent, ...] = attrs.field(validator=v.max_len(MAX_EVENTS_PER_BATCH))


@attrs.frozen(kw_only=True)
class EventBatchAck:
    acked_id: str = attrs.field(validator=_str_max(64))
    received: int = attrs.field(validator=v.ge(0))
    accepted: int = attrs.field(validator=v.ge(0))
    rejected: int = attrs.field(validator=v.ge(0))


@attrs.frozen(kw_only=True)
class Heartbeat:
    buffer_size: int = 0
    last_flush_at: str | None = None
    dropped_events: int = 0
    adapter_health: JsonObject = attrs.field(factory=dict)
    telemetry_loss: JsonObject | None = None


@attrs.frozen(kw_only=True)
class Command:
    """An operator's command; the frame id is the command id."""

    action: str = attrs.field(validator=_str_between(1, ACTION_MAX_CHARS))
    target: JsonObject = attrs.field(factory=dict)
    parameters: JsonObject = attrs.field(factory=dict)
    timeout_seconds: int = attrs.field(
        default=60, validator=[v.ge(1), v.le(COMMAND_TIMEOUT_MAX_SECONDS)]
    )
    issued_by: str | None = attrs.field(default=None, validator=_opt_str_max(64))
    delivery_claim_token: str | None = attrs.field(default=None, validator=_opt_str_max(64))


@attrs.frozen(kw_only=True)
class CommandAck:
    """The agent has the command (frame id = command id)."""

    delivery_claim_token: str | None = None


@attrs.frozen(kw_only=True)
class CommandResult:
    """The command's outcome (frame id = command id)."""

    status: Literal["success", "failed"]
    result: JsonObject | None = None
    error: str | None = attrs.field(default=None, validator=_opt_str_max(MAX_ERROR_LENGTH))
    delivery_claim_token: str | None = None


@attrs.frozen(kw_only=True)
class RegistryDelta:
    """Tasks a worker knows, changed: kept as the worker's task registry."""

    engine: str = attrs.field(validator=_str_max(40))
    added: tuple[JsonObject, ...] = ()
    removed: tuple[str, ...] = ()
    updated: tuple[JsonObject, ...] = ()


@attrs.frozen(kw_only=True)
class AgentStatus:
    """Self-report of an agent's health; kept whole, as received."""

    raw: JsonObject


@attrs.frozen(kw_only=True)
class Error:
    code: str = attrs.field(validator=_str_max(80))
    message: str = attrs.field(default="", validator=_str_max(MAX_ERROR_LENGTH))
    fatal: bool = False


Payload = (
    Hello
    | HelloAck
    | EventBatch
    | EventBatchAck
    | Heartbeat
    | Command
    | CommandAck
    | CommandResult
    | RegistryDelta
    | AgentStatus
    | Error
)

# The wire name of each payload class (the frame's ``type``).
PAYLOADS: Final[dict[str, type[Any]]] = {
    "hello": Hello,
    "hello_ack": HelloAck,
    "event_batch": EventBatch,
    "event_batch_ack": EventBatchAck,
    "heartbeat": Heartbeat,
    "command": Command,
    "command_ack": CommandAck,
    "command_result": CommandResult,
    "registry_delta": RegistryDelta,
    "agent_status": AgentStatus,
    "error": Error,
}
TYPE_OF: Final = {cls: name for name, cls in PAYLOADS.items()}

# Signed frame types each side may send after the handshake.
AGENT_TO_BRAIN: Final = frozenset(
    {
        "event_batch",
        "heartbeat",
        "command_ack",
        "command_result",
        "registry_delta",
        "agent_status",
        "error",
    }
)
BRAIN_TO_AGENT: Final = frozenset({"event_batch_ack", "command", "error"})


@attrs.frozen(kw_only=True)
class Frame:
    """A received or outgoing frame: envelope fields plus a typed payload."""

    id: str = attrs.field(validator=_str_between(1, 64))
    payload: Payload
    seq: int | None = None
    ts: str | None = None
    nonce: str | None = None

    @property
    def type(self) -> str:
        return TYPE_OF[type(self.payload)]


# -- the converter ---------------------------------------------------------------


def _strict(kind: type, name: str) -> Any:
    def hook(value: object, _: type) -> Any:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(f"expected {name}, got {type(value).__name__}")
        return value

    return hook


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=False)
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(bool, _strict(bool, "true or false"))
    conv.register_structure_hook_func(lambda t: t == JsonObject, _strict(dict, "an object"))

    def event(value: object, _: type) -> AgentEvent:
        if not isinstance(value, dict):
            raise TypeError("an event must be an object")
        return AgentEvent(id=value.get("id"), kind=value.get("kind"), raw=value)  # type: ignore[arg-type]

    def status(value: object, _: type) -> AgentStatus:
        if not isinstance(value, dict):
            raise TypeError("agent_status payload must be an object")
        return AgentStatus(raw=value)

    def event_batch(value: object, _: type) -> EventBatch:
        # The hot path (every event of every batch): one comprehension
        # rather than cattrs' generic tuple handling.
        if not isinstance(value, dict):
            raise TypeError("event_batch payload must be an object")
        if "events" not in value:
            raise KeyError("event_batch payload has no 'events'")
        events = value["events"]
        if not isinstance(events, list | tuple):
            raise TypeError(f"'events' must be a list, not {type(events).__name__}")
        return EventBatch(events=tuple([event(e, AgentEvent) for e in events]))

    conv.register_structure_hook(AgentEvent, event)
    conv.register_structure_hook(EventBatch, event_batch)
    conv.register_structure_hook(AgentStatus, status)
    conv.register_unstructure_hook(AgentEvent, lambda e: e.raw)
    conv.register_unstructure_hook(AgentStatus, lambda s: s.raw)
    return conv


converter = _make_converter()


def structure_payload(frame_type: str, payload: object) -> Payload:
    """The typed payload of a ``frame_type`` frame; raises on a bad shape."""
    cls = PAYLOADS[frame_type]
    if not isinstance(payload, dict):
        raise TypeError(f"{frame_type} payload must be an object")
    result: Payload = converter.structure(payload, cls)
    return result


def unstructure_payload(payload: Payload) -> JsonObject:
    result: JsonObject = converter.unstructure(payload)
    return result

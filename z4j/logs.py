"""Logging setup for the `z4j` command (a library user keeps their own), and
the context each line carries.

Context: where the brain serves a peer (an ingest connection, an HTTP
connection or request, an agent's WebSocket) it binds fields with
`log_context` — ``peer``, ``request_id``, ``agent``, ``worker``, ``project``,
``command_id``. They live in a contextvar, and Trio tasks inherit a copy of
their spawner's context (so do `trio.to_thread` calls), so every line
logged on behalf of that peer carries them without being passed along. A
call site may add or override one with ``extra={"command_id": ...}``, and
give a line fields of its own with ``extra={"fields": {...}}`` (the access
log does). The JSON format writes all of them as fields of the line; the
text format leaves its lines as they were.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

import orjson

__all__ = [
    "CONTEXT_FIELDS",
    "bind_log_context",
    "configure_logging",
    "current_log_context",
    "log_context",
    "parse_log_levels",
]

# The context a line may carry, in the order JSON lines write them.
CONTEXT_FIELDS = ("peer", "request_id", "project", "agent", "worker", "command_id")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_NONE: Mapping[str, str] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "z4j_log_context", default=_NONE
)


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Bind ``fields`` (names from `CONTEXT_FIELDS`) to every line logged
    within, in this task and the tasks and threads it starts."""
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"not log context fields: {sorted(unknown)}")
    merged = {**_context.get(), **{k: str(v) for k, v in fields.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


def bind_log_context(**fields: object) -> None:
    """Like `log_context`, for the rest of this task (a connection's own task)."""
    merged = {**_context.get(), **{k: str(v) for k, v in fields.items() if v is not None}}
    _context.set(merged)


def current_log_context() -> Mapping[str, str]:
    return _context.get()


def parse_log_levels(spec: str) -> dict[str, str]:
    """``"z4j.drain=DEBUG,hypercorn=WARNING"`` as ``{logger: LEVEL}``; ValueError says what is wrong."""
    levels: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, level = item.partition("=")
        name, level = name.strip(), level.strip().upper()
        if not sep or not name:
            raise ValueError(
                f"must be LOGGER=LEVEL pairs separated by commas "
                f"(e.g. z4j.drain=DEBUG,hypercorn=WARNING), got {item!r}"
            )
        if level not in LEVELS:
            raise ValueError(
                f"level of {name!r} must be one of {', '.join(LEVELS)}, got {level or item!r}"
            )
        levels[name] = level
    return levels


# Control characters (C0, DEL, C1) and Unicode line breaks, as escapes: a
# message quoting what a peer sent (a worker id, a token field, a path)
# must stay one line, never forge the next one or drive the terminal.
_ESCAPES = {
    c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    for c in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
}


class TextFormatter(logging.Formatter):
    """The text format, each message kept on its line (tracebacks still follow)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_ESCAPES)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: easy to ship to a log pipeline."""

    def __init__(self, instance: int | None = None) -> None:
        super().__init__()
        self.instance = instance

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.instance is not None:
            entry["instance"] = self.instance
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            entry.update({k: v for k, v in fields.items() if k not in entry})
        context = _context.get()
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is None:
                value = context.get(name)
            if value is not None:
                entry[name] = value if isinstance(value, str | int) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(
    level: str = "INFO",
    fmt: str = "text",
    *,
    instance: int | None = None,
    levels: Mapping[str, str] | None = None,
) -> None:
    """Log to stderr; ``instance`` tags each line with the process's slot under
    ``z4j brain --instances N``, whose children share one stream. ``levels``
    sets single loggers' levels (Z4J_LOG_LEVELS), over ``level`` for them."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(instance))
    else:
        tag = "" if instance is None else f"[instance {instance}] "
        handler.setFormatter(
            TextFormatter(f"%(asctime)s %(levelname)-7s {tag}%(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # hypercorn's own loggers are chatty at INFO about every bind, httpx's
    # about every federation call (brain/federation/client.py logs failures).
    for chatty in ("hypercorn", "httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
    for name, named_level in (levels or {}).items():
        logging.getLogger(name).setLevel(named_level)

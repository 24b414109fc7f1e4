"""Logging setup for the `z4j` command (a library user keeps their own)."""

from __future__ import annotations

import logging
import sys
import time

import orjson

__all__ = ["configure_logging"]


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
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(
    level: str = "INFO", fmt: str = "text", *, instance: int | None = None
) -> None:
    """Log to stderr; ``instance`` tags each line with the process's slot under
    ``z4j brain --instances N``, whose children share one stream."""
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
    # hypercorn's own loggers are chatty at INFO about every bind.
    logging.getLogger("hypercorn").setLevel(max(logging.WARNING, root.level))

"""Logging setup for the `z4j` command (a library user keeps their own)."""

from __future__ import annotations

import logging
import sys
import time

import orjson

__all__ = ["configure_logging"]


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
            logging.Formatter(f"%(asctime)s %(levelname)-7s {tag}%(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # hypercorn's own loggers are chatty at INFO about every bind.
    logging.getLogger("hypercorn").setLevel(max(logging.WARNING, root.level))

"""How the ``z4j`` list and show commands print: lines for people by
default, JSON with ``--json`` for scripts (an array for a list, an object for
a show), so nobody has to parse a table."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

__all__ = ["add_json_flag", "emit", "iso"]


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print JSON (an array for a list, an object for a show)",
    )


def emit(args: argparse.Namespace, value: Any, text: Callable[[], str]) -> None:
    """Print ``value`` as JSON under ``--json``, else the lines ``text`` makes."""
    if getattr(args, "json", False):
        import orjson

        sys.stdout.flush()
        sys.stdout.buffer.write(
            orjson.dumps(value, default=str, option=orjson.OPT_INDENT_2) + b"\n"
        )
        sys.stdout.buffer.flush()
    else:
        lines = text()
        if lines:
            print(lines)


def iso(ts: float | None) -> str | None:
    """A time as the API writes it (ISO 8601, UTC)."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()

"""Text logs keep each message on its own line, whatever a peer put in it."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from z4j.logs import configure_logging


def test_a_message_with_control_characters_stays_on_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", "text")
        forged = "w1\n2026-01-01 00:00:00,000 ERROR   z4j.brain: forged\x1b[2J\u2028x"
        logging.getLogger("z4j.test").warning("worker %s went away", forged)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("z4j.test").exception("with a traceback")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith(
        "worker w1\\x0a2026-01-01 00:00:00,000 ERROR   z4j.brain: forged\\x1b[2J\\u2028x went away"
    )
    assert "\x1b" not in stream.getvalue()
    # A traceback is the formatter's own text, not a peer's: it keeps its lines.
    assert lines[1].endswith("with a traceback")
    assert lines[2] == "Traceback (most recent call last):"

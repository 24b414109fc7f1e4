"""What one example sent and received, and the failure that carries it.

Each Hypothesis example writes a `Transcript`: a line per frame or reply,
per rule step, per close. When a rule fails, the `Violation` it raises
holds the transcript of that example; Hypothesis shrinks the steps and
re-raises the failure of the smallest example, so what gets printed is the
shortest exchange that still breaks the rule.
"""

from __future__ import annotations

import time

__all__ = ["Transcript", "Violation", "clip"]

_MAX_LINES = 400


def clip(text: str, limit: int = 160) -> str:
    """Shorten ``text`` to ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… (+{len(text) - limit} chars)"


class Transcript:
    """Lines of ``+seconds  who  arrow  what``, in the order things happened.

    Arrows: ``→`` we sent, ``←`` the server sent, ``⇄`` a connection opened,
    ``✕`` one ended, ``──`` a rule step began, ``!`` something the suite noticed.
    """

    def __init__(self) -> None:
        self._start = time.monotonic()
        self.lines: list[str] = []
        self.steps = 0  # rule steps written
        self._dropped = 0

    def add(self, who: str, arrow: str, what: str) -> None:
        if len(self.lines) >= _MAX_LINES:
            self._dropped += 1
            return
        at = time.monotonic() - self._start
        self.lines.append(f"{at:8.3f}  {who:<6} {arrow} {what}")

    def step(self, what: str) -> None:
        self.steps += 1
        self.add("", "──", what)

    def render(self) -> str:
        body = "\n".join(self.lines) or "(nothing was exchanged)"
        if self._dropped:
            body += f"\n… {self._dropped} more lines not kept"
        return body


class Violation(AssertionError):
    """The server broke rule ``rule``: what happened, and the exchange that showed it."""

    def __init__(self, rule: str, message: str, transcript: Transcript | None = None) -> None:
        self.rule = rule
        self.message = message
        self.transcript = transcript.render() if transcript is not None else ""
        self.steps = transcript.steps if transcript is not None else 0
        # How many choices the Hypothesis example had drawn when it failed
        # (set by the state machines; None outside one): what shrinking reduces.
        self.choices: int | None = None
        text = f"[{rule}] {message}"
        if self.transcript:
            text += (
                "\n\ntranscript (seconds since the example began; → sent, ← received, "
                "⇄ connected, ✕ closed, ── rule step):\n" + self.transcript
            )
        super().__init__(text)

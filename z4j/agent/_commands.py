"""The agent's command handlers and the commands that outlive a session.

Kept apart from the connection because a command's life is longer than a
session's: its handler keeps running across a reconnect, its result waits
for the next session if this one ends, and its id is remembered so a
redelivery is answered, never run twice. Handlers run in the nursery that
`Commands.serving` holds open for one `Agent.run`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import attrs
import trio

from ..protocol.agent import frames as f

__all__ = ["CommandHandler", "Commands", "error_text", "failed"]

logger = logging.getLogger("z4j.agent")

CommandHandler = Callable[[dict[str, Any], dict[str, Any]], Awaitable[dict[str, Any] | None]]

_REMEMBERED_COMMANDS: Final = 1024


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return _truncate(text)


def _truncate(text: str, limit: int = f.MAX_ERROR_LENGTH) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def failed(error: str) -> f.CommandResult:
    return f.CommandResult(status="failed", error=_truncate(error))


@attrs.define
class _Record:
    claim_token: str | None
    result: f.CommandResult | None = None  # None while the handler runs


class Commands:
    """Handlers by action; recent command ids (dedupe); results not yet sent."""

    def __init__(self, notify: Callable[[], None]) -> None:
        self._notify = notify
        self._handlers: dict[str, CommandHandler] = {}
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._results: OrderedDict[str, f.CommandResult] = OrderedDict()
        self.running = 0
        self._nursery: trio.Nursery | None = None

    @property
    def actions(self) -> list[str]:
        return sorted(self._handlers)

    @property
    def busy(self) -> bool:
        """A handler is running or a result waits to be sent."""
        return bool(self._results or self.running)

    def register(self, action: str, handler: CommandHandler) -> None:
        if not isinstance(action, str) or not 1 <= len(action) <= f.ACTION_MAX_CHARS:
            raise ValueError(f"an action is a string of 1 to {f.ACTION_MAX_CHARS} characters")
        if action in self._handlers:
            raise ValueError(f"a handler for {action!r} is already registered")
        self._handlers[action] = handler

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Run handlers while open; on exit cancel those still running."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    def receive(self, command_id: str, command: f.Command) -> None:
        """A command arrived (its ack is the session's): run it, or answer a repeat."""
        token = command.delivery_claim_token
        record = self._records.get(command_id)
        if record is not None:  # a repeat: never run twice
            record.claim_token = token
            if record.result is not None:
                self._results[command_id] = attrs.evolve(record.result, delivery_claim_token=token)
            self._notify()
            return
        record = self._records[command_id] = _Record(claim_token=token)
        while len(self._records) > _REMEMBERED_COMMANDS:
            self._records.popitem(last=False)
        assert self._nursery is not None
        self._nursery.start_soon(self._run, command_id, command, record)
        self._notify()

    def next_result(self) -> tuple[str, f.CommandResult] | None:
        """The oldest result not yet sent, with its command id."""
        return next(iter(self._results.items()), None)

    def sent(self, command_id: str, result: f.CommandResult) -> None:
        """``result`` went out; forget it unless a repeat replaced it meanwhile."""
        if self._results.get(command_id) is result:
            del self._results[command_id]

    async def _run(self, command_id: str, command: f.Command, record: _Record) -> None:
        self.running += 1
        try:
            result = await self._execute(command)
        except BaseException:  # cancelled: forget the id, so a redelivery runs it
            if self._records.get(command_id) is record:
                del self._records[command_id]
            raise
        else:
            record.result = result
            token = record.claim_token
            self._results[command_id] = attrs.evolve(result, delivery_claim_token=token)
        finally:
            self.running -= 1
            self._notify()

    async def _execute(self, command: f.Command) -> f.CommandResult:
        handler = self._handlers.get(command.action)
        if handler is None:
            return failed(f"unknown action {command.action!r}")
        try:
            value = await handler(copy.deepcopy(command.target), copy.deepcopy(command.parameters))
        except Exception as exc:
            logger.warning("command %r failed", command.action, exc_info=True)
            return failed(error_text(exc))
        if value is None:
            return f.CommandResult(status="success")
        if not isinstance(value, dict):
            return failed(
                f"the {command.action!r} handler returned {type(value).__name__}, not a dict or None"
            )
        try:
            value = json.loads(json.dumps(value, allow_nan=False))
        except (TypeError, ValueError) as exc:
            return failed(f"the {command.action!r} handler's result is not JSON: {exc}")
        return f.CommandResult(status="success", result=value)

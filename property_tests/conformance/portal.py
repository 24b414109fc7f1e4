"""A Trio run on a thread of its own, called from synchronous code.

Hypothesis state machines are synchronous; the suite's clients are Trio
tasks. A `TrioPortal` keeps one Trio run alive on a daemon thread, and the
machine's rules call into it with `run` (`trio.from_thread.run` underneath).
Tasks that must outlive one call (a connection's reader) go into a
`TaskGroup`, which the machine cancels in its teardown.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

__all__ = ["TaskGroup", "TrioPortal"]

T = TypeVar("T")


class TrioPortal:
    def __init__(self, name: str = "conformance") -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the Trio thread did not start")

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            await trio.sleep_forever()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` on the portal's thread; return its result."""
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def task_group(self) -> TaskGroup:
        """A new nursery on the portal, for tasks that live across calls."""
        return self.run(self._open_group)

    async def _open_group(self) -> TaskGroup:
        group: TaskGroup = await self._nursery.start(TaskGroup.serve)
        return group

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        trio.from_thread.run_sync(self._nursery.cancel_scope.cancel, trio_token=self._token)
        self._thread.join(30)
        if self._thread.is_alive():
            raise RuntimeError("the Trio thread did not stop")


class TaskGroup:
    """A nursery held open on the portal until `aclose`."""

    def __init__(self, nursery: trio.Nursery, done: trio.Event) -> None:
        self.nursery = nursery
        self._done = done

    @classmethod
    async def serve(cls, task_status: trio.TaskStatus[TaskGroup]) -> None:
        done = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(cls(nursery, done))
                await trio.sleep_forever()
        finally:
            done.set()

    async def aclose(self) -> None:
        """Cancel every task of the group and wait until they have all ended."""
        self.nursery.cancel_scope.cancel()
        await self._done.wait()

"""Background tasks with an owner: each one is referenced until it ends (the event loop
keeps only weak references to tasks), an exception it ends with is logged, and the
owner's stop cancels and awaits whatever is still running.

``cancelled(task)`` is the same for one task a request started (a body pump, a
disconnect watcher): cancel it and wait until it has ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

__all__ = ["Tasks", "cancelled"]


class Tasks:
    """The fire-and-forget tasks of one owner (``what`` names it in log lines)."""

    __slots__ = ("_log", "_what", "_running")

    def __init__(self, log: logging.Logger, what: str) -> None:
        self._log = log
        self._what = what
        self._running: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._running)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Run ``coro`` as a task held here until it ends."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._running.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error(
                "%s: background task %s failed",
                self._what,
                task.get_name(),
                exc_info=task.exception(),
            )

    async def close(self) -> None:
        """Cancel every task still running and wait until all have ended."""
        while self._running:  # (a task may spawn another while it is cancelled)
            running = list(self._running)
            for task in running:
                task.cancel()
            await asyncio.wait(running)


async def cancelled(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has ended (its outcome is not raised here)."""
    task.cancel()
    await asyncio.wait((task,))

"""Write flow control shared by the gateway's two asyncio protocols (the client-facing
server connection and the pooled upstream connection).

asyncio calls ``pause_writing`` when a transport's write buffer passes its high-water
mark and ``resume_writing`` when it drains below the low one; a writer that finds
``write_paused`` set awaits ``drain()``. A lost connection must release that writer
too: ``connection_lost`` calls ``release_drain()``.
"""

from __future__ import annotations

import asyncio


class WriteFlow:
    """Mixin for a slotted ``asyncio.Protocol`` that has a ``loop`` attribute; its
    ``__init__`` calls ``WriteFlow.__init__(self)``."""

    __slots__ = ("write_paused", "drain_waiter")
    loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.release_drain()

    def release_drain(self) -> None:
        w = self.drain_waiter
        if w is not None:
            self.drain_waiter = None
            if not w.done():
                w.set_result(None)

    async def drain(self) -> None:
        """Wait until the transport may be written again (or the connection is gone)."""
        w = self.drain_waiter
        if w is None:
            w = self.drain_waiter = self.loop.create_future()
        await w

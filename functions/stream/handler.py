"""stream: responses that flow as they are produced, uploads read in pieces, an echo socket."""

import hashlib
import time

from torpor_runtime import sse


def handle(request):
    if request.path == "/ticks":  # a generator: each piece is sent as it is yielded
        n = min(int(request.query.get("n", "5")), 1000)
        every = min(float(request.query.get("every", "0.5")), 10.0)

        def ticks():
            for i in range(n):
                yield f"tick {i} {time.time():.3f}\n"
                if i + 1 < n:
                    time.sleep(every)

        return ticks()
    if request.path == "/events":  # server-sent events
        n = min(int(request.query.get("n", "3")), 1000)
        return sse(
            {"event": "tick", "id": i, "data": {"i": i, "t": time.time()}}
            for i in range(n)
            if i == 0 or time.sleep(0.5) is None
        )
    if request.path == "/upload":  # any size within max_body, one piece in memory at a time
        digest, size = hashlib.sha256(), 0
        for piece in request.stream():
            digest.update(piece)
            size += len(piece)
        return {"bytes": size, "sha256": digest.hexdigest()}
    return {"paths": ["/ticks", "/events", "/upload"], "websocket": "any path, echoes"}


async def echo(ws):
    """Echo every message until the client closes."""
    async for message in ws:
        await ws.send(message)

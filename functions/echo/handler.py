"""echo: answers with what it received, as JSON (an async handler)."""

import hashlib


async def handle(request):
    body = request.body
    return {
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "headers": dict(request.headers),
        "body": body.decode("utf-8", "replace"),
        "length": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }

"""__NAME__: answers GET / with a greeting; ?name=you greets you.

``handle(request)`` runs for every request (``async def`` works too). ``request`` has
method, path, query (dict), headers, body (bytes) and json(). Return str, bytes, a
dict/list (sent as JSON), or a response with status, headers and body.
"""

import os

GREETING = os.environ.get("GREETING", "hello")


def handle(request):
    name = request.query.get("name") or "world"
    return f"{GREETING}, {name}!\n"

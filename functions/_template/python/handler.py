"""A new Torpor function. Deploy it with `torpor deploy .` and call it with `torpor invoke NAME`.

`handle(request)` may be sync (runs in a thread pool) or `async def` (runs on the loop).
`request` has method, path, query (dict), headers (case-insensitive), body (bytes), json().
Return str, bytes, a dict/list (sent as JSON), None (204), or
`torpor_runtime.Response(status, headers, body)`.
"""

import os

GREETING = os.environ.get("GREETING", "hello")


def handle(request):
    return {"message": f"{GREETING} from {request.path}"}

"""__NAME__: a JSON API. GET answers {"message": ...}; POST a JSON object to get it back.

``handle(request)`` runs for every request (``async def`` works too). ``request`` has
method, path, query (dict), headers, body (bytes) and json(). A dict or list is sent
as JSON; an exception becomes a 500 with a JSON error.
"""

import os

GREETING = os.environ.get("GREETING", "hello")


def handle(request):
    if request.method == "POST":
        try:
            data = request.json()
        except ValueError:
            return {"error": "expected a JSON body"}
        return {"received": data}
    return {"message": f"{GREETING} from __NAME__", "path": request.path}

"""hello: greets `name` from the query (?name=...) or a JSON body {"name": ...}."""

import os

GREETING = os.environ.get("GREETING", "hello")


def handle(request):
    name = request.query.get("name")
    if not name and request.body:
        try:
            data = request.json()
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            name = data["name"]
    return f"{GREETING}, {name or 'world'}!\n"

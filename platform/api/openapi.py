"""The OpenAPI document served at /v1/openapi.json (kept by hand, next to the routes).

Request body types match ``REQUEST_BODIES`` in :mod:`torpor.api.app` (a unit test
checks it); any other type is answered 415.
"""

from __future__ import annotations

from typing import Any

from torpor.spec import MAX_CONCURRENCY, MAX_MIN_REQUESTS, MAX_P95_RATIO, MAX_SCALE, MAX_TARGET

_ERROR = {"$ref": "#/components/schemas/Error"}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


def _resp(desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": desc,
        "content": {"application/json": {"schema": schema or {"type": "object"}}},
    }


_ROLLOUT_VIEW: dict[str, Any] = {
    "type": "object",
    "properties": {
        "rollout": {
            "type": "object",
            "nullable": True,
            "properties": {
                "to": {"type": "string"},
                "stable": {"type": "string"},
                "steps": {"type": "array", "items": {"type": "integer"}},
                "step": {"type": "integer"},
                "state": {
                    "type": "string",
                    "enum": ["running", "paused", "promoted", "rolled_back", "aborted"],
                },
                "step_started": {"type": "number"},
                "reason": {"type": "string"},
                "policy": {"type": "object"},
            },
        },
        "traffic": {"type": "array", "items": {"$ref": "#/components/schemas/Traffic"}},
        "revision": {"type": "string"},
    },
}
_ROLLOUT_START: dict[str, Any] = {
    "type": "object",
    "required": ["to"],
    "properties": {
        "to": {"type": "string"},
        "steps": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 100}},
        "interval": {"oneOf": [{"type": "number"}, {"type": "string"}]},
        "max_error_ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "max_p95_ratio": {"type": "number", "minimum": 1, "maximum": MAX_P95_RATIO},
        "min_requests": {"type": "integer", "minimum": 0, "maximum": MAX_MIN_REQUESTS},
    },
}

_SECRET_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"},
}
_SECRET: dict[str, Any] = {
    "type": "object",
    "required": ["name", "version", "updated", "used_by"],
    "properties": {
        "name": {"type": "string"},
        "version": {"type": "integer", "minimum": 1},
        "updated": {"type": "number"},
        "used_by": {"type": "array", "items": {"type": "string"}},
    },
}

# The request body types (REQUEST_BODIES in torpor.api.app refers to these).
JSON_TYPES = ("application/json",)
SECRET_TYPES = ("application/octet-stream",)
TARBALL_TYPES = (
    "application/gzip",
    "application/x-gzip",
    "application/x-tar",
    "application/octet-stream",
)


def _body(types: tuple[str, ...], schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {t: {"schema": schema} for t in types}}


_ERRORS = {
    "400": _resp("bad input", _ERROR),
    "401": _resp("missing or wrong token", _ERROR),
    "403": _resp("a browser's cross-origin request (Origin or Sec-Fetch-Site)", _ERROR),
    "404": _resp("no such function", _ERROR),
    "421": _resp("a Host this API does not answer to (DNS rebinding)", _ERROR),
}
_WRITE_ERRORS = {**_ERRORS, "415": _resp("a request body type this route does not accept", _ERROR)}

_SECRET_ERRORS = {**_ERRORS, "404": _resp("no such secret", _ERROR)}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "Torpor control API", "version": "1"},
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "archiveToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "tpa1.HEX: one archive's read-only token",
            },
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "detail"],
                "properties": {
                    "error": {"type": "string"},
                    "detail": {"type": "string"},
                    "field": {"type": "string"},
                },
            },
            "Traffic": {
                "type": "object",
                "required": ["revision", "percent"],
                "properties": {
                    "revision": {"type": "string"},
                    "percent": {"type": "integer"},
                    "tag": {"type": "string", "nullable": True},
                },
            },
            "Replica": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "revision": {"type": "string"},
                    "state": {
                        "type": "string",
                        "enum": ["starting", "ready", "draining", "failed"],
                    },
                    "endpoint": {"type": "string"},
                },
            },
            "Function": {
                "type": "object",
                "required": ["name", "revisions", "traffic", "replicas"],
                "properties": {
                    "name": {"type": "string"},
                    "url": {"type": "string"},
                    "revisions": {"type": "array", "items": {"type": "object"}},
                    "traffic": {"type": "array", "items": {"$ref": "#/components/schemas/Traffic"}},
                    "replicas": {
                        "type": "array",
                        "items": {"$ref": "#/components/schemas/Replica"},
                    },
                },
            },
            "ScalePatch": {
                "type": "object",
                "properties": {
                    # min/max/replicas: also at most the platform's --max-replicas (400 naming it)
                    "min": {"type": "integer", "minimum": 0, "maximum": MAX_SCALE},
                    "max": {"type": "integer", "minimum": 0, "maximum": MAX_SCALE},
                    "replicas": {"type": "integer", "minimum": 0, "maximum": MAX_SCALE},
                    "target": {
                        "type": "number",
                        "exclusiveMinimum": True,
                        "minimum": 0,
                        "maximum": MAX_TARGET,
                    },
                    "concurrency": {"type": "integer", "minimum": 0, "maximum": MAX_CONCURRENCY},
                },
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/healthz": {
            "get": {"summary": "liveness", "security": [], "responses": {"200": _resp("alive")}}
        },
        "/readyz": {
            "get": {"summary": "readiness", "security": [], "responses": {"200": _resp("ready")}}
        },
        "/v1/functions": {
            "get": {"summary": "list functions", "responses": {"200": _resp("functions")}},
            "post": {
                "summary": "deploy: body is a (gzipped) tar of the function folder; creates a revision",
                "parameters": [
                    {
                        "name": "canary",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 99},
                    },
                    {"name": "tag", "in": "query", "schema": {"type": "string"}},
                    {"name": "no_traffic", "in": "query", "schema": {"type": "boolean"}},
                ],
                "requestBody": _body(TARBALL_TYPES, {"type": "string", "format": "binary"}),
                "responses": {
                    "201": _resp("revision created"),
                    **_WRITE_ERRORS,
                    "413": _resp("upload too large", _ERROR),
                },
            },
        },
        "/v1/status": {
            "get": {
                "summary": "the installation: which controller leads (id, host, pid, since, fencing token), the "
                "controllers and gateways seen with their last heartbeat, store kind, version, counts",
                "responses": {"200": _resp("status"), **_ERRORS},
            }
        },
        "/v1/functions/{name}": {
            "parameters": [_NAME],
            "get": {
                "summary": "one function",
                "responses": {
                    "200": _resp("function", {"$ref": "#/components/schemas/Function"}),
                    **_ERRORS,
                },
            },
            "delete": {
                "summary": "delete a function, its revisions and replicas (no request body)",
                "responses": {"200": _resp("deleted"), **_WRITE_ERRORS},
            },
        },
        "/v1/functions/{name}/revisions": {
            "parameters": [_NAME],
            "get": {"summary": "revisions", "responses": {"200": _resp("revisions"), **_ERRORS}},
        },
        "/v1/functions/{name}/events": {
            "parameters": [_NAME],
            "get": {
                "summary": "events, newest last",
                "responses": {"200": _resp("events"), **_ERRORS},
            },
        },
        "/v1/functions/{name}/logs": {
            "parameters": [_NAME],
            "get": {
                "summary": "replica logs (text); follow=1 streams",
                "responses": {
                    "200": {"description": "log lines", "content": {"text/plain": {}}},
                    **_ERRORS,
                    "503": _resp("no controller answered (distributed mode)", _ERROR),
                },
            },
        },
        "/v1/functions/{name}/traffic": {
            "parameters": [_NAME],
            "put": {
                "summary": "set the traffic split by hand",
                "requestBody": _body(
                    JSON_TYPES,
                    {
                        "type": "object",
                        "properties": {
                            "traffic": {
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/Traffic"},
                            }
                        },
                    },
                ),
                "responses": {"200": _resp("traffic"), **_WRITE_ERRORS},
            },
        },
        "/v1/functions/{name}/scale": {
            "parameters": [_NAME],
            "patch": {
                "summary": "change scaling bounds without a new revision; replicas=N pins min=max=N",
                "requestBody": _body(JSON_TYPES, {"$ref": "#/components/schemas/ScalePatch"}),
                "responses": {"200": _resp("new scale"), **_WRITE_ERRORS},
            },
        },
        "/v1/functions/{name}/rollout": {
            "parameters": [_NAME],
            "get": {
                "summary": "the rollout (or null) and the traffic table",
                "responses": {"200": _resp("rollout", _ROLLOUT_VIEW), **_ERRORS},
            },
            "post": {
                "summary": "start a rollout to a ready revision; policy fields default to its torpor.yaml rollout section",
                "requestBody": _body(JSON_TYPES, _ROLLOUT_START),
                "responses": {
                    "201": _resp("rollout started", _ROLLOUT_VIEW),
                    **_WRITE_ERRORS,
                    "409": _resp("a rollout is running, or nothing to replace", _ERROR),
                },
            },
        },
        "/v1/functions/{name}/rollout/{action}": {
            "parameters": [
                _NAME,
                {
                    "name": "action",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": ["pause", "resume", "promote", "abort"]},
                },
            ],
            "post": {
                "summary": "pause, resume (the step is measured afresh), promote (100% now) or abort (back to stable)",
                "requestBody": _body(JSON_TYPES, {"type": "object"}, required=False),
                "responses": {
                    "200": _resp("rollout", _ROLLOUT_VIEW),
                    **_WRITE_ERRORS,
                    "409": _resp("no running or paused rollout", _ERROR),
                },
            },
        },
        "/v1/functions/{name}/rollback": {
            "parameters": [_NAME],
            "post": {
                "summary": "all traffic back to the previous stable revision (ends a running rollout as rolled_back)",
                "requestBody": _body(JSON_TYPES, {"type": "object"}, required=False),
                "responses": {
                    "200": _resp("rolled back", _ROLLOUT_VIEW),
                    **_WRITE_ERRORS,
                    "409": _resp("no earlier ready revision", _ERROR),
                },
            },
        },
        "/v1/archives/{sha}": {
            "parameters": [
                {
                    "name": "sha",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                }
            ],
            "get": {
                "summary": "a source archive (gzipped tar) by its sha256; takes the admin token or the archive's "
                "own read-only token (HMAC of the sha under the installation's archive key)",
                "security": [{"bearer": []}, {"archiveToken": []}],
                "responses": {
                    "200": {"description": "the archive", "content": {"application/gzip": {}}},
                    **_ERRORS,
                    "400": _resp("malformed sha (admin token only)", _ERROR),
                    "404": _resp("no such archive", _ERROR),
                },
            },
        },
        "/v1/calls/{id}": {
            "parameters": [
                {
                    "name": "id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                }
            ],
            "get": {
                "summary": "one asynchronous call: state queued|running|done|failed, attempts, status, created, "
                "finished; once final the result's headers and body (up to 64 KiB)",
                "responses": {"200": _resp("call"), **_ERRORS},
            },
        },
        "/v1/functions/{name}/calls": {
            "parameters": [_NAME],
            "get": {
                "summary": "the function's recent asynchronous calls, newest first (limit 1..1000)",
                "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer"}}],
                "responses": {"200": _resp("calls"), **_ERRORS},
            },
        },
        "/v1/secrets": {
            "get": {
                "summary": "every secret's name, version, update time and the functions using it (never a value)",
                "responses": {
                    "200": _resp(
                        "secrets",
                        {
                            "type": "object",
                            "properties": {"secrets": {"type": "array", "items": _SECRET}},
                        },
                    ),
                    **_SECRET_ERRORS,
                },
            }
        },
        "/v1/secrets/{name}": {
            "parameters": [_SECRET_NAME],
            "get": {
                "summary": "one secret's metadata (never its value)",
                "responses": {"200": _resp("secret", _SECRET), **_SECRET_ERRORS},
            },
            "put": {
                "summary": "create or replace a secret; the body is the raw value: UTF-8 text without NUL, "
                "1 byte to 64 KiB. Takes effect for replicas started afterwards",
                "requestBody": _body(SECRET_TYPES, {"type": "string", "format": "binary"}),
                "responses": {
                    "200": _resp("replaced", _SECRET),
                    "201": _resp("created", _SECRET),
                    **_SECRET_ERRORS,
                    "413": _resp("value over 64 KiB", _ERROR),
                    "415": _resp("body not sent as application/octet-stream", _ERROR),
                },
            },
            "delete": {
                "summary": "delete a secret; refused while a function uses it unless force=true",
                "parameters": [{"name": "force", "in": "query", "schema": {"type": "boolean"}}],
                "responses": {
                    "200": _resp("deleted"),
                    **_SECRET_ERRORS,
                    "415": _WRITE_ERRORS["415"],
                    "409": _resp("in use: used_by names the functions", _ERROR),
                },
            },
        },
        "/v1/functions/{name}/build-log": {
            "parameters": [_NAME],
            "get": {
                "summary": "a revision's build log as text (revision=REV, default the newest build); "
                "follow=1 streams a running build",
                "parameters": [
                    {"name": "revision", "in": "query", "schema": {"type": "string"}},
                    {"name": "follow", "in": "query", "schema": {"type": "boolean"}},
                ],
                "responses": {
                    "200": {"description": "the log", "content": {"text/plain": {}}},
                    "404": _resp("no such function or revision, or no build on record", _ERROR),
                },
            },
        },
        "/v1/ui/code": {
            "post": {
                "summary": "a one-time code (60 s) that signs a browser in to the dashboard at "
                "/ui/login?code=CODE (torpor ui); refused to a dashboard session",
                "requestBody": _body(JSON_TYPES, {"type": "object"}, required=False),
                "responses": {
                    "200": _resp(
                        "the code",
                        {
                            "type": "object",
                            "properties": {
                                "code": {"type": "string"},
                                "path": {"type": "string"},
                                "expires_in": {"type": "number"},
                            },
                        },
                    ),
                    "401": _resp("missing or wrong token", _ERROR),
                    "403": _resp("a dashboard session", _ERROR),
                    "415": _WRITE_ERRORS["415"],
                },
            },
        },
        "/v1/ui/stream": {
            "get": {
                "summary": "the dashboard's live feed: server-sent `state` events, one a second",
                "responses": {
                    "200": {
                        "description": "text/event-stream",
                        "content": {"text/event-stream": {}},
                    }
                },
            },
        },
    },
}

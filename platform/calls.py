"""Asynchronous calls (``/async-function/NAME``): the record, its states and the retry rule.

A call is accepted by a gateway (202 + ``X-Call-Id``), stored durably in a call queue
(``torpor.store.callq``), run by a gateway's call worker through the normal data path,
retried, and kept as a record for ``RETENTION`` seconds after it ended.

States: ``queued`` (waiting to run, or waiting for its next attempt), ``running`` (an
attempt is in flight), ``done`` (a final answer below 500: 2xx, 3xx or 4xx), ``failed``
(5xx, timeout or lost connection on its last attempt; or not delivered in ``MAX_AGE``;
or its function was deleted).

Retries: attempt ``n`` (1-based) that fails is followed by a wait of
``min(BACKOFF_BASE * 2 ** (n - 1), BACKOFF_CAP)`` seconds: 0.5 s, 1 s, 2 s, 4 s, 8 s,
then 10 s. A gateway refusal that never reached a replica (held at zero by hand, no
replica ready within the timeout, a full activator queue) costs no attempt: the call is
tried again after the same backoff until it is ``MAX_AGE`` old.

Imports nothing of Torpor but the model's vocabulary.
"""

from __future__ import annotations

import base64
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

CallState = Literal["queued", "running", "done", "failed"]
STATES: tuple[str, ...] = ("queued", "running", "done", "failed")

BACKOFF_BASE = 0.5  # s before the 2nd attempt; doubles per attempt
BACKOFF_CAP = 10.0  # s, the longest wait between attempts
MAX_AGE = 24 * 3600.0  # s: a call not delivered to a replica by then fails
RETENTION = 24 * 3600.0  # s a finished call's record is kept
RESULT_CAP = 256 * 1024  # bytes of a result body kept in the record (and sent to a callback)
MAX_QUEUED = 10_000  # calls waiting per function; beyond: 503 + Retry-After at accept
LISTED = 1000  # recent calls kept listable per function
MAX_HEADERS = 100  # request headers stored per call (the gateway's server bounds them too)

_ID_RE = re.compile(r"[0-9a-f]{32}", re.ASCII)


def new_id() -> str:
    return os.urandom(16).hex()


def valid_id(text: str) -> bool:
    return bool(_ID_RE.fullmatch(text))


def backoff(attempt: int) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based)."""
    if attempt < 1:
        return BACKOFF_BASE
    return min(BACKOFF_BASE * 2 ** min(attempt - 1, 30), BACKOFF_CAP)


def retryable(status: int) -> bool:
    """An answer from a replica that is worth another attempt: any 5xx."""
    return status >= 500


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass
class Call:
    id: str
    function: str
    method: str = "POST"
    path: str = "/"  # raw (percent-encoded) path below /async-function/NAME, from '/'
    query: str = ""  # raw query string, without '?'
    headers: list[tuple[str, str]] = field(default_factory=list)  # what the replica gets (latin-1)
    body: bytes = b""  # the request body; dropped from the record once the call is final
    callback: str | None = None  # X-Callback-Url, checked at accept and again at delivery
    client: str = ""  # the accepting gateway's peer address (for Forwarded on each attempt)
    created: float = field(default_factory=time.time)
    state: CallState = "queued"
    attempts: int = 0  # attempts that reached a replica
    tries: int = 0  # dispatches, including gateway refusals that cost no attempt
    status: int | None = None  # the final (or last) answer's status
    result_headers: list[tuple[str, str]] = field(default_factory=list)
    result_body: bytes = b""
    truncated: bool = False  # the result body was longer than RESULT_CAP
    error: str = ""  # why the last attempt failed, or why the call failed
    finished: float | None = None
    callback_state: str | None = None  # pending | delivered | failed | refused

    @property
    def final(self) -> bool:
        return self.state in ("done", "failed")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "function": self.function, "method": self.method, "path": self.path,
            "query": self.query, "headers": [list(h) for h in self.headers], "body": _b64(self.body),
            "callback": self.callback, "client": self.client, "created": self.created, "state": self.state,
            "attempts": self.attempts, "tries": self.tries, "status": self.status,
            "result_headers": [list(h) for h in self.result_headers], "result_body": _b64(self.result_body),
            "truncated": self.truncated, "error": self.error, "finished": self.finished,
            "callback_state": self.callback_state,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Call:
        return cls(
            id=str(d["id"]), function=str(d["function"]), method=str(d.get("method", "POST")),
            path=str(d.get("path", "/")), query=str(d.get("query", "")),
            headers=[(str(k), str(v)) for k, v in d.get("headers", [])],
            body=base64.b64decode(d.get("body", "")), callback=d.get("callback"), client=str(d.get("client", "")),
            created=float(d.get("created", 0.0)), state=d.get("state", "queued"),
            attempts=int(d.get("attempts", 0)), tries=int(d.get("tries", 0)), status=d.get("status"),
            result_headers=[(str(k), str(v)) for k, v in d.get("result_headers", [])],
            result_body=base64.b64decode(d.get("result_body", "")), truncated=bool(d.get("truncated", False)),
            error=str(d.get("error", "")), finished=d.get("finished"), callback_state=d.get("callback_state"),
        )

    def view(self) -> dict[str, Any]:
        """What ``GET /v1/calls/ID`` answers (never the request body or headers)."""
        out: dict[str, Any] = {
            "id": self.id, "function": self.function, "state": self.state, "attempts": self.attempts,
            "status": self.status, "created": self.created, "finished": self.finished,
            "method": self.method, "path": self.path, "error": self.error or None,
            "callback": self.callback_state,
        }
        if self.final:
            out["headers"] = {k: v for k, v in self.result_headers}
            try:
                out["body"] = self.result_body.decode("utf-8")
                out["body_encoding"] = "utf-8"
            except UnicodeDecodeError:
                out["body"] = _b64(self.result_body)
                out["body_encoding"] = "base64"
            out["body_truncated"] = self.truncated
        return out

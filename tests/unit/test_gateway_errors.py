"""The gateway's one JSON answer writer (torpor.gateway.errors), as tables."""

from __future__ import annotations

import json
from typing import Any

import pytest

from torpor.gateway.errors import json_body, raw_response, send_json


class Sent:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def __call__(self, message: Any) -> None:
        self.messages.append(message)


@pytest.mark.parametrize(
    ("kwargs", "extra_headers"),
    [
        ({}, []),
        ({"retry_after": 1}, [(b"retry-after", b"1")]),
        ({"close": True}, [(b"connection", b"close")]),
        (
            {"retry_after": 30, "close": True, "headers": [(b"x-call-id", b"abc")]},
            [(b"retry-after", b"30"), (b"connection", b"close"), (b"x-call-id", b"abc")],
        ),
    ],
)
async def test_send_json_answers_with_length_and_the_headers_asked_for(
    kwargs: dict[str, Any], extra_headers: list[tuple[bytes, bytes]]
) -> None:
    send = Sent()
    body = {"error": "overloaded", "detail": "the queue is full: \u00e9"}
    assert await send_json(send, 503, body, **kwargs) == 503
    start, last = send.messages
    data = json.dumps(body).encode()
    assert start == {
        "type": "http.response.start",
        "status": 503,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            *extra_headers,
        ],
    }
    assert last == {"type": "http.response.body", "body": data, "more_body": False}
    assert json.loads(last["body"]) == body


@pytest.mark.parametrize(
    ("status", "error", "extra", "line"),
    [
        (400, "bad request", b"", b"HTTP/1.1 400 Bad Request"),
        (408, "request timeout", b"", b"HTTP/1.1 408 Request Timeout"),
        (
            431,
            "request header fields too large",
            b"",
            b"HTTP/1.1 431 Request Header Fields Too Large",
        ),
        (503, "too many connections", b"retry-after: 1\r\n", b"HTTP/1.1 503 Service Unavailable"),
    ],
)
def test_raw_response_is_a_whole_closing_answer(
    status: int, error: str, extra: bytes, line: bytes
) -> None:
    raw = raw_response(status, error, extra)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == line
    assert body == json_body({"error": error}) and json.loads(body) == {"error": error}
    assert b"content-length: %d" % len(body) in lines
    assert lines[-1] == b"connection: close"
    assert (b"retry-after: 1" in lines) == bool(extra)

"""The OpenFaaS python3-http handler style of the runtime (torpor.runtime.openfaas),
through the runtime's own Request and rendering (torpor.runtime.server)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from torpor.runtime import server
from torpor.runtime.server import Headers, Request, _render, styled


def call(handle: Any, request: Request | None = None) -> tuple[int, dict[str, str], bytes]:
    fn = styled(handle, "openfaas")
    req = request or Request(
        "GET", "/a%20b", "x=1&x=2&y=", Headers([("User-Agent", "t"), ("X-A", "1")]), b"hi"
    )
    result = asyncio.run(fn(req)) if asyncio.iscoroutinefunction(fn) else fn(req)
    status, headers, body = _render(result)
    return status, {k.lower(): v for k, v in headers}, body


def test_the_event_is_what_the_template_hands_over() -> None:
    seen: dict[str, Any] = {}

    def handle(event: Any, context: Any) -> Any:
        seen.update(
            body=event.body,
            method=event.method,
            path=event.path,
            first=event.query.get("x"),
            every=event.query.getlist("x"),
            y=event.query["y"],
            missing=event.query.get("z", "d"),
            agent=event.headers.get("user-agent"),
            keys=sorted(event.query),
            hostname=context.hostname,
        )
        return {"body": "ok"}

    assert call(handle)[0] == 200
    assert seen == {
        "body": b"hi",
        "method": "GET",
        "path": "/a b",
        "first": "1",
        "every": ["1", "2"],
        "y": "",
        "missing": "d",
        "agent": "t",
        "keys": ["x", "y"],
        "hostname": seen["hostname"],
    }


@pytest.mark.parametrize(
    "result, status, ctype, body",
    [
        ({"statusCode": 201, "body": {"a": 1}}, 201, "application/json", b'{"a": 1}'),
        ({"body": "text"}, 200, "text/html; charset=utf-8", b"text"),
        ({"statusCode": 204}, 204, None, b""),
        ({"body": 42, "headers": {"Content-Type": "text/plain"}}, 200, "text/plain", b"42"),
        (
            {"body": b"\x00\x01", "headers": [("Content-Type", "application/octet-stream")]},
            200,
            "application/octet-stream",
            b"\x00\x01",
        ),
        ("plain", 200, "text/html; charset=utf-8", b"plain"),
        (None, 200, "text/html; charset=utf-8", b""),
        (("made", 202), 202, "text/html; charset=utf-8", b"made"),
        (("made", 202, {"X-B": "2"}), 202, "text/html; charset=utf-8", b"made"),
        ([1, 2], 200, "application/json", b"[1, 2]"),
    ],
)
def test_return_values_become_responses_as_in_the_template(
    result: Any, status: int, ctype: str | None, body: bytes
) -> None:
    got_status, headers, got_body = call(lambda event, context: result)
    assert (got_status, got_body) == (status, body)
    assert headers.get("content-type") == ctype


def test_headers_of_a_dict_result_are_sent_and_a_bad_status_is_a_500() -> None:
    _, headers, _ = call(lambda e, c: {"body": "x", "headers": {"X-Kind": "teapot"}})
    assert headers["x-kind"] == "teapot"
    rendered = styled(lambda e, c: {"statusCode": 99}, "openfaas")
    with pytest.raises(server._BadResult, match="status 99"):
        _render(rendered(Request("GET", "/")))


def test_async_handlers_and_unknown_styles() -> None:
    async def handle(event: Any, context: Any) -> Any:
        return {"statusCode": 200, "body": event.method}

    assert call(handle)[2] == b"GET"
    assert styled(print, "torpor") is print and styled(print, "") is print
    with pytest.raises(ValueError, match="expected torpor or openfaas"):
        styled(print, "lambda")

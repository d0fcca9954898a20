"""Run with `pytest` in this folder: the handler alone, no platform needed."""

import json
from types import SimpleNamespace

from handler import handle


def request(method="GET", path="/", body=b""):
    return SimpleNamespace(
        method=method, path=path, query={}, headers={}, body=body, json=lambda: json.loads(body)
    )


def test_get_answers_a_message():
    assert handle(request(path="/x")) == {"message": "hello from __NAME__", "path": "/x"}


def test_post_echoes_the_json_body():
    assert handle(request("POST", body=b'{"a": 1}')) == {"received": {"a": 1}}


def test_post_without_json_is_an_error():
    assert "error" in handle(request("POST", body=b"not json"))

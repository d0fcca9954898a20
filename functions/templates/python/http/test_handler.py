"""Run with `pytest` in this folder: the handler alone, no platform needed."""

from types import SimpleNamespace

from handler import handle


def request(path="/", query=None, body=b""):
    return SimpleNamespace(method="GET", path=path, query=query or {}, headers={}, body=body)


def test_greets_the_world_by_default():
    assert handle(request()) == "hello, world!\n"


def test_greets_by_name():
    assert handle(request(query={"name": "you"})) == "hello, you!\n"

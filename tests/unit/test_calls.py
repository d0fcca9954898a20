"""Asynchronous calls, the pure parts: the record, the backoff, `async:` in the spec and
the callback URL rules."""

from __future__ import annotations

import ipaddress

import pytest

from torpor.gateway.callback import Allow, CallbackRefused, check_url, resolve
from torpor.gateway.calls import BACKOFF_BASE, BACKOFF_CAP, backoff, retryable
from torpor.model import Call, Spec, new_id, valid_id
from torpor.spec import SpecError, parse_spec


def test_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    assert [backoff(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert (BACKOFF_BASE, BACKOFF_CAP) == (0.5, 10.0)
    assert backoff(10**9) == BACKOFF_CAP  # no overflow for absurd counts


def test_only_5xx_is_retried() -> None:
    assert [retryable(s) for s in (200, 302, 404, 429, 499, 500, 503, 504)] == [
        False,
        False,
        False,
        False,
        False,
        True,
        True,
        True,
    ]


def test_call_round_trips_and_its_view_hides_the_request() -> None:
    c = Call(
        id=new_id(),
        function="hello",
        headers=[("x-a", "1")],
        body=b"\x00secret",
        callback="http://127.0.0.1/",
    )
    assert valid_id(c.id) and not valid_id("../etc") and not valid_id(c.id.upper())
    assert Call.from_dict(c.to_dict()) == c
    v = c.view()
    assert v["state"] == "queued" and "body" not in v and "headers" not in v
    c.state, c.status, c.result_body, c.result_headers = (
        "done",
        200,
        b"\xff\xfe",
        [("content-type", "x/y")],
    )
    v = c.view()
    assert (v["body_encoding"], v["headers"]) == ("base64", {"content-type": "x/y"})
    c.result_body = "héllo".encode()
    assert c.view()["body"] == "héllo"


def test_async_section_of_the_spec() -> None:
    spec = parse_spec({"name": "a", "async": {"concurrency": 50, "max_attempts": 5}})
    assert (spec.async_calls.concurrency, spec.async_calls.max_attempts) == (50, 5)
    assert parse_spec({"name": "a"}).async_calls.max_attempts == 3  # the documented default
    assert Spec.from_dict(spec.to_dict()) == spec
    assert parse_spec(spec.to_dict()) == spec
    old = spec.to_dict()
    del old["async"]  # a record stored before the key existed
    assert Spec.from_dict(old).async_calls.concurrency == 10


@pytest.mark.parametrize(
    ("section", "path"),
    [
        ({"concurrency": 0}, "async.concurrency"),
        ({"concurrency": 1001}, "async.concurrency"),
        ({"concurrency": "x"}, "async.concurrency"),
        ({"max_attempts": 0}, "async.max_attempts"),
        ({"max_attempts": 21}, "async.max_attempts"),
        ({"max_attempts": 2.5}, "async.max_attempts"),
        ({"retries": 3}, "async.retries"),
        ("fast", "async"),
    ],
)
def test_async_bounds_are_refused_by_path(section: object, path: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec({"name": "a", "async": section})
    assert e.value.path == path


LOOP = Allow.parse(None)


def test_default_allow_list_is_loopback_only() -> None:
    assert LOOP.allows(ipaddress.ip_address("127.0.0.1")) and LOOP.allows(
        ipaddress.ip_address("127.9.9.9")
    )
    assert LOOP.allows(ipaddress.ip_address("::1")) and LOOP.allows(
        ipaddress.ip_address("::ffff:127.0.0.1")
    )
    assert not LOOP.allows(ipaddress.ip_address("10.0.0.1"))
    assert not LOOP.allows(ipaddress.ip_address("::ffff:10.0.0.1"))
    with pytest.raises(ValueError):
        Allow.parse("10.0.0.0/8,not a host")


@pytest.mark.parametrize(
    "url",
    [
        "",
        "http://10.0.0.1/",
        "https://127.0.0.1/",
        "gopher://127.0.0.1/",
        "http://u@127.0.0.1/",
        "http://127.0.0.1:0/",
        "http://127.0.0.1:70000/",
        "http://2130706433/",
        "http://127.1/",
        "http://0x7f.1/",
        "http://[::ffff:192.168.0.1]/",
        "http:///x",
        "http://127.0.0.1/\r\nX: y",
        "http://a_b.example/",
        "http://" + "a" * 2048 + "/",
        "http://127.0.0.1/é",
    ],
)
@pytest.mark.security
def test_hostile_callback_urls_are_refused(url: str, attack: object) -> None:
    """Point a callback where it must not go: other networks, schemes, user info, numeric host spellings, header injection"""
    with pytest.raises(CallbackRefused):
        check_url(url, LOOP)
    attack.ended("CallbackRefused at accept")  # type: ignore[attr-defined]


def test_good_callback_urls() -> None:
    t = check_url("http://127.0.0.1:9000/hook?a=1", LOOP)
    assert (str(t.address), t.port, t.target) == ("127.0.0.1", 9000, "/hook?a=1")
    t = check_url("http://LocalHost/", LOOP)
    assert (t.host, t.address, t.port, t.target) == ("localhost", None, 80, "/")
    assert check_url("http://[::1]:81/", LOOP).port == 81


async def test_names_are_resolved_and_every_address_checked() -> None:
    assert str(await resolve(check_url("http://localhost:1/", LOOP), LOOP)) in ("127.0.0.1", "::1")
    only_ten = Allow.parse("10.0.0.0/8")
    with pytest.raises(CallbackRefused, match="outside the callback allow-list"):
        await resolve(check_url("http://localhost:1/", only_ten), only_ten)
    named = Allow.parse("localhost")  # a listed name is trusted wherever it resolves
    assert await resolve(check_url("http://localhost:1/", named), named)
    with pytest.raises(CallbackRefused, match="does not resolve"):
        await resolve(check_url("http://nothing.invalid/", LOOP), LOOP)

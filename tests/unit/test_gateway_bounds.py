"""Pure parts of the gateway's limits: ``max_body`` in the spec, the trusted-proxy list,
the forwarding headers, and a queued request whose client leaves."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from torpor.gateway.activator import Activator, ClientGone
from torpor.gateway.balancer import Backend, Balancer
from torpor.gateway.forwarded import Forwarding, parse_trusted_proxies
from torpor.gateway.upstream import Pools
from torpor.model import MiB, Spec
from torpor.spec import SpecError, parse_spec, spec_to_yaml_dict

# -- max_body ------------------------------------------------------------------------------


def test_max_body_defaults_to_10mi_and_takes_sizes() -> None:
    assert parse_spec({"name": "f"}).max_body == 10 * MiB
    assert parse_spec({"name": "f", "max_body": "1Mi"}).max_body == MiB
    assert parse_spec({"name": "f", "max_body": 512}).max_body == 512
    assert parse_spec({"name": "f", "max_body": "1Gi"}).max_body == 1024**3
    doc = spec_to_yaml_dict(Spec(name="f", max_body=3 * MiB))
    assert doc["max_body"] == "3Mi" and parse_spec(doc).max_body == 3 * MiB


@pytest.mark.parametrize("value", [0, "0", "2Gi", -1, "lots", True, 1.5])
def test_max_body_out_of_bounds_is_refused_by_name(value: Any) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({"name": "f", "max_body": value})
    assert info.value.path == "max_body"
    assert str(info.value).startswith("max_body: expected ")


def test_old_records_without_max_body_get_the_default() -> None:
    d = Spec(name="f").to_dict()
    del d["max_body"]
    assert Spec.from_dict(d).max_body == 10 * MiB


# -- trusted proxies --------------------------------------------------------------------


def test_trusted_proxies_parse() -> None:
    nets = parse_trusted_proxies(" 10.0.0.0/8, 192.168.1.7 ,::1,")
    assert [str(n) for n in nets] == ["10.0.0.0/8", "192.168.1.7/32", "::1/128"]
    assert parse_trusted_proxies("") == () and parse_trusted_proxies(None) == ()
    assert [str(n) for n in parse_trusted_proxies("10.1.2.3/8")] == [
        "10.0.0.0/8"
    ]  # host bits allowed


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "localhost", "1.2.3", "*"])
def test_a_bad_trusted_proxy_is_named(bad: str) -> None:
    with pytest.raises(ValueError, match=repr(bad)):
        parse_trusted_proxies(f"10.0.0.0/8,{bad}")


# -- forwarding headers -----------------------------------------------------------------


def _scope(peer: str, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"client": (peer, 5555), "headers": headers or []}


SPOOF = [
    (b"x-forwarded-for", b"6.6.6.6"),
    (b"forwarded", b"for=6.6.6.6"),
    (b"x-forwarded-host", b"evil"),
    (b"x-forwarded-proto", b"https"),
]


def test_untrusted_peer_gets_our_view_only() -> None:
    out = dict(Forwarding().headers(_scope("127.0.0.1", SPOOF), b"fn.example:8080"))
    assert out == {
        b"forwarded": b'for=127.0.0.1;host="fn.example:8080";proto=http',
        b"x-forwarded-for": b"127.0.0.1",
        b"x-forwarded-host": b"fn.example:8080",
        b"x-forwarded-proto": b"http",
    }


def test_loopback_is_not_trusted_unless_listed() -> None:
    assert (
        dict(
            Forwarding(parse_trusted_proxies("10.0.0.0/8")).headers(
                _scope("127.0.0.1", SPOOF), b"h"
            )
        )[b"x-forwarded-for"]
        == b"127.0.0.1"
    )


def test_ipv6_peers_are_quoted_and_mapped_ipv4_is_ipv4() -> None:
    fwd = Forwarding(parse_trusted_proxies("10.0.0.0/8"))
    out = dict(fwd.headers(_scope("::1"), b"h"))
    assert (
        out[b"forwarded"] == b'for="[::1]";host="h";proto=http'
        and out[b"x-forwarded-for"] == b"::1"
    )
    mapped = dict(fwd.headers(_scope("::ffff:10.1.2.3", SPOOF), b"h"))
    assert mapped[b"x-forwarded-for"] == b"6.6.6.6, 10.1.2.3"  # judged as 10.1.2.3: trusted
    assert mapped[b"forwarded"] == b'for=6.6.6.6, for=10.1.2.3;host="h";proto=http'


def test_trusted_peer_chain_is_appended_in_order() -> None:
    fwd = Forwarding(parse_trusted_proxies("10.0.0.0/8"))
    headers = [
        (b"x-forwarded-for", b"1.1.1.1"),
        (b"x-forwarded-for", b"2.2.2.2, 3.3.3.3"),
        (b"forwarded", b"for=1.1.1.1"),
        (b"x-forwarded-proto", b"https"),
    ]
    out = dict(fwd.headers(_scope("10.9.9.9", headers), b"h"))
    assert out[b"x-forwarded-for"] == b"1.1.1.1, 2.2.2.2, 3.3.3.3, 10.9.9.9"
    assert out[b"forwarded"] == b'for=1.1.1.1, for=10.9.9.9;host="h";proto=http'
    assert out[b"x-forwarded-proto"] == b"https" and out[b"x-forwarded-host"] == b"h"


def test_host_is_escaped_in_forwarded_and_absent_when_missing() -> None:
    out = dict(Forwarding().headers(_scope("1.2.3.4"), b'a"b\\c;for=evil'))
    assert out[b"forwarded"] == b'for=1.2.3.4;host="a\\"b\\\\c;for=evil";proto=http'
    none = dict(Forwarding().headers(_scope("1.2.3.4"), b""))
    assert none[b"forwarded"] == b"for=1.2.3.4;proto=http" and b"x-forwarded-host" not in none
    unknown = dict(Forwarding().headers({"client": None, "headers": []}, b""))
    assert unknown[b"forwarded"] == b"for=unknown;proto=http"


def test_peer_memo_is_bounded() -> None:
    fwd = Forwarding()
    for i in range(5000):
        fwd.headers(_scope(f"10.0.{i // 256}.{i % 256}"), b"h")
    assert len(fwd._peers) <= 4096


# -- the activator ----------------------------------------------------------------------


async def test_a_waiter_whose_client_leaves_leaves_the_queue_at_once() -> None:
    bal = Balancer(limit=1)
    pokes: list[int] = []
    act = Activator(bal, pokes.append)
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    leaving = asyncio.create_task(act.wait(30, gone))
    staying = asyncio.create_task(act.wait(30))
    await asyncio.sleep(0.01)
    assert len(act) == 2
    gone.set_result(None)
    with pytest.raises(ClientGone):
        await asyncio.wait_for(leaving, 1)  # at once, not at the next 1 s poke tick
    assert len(act) == 1
    b = Backend("a", "a:1", Pools().get("127.0.0.1:1"))
    bal.backends = [b]
    act.dispatch()
    assert await asyncio.wait_for(staying, 1) is b  # the backend went to the one still there
    assert b.in_flight == 1


async def test_a_backend_handed_as_the_client_leaves_is_given_back() -> None:
    bal = Balancer(limit=1)
    act = Activator(bal, lambda _n: None)
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiter = asyncio.create_task(act.wait(30, gone))
    await asyncio.sleep(0.01)
    b = Backend("a", "a:1", Pools().get("127.0.0.1:1"))
    bal.backends = [b]
    act.dispatch()  # hands b to the waiter...
    gone.set_result(None)  # ...whose client leaves in the same step
    with pytest.raises(ClientGone):
        await waiter
    assert b.in_flight == 0 and len(act) == 0


def test_lines_encode_the_headers_and_memoise_untrusted_peers_only() -> None:
    fwd = Forwarding(parse_trusted_proxies("10.0.0.0/8"))
    lines = fwd.lines(_scope("127.0.0.1", SPOOF), b"h")
    assert lines == b"".join(
        n + b": " + v + b"\r\n" for n, v in fwd.headers(_scope("127.0.0.1"), b"h")
    )
    assert (
        fwd.lines(_scope("127.0.0.1"), b"h") is lines
    )  # memoised: the client's headers play no part
    first = fwd.lines(_scope("10.0.0.1", [(b"x-forwarded-for", b"1.1.1.1")]), b"h")
    second = fwd.lines(_scope("10.0.0.1", [(b"x-forwarded-for", b"2.2.2.2")]), b"h")
    assert b"x-forwarded-for: 1.1.1.1, 10.0.0.1\r\n" in first
    assert (
        b"x-forwarded-for: 2.2.2.2, 10.0.0.1\r\n" in second
    )  # a trusted peer's chain: per request

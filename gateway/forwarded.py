"""Forwarding headers for a proxied request: ``Forwarded`` (RFC 7239), ``X-Forwarded-For``,
``X-Forwarded-Host`` and ``X-Forwarded-Proto``, from what the gateway saw itself.

    fwd = Forwarding(parse_trusted_proxies("10.0.0.0/8, 192.168.1.7"))
    fwd.headers(scope, host)  # [(b"forwarded", b"for=..."), (b"x-forwarded-for", ...), ...]
    fwd.lines(scope, host)    # the same, encoded: add_request_lines of upstream.proxy()

The peer is the socket's (``scope["client"]``), the host the request's ``Host`` header,
the protocol ``http`` (the gateway has no TLS). ``upstream.proxy()`` never forwards the
client's own forwarding headers, so what the replica reads is:

- peer not trusted (the default: the trusted list is empty, loopback included):
  ``Forwarded: for=PEER;host="HOST";proto=http``, ``X-Forwarded-For: PEER``,
  ``X-Forwarded-Host: HOST``, ``X-Forwarded-Proto: http``; whatever the client sent
  under those names is gone.
- peer in a trusted network (a proxy in front of the gateway): the chain is appended to
  as proxies do, ``Forwarded: <theirs>, for=PEER;host="HOST";proto=http`` and
  ``X-Forwarded-For: <theirs>, PEER``; their ``X-Forwarded-Host``/``-Proto`` are kept
  (the first proxy knows what the client asked for), ours set when they sent none.

An IPv6 peer is quoted and bracketed (``for="[::1]"``); an IPv4-mapped one
(``::ffff:10.1.2.3``, a dual-stack listener) is written and judged as IPv4. On the hot
path (an untrusted peer) ``lines`` is one dict lookup: the encoded lines are memoised
per (peer, Host), bounded.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from torpor.gateway.asgi import Headers, Scope

__all__ = ["FORWARDING_HEADERS", "Forwarding", "Network", "parse_trusted_proxies"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

FORWARDED = b"forwarded"
XFF = b"x-forwarded-for"
XFH = b"x-forwarded-host"
XFP = b"x-forwarded-proto"
FORWARDING_HEADERS = frozenset({FORWARDED, XFF, XFH, XFP})
_PROTO = b"http"
_PROTO_PARAM = b";proto=http"
_MEMO = 4096  # peers remembered (clients choose their addresses)


def parse_trusted_proxies(text: str | Iterable[str] | None) -> tuple[Network, ...]:
    """Networks from ``"10.0.0.0/8, 192.168.1.7, ::1"`` (a bare address is a /32 or /128).

    Raises ``ValueError`` naming the item that is not an address or a CIDR.
    """
    if text is None:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[Network] = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                f"{item[:60]!r} is not an IP address or CIDR (e.g. 10.0.0.0/8, 192.168.1.7, ::1)"
            ) from None
    return tuple(out)


class _Peer:
    __slots__ = ("trusted", "element", "ip")

    def __init__(self, trusted: bool, element: bytes, ip: bytes) -> None:
        self.trusted = trusted
        self.element = element  # b"for=1.2.3.4" / b'for="[::1]"'
        self.ip = ip  # for X-Forwarded-For


def _quoted(value: bytes) -> bytes:
    """An RFC 7230 quoted-string of ``value``."""
    if b"\\" in value or b'"' in value:
        value = value.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return b'"' + value + b'"'


class Forwarding:
    """Builds the forwarding headers of each proxied request (see the module doc)."""

    def __init__(self, trusted: Iterable[Network] = ()) -> None:
        self.trusted = tuple(trusted)
        self._peers: dict[str, _Peer] = {}
        self._lines: dict[tuple[str, bytes], bytes] = {}  # untrusted (peer, host) -> lines

    def lines(self, scope: Scope, host: bytes) -> bytes:
        """``headers(scope, host)`` as header lines, each ending in CRLF."""
        client = scope.get("client")
        key = (client[0] if client else "", host)
        got = self._lines.get(key)
        if got is not None:
            return got
        out = b"".join(
            [name + b": " + value + b"\r\n" for name, value in self.headers(scope, host)]
        )
        if not self._peers[key[0]].trusted:  # (headers() remembered the peer)
            if len(self._lines) >= _MEMO:
                self._lines.clear()
            self._lines[key] = out
        return out

    def _peer(self, host: str) -> _Peer:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            peer = _Peer(False, b"for=unknown", b"unknown")
        else:
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            trusted = any(addr in net for net in self.trusted)
            ip = str(addr).encode()
            element = b"for=" + ip if addr.version == 4 else b'for="[' + ip + b']"'
            peer = _Peer(trusted, element, ip)
        if len(self._peers) >= _MEMO:
            self._peers.clear()
        self._peers[host] = peer
        return peer

    def headers(self, scope: Scope, host: bytes) -> Headers:
        """The four headers to add to the upstream request of ``scope``."""
        client = scope.get("client")
        ip = client[0] if client else ""
        peer = self._peers.get(ip) or self._peer(ip)
        ours = peer.element
        if host:
            ours += b";host=" + _quoted(host)
        ours += _PROTO_PARAM
        if not peer.trusted:
            out = [(FORWARDED, ours), (XFF, peer.ip), (XFP, _PROTO)]
            if host:
                out.append((XFH, host))
            return out
        prior: dict[bytes, list[bytes]] = {}
        for name, value in scope["headers"]:
            if name in FORWARDING_HEADERS:
                prior.setdefault(name, []).append(value)
        fwd = prior.get(FORWARDED)
        xff = prior.get(XFF)
        xfh = prior.get(XFH)
        xfp = prior.get(XFP)
        out = [
            (FORWARDED, b", ".join([*fwd, ours]) if fwd else ours),
            (XFF, b", ".join([*xff, peer.ip]) if xff else peer.ip),
            (XFP, xfp[0] if xfp else _PROTO),
        ]
        if xfh:
            out.append((XFH, xfh[0]))
        elif host:
            out.append((XFH, host))
        return out

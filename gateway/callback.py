"""Callbacks of asynchronous calls: where a result may be POSTed, and posting it.

The URL (``X-Callback-Url``) comes from a client and is hostile. It must be
``http://HOST[:PORT]/path`` (no user info, printable ASCII, at most ``MAX_URL``
characters); HOST is an IP literal or a DNS name whose last label is not numeric
(``127.1`` and ``2130706433`` are refused: resolvers read them as addresses). The
platform allow-list (``TORPOR_CALLBACK_ALLOW``: comma-separated CIDR networks and host
names; default ``127.0.0.0/8,::1/128``, loopback only) decides:

- an IP literal must lie in an allowed network;
- a DNS name is resolved when the callback is sent; every address it resolves to must lie
  in an allowed network, unless the name itself is on the list. The connection goes to
  the address that was checked (no second lookup), so a name cannot resolve one way for
  the check and another way for the connection.

Redirects are never followed (a 3xx is a failed delivery). A delivery is tried
``ATTEMPTS`` times (waits of 1 s, then 2 s) and counts as delivered on any 2xx. Each
try has ``TIMEOUT`` seconds in all, and reads at most ``MAX_HEAD`` bytes of the answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import os
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from torpor.model import Call

MAX_URL = 2048
ATTEMPTS = 3
TIMEOUT = 10.0
MAX_HEAD = 16 * 1024
DEFAULT_ALLOW = "127.0.0.0/8,::1/128"
ENV = "TORPOR_CALLBACK_ALLOW"

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
_PRINTABLE = re.compile(r"[\x21-\x7e]+", re.ASCII)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class CallbackRefused(ValueError):
    """The callback URL is malformed or points where the allow-list does not reach."""


@dataclass(frozen=True)
class Allow:
    networks: tuple[Network, ...]
    names: frozenset[str]

    @classmethod
    def parse(cls, text: str | None) -> Allow:
        nets: list[Network] = []
        names: set[str] = set()
        for item in (text if text is not None else DEFAULT_ALLOW).split(","):
            item = item.strip().lower()
            if not item:
                continue
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
                continue
            except ValueError:
                pass
            if not _dns_name(item):
                raise ValueError(f"{ENV}: {item[:64]!r} is neither a CIDR network nor a host name")
            names.add(item)
        return cls(tuple(nets), frozenset(names))

    @classmethod
    def from_env(cls) -> Allow:
        return cls.parse(os.environ.get(ENV))

    def allows(self, addr: Address) -> bool:
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr.version == n.version and addr in n for n in self.networks)


def _dns_name(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(x) for x in labels):
        return False
    return not labels[-1].isdigit() and not labels[-1].startswith("0x")


@dataclass(frozen=True)
class Target:
    host: str  # as written (lowercase), for the Host header
    address: Address | None  # an IP literal, else None (resolve at delivery)
    port: int
    target: str  # path and query


def check_url(url: str, allow: Allow) -> Target:
    """The parsed callback URL; raise CallbackRefused saying what is wrong."""
    if not url or len(url) > MAX_URL or not _PRINTABLE.fullmatch(url):
        raise CallbackRefused(
            f"X-Callback-Url must be printable ASCII without spaces, 1 to {MAX_URL} characters"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise CallbackRefused(f"X-Callback-Url is not a valid URL: {e}") from None
    if parts.scheme != "http":
        raise CallbackRefused("X-Callback-Url must be an http:// URL")
    if "@" in parts.netloc or parts.username is not None:
        raise CallbackRefused("X-Callback-Url must not carry user info")
    host = (parts.hostname or "").lower()
    if not host:
        raise CallbackRefused("X-Callback-Url has no host")
    if port == 0:
        raise CallbackRefused("X-Callback-Url: port 0")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        addr: Address | None = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if addr is not None:
        if not allow.allows(addr):
            raise CallbackRefused(
                f"callback host {host} is not on the platform's callback allow-list ({ENV})"
            )
    elif not _dns_name(host):
        raise CallbackRefused(f"callback host {host[:64]!r} is not an IP address or a DNS name")
    return Target(host, addr, port or 80, target)


async def resolve(t: Target, allow: Allow) -> Address:
    """The address to connect to, checked against the allow-list."""
    if t.address is not None:
        return t.address
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(t.host, t.port, type=socket.SOCK_STREAM), TIMEOUT
        )
    except (OSError, TimeoutError) as e:
        raise CallbackRefused(f"callback host {t.host} does not resolve: {e}") from None
    addrs = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addrs:
        raise CallbackRefused(f"callback host {t.host} does not resolve")
    if t.host.rstrip(".") not in allow.names:
        bad = [a for a in addrs if not allow.allows(a)]
        if bad:
            raise CallbackRefused(
                f"callback host {t.host} resolves to {bad[0]}, outside the callback allow-list ({ENV})"
            )
    return addrs[0]


def payload(call: Call) -> bytes:
    return json.dumps(
        {
            "id": call.id,
            "function": call.function,
            "state": call.state,
            "status": call.status,
            "attempts": call.attempts,
            "headers": dict(call.result_headers),
            "body": base64.b64encode(call.result_body).decode("ascii"),
            "body_truncated": call.truncated,
            "error": call.error or None,
        }
    ).encode()


async def _post_once(addr: Address, t: Target, call: Call, body: bytes) -> int:
    host = t.host if t.address is None or t.address.version == 4 else f"[{t.host}]"
    if t.port != 80:
        host += f":{t.port}"
    head = (
        f"POST {t.target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Call-Id: {call.id}\r\nX-Torpor-Call-State: {call.state}\r\n"
        f"X-Torpor-Status: {call.status if call.status is not None else ''}\r\n"
        "User-Agent: torpor-callback\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(str(addr), t.port)
        try:
            writer.write(head + body)
            await writer.drain()
            line = await reader.readuntil(b"\r\n")
            if len(line) > MAX_HEAD:
                raise ValueError("status line too long")
            parts = line.split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise ValueError("not an HTTP response")
            return int(parts[1])
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def deliver(call: Call, allow: Allow) -> str:
    """POST the result of a final call to its callback; 'delivered', 'failed' or 'refused'."""
    if not call.callback:
        return "refused"
    try:
        t = check_url(call.callback, allow)  # the allow-list may have changed since accept
    except CallbackRefused:
        return "refused"
    body = payload(call)
    for attempt in range(ATTEMPTS):
        if attempt:
            await asyncio.sleep(float(2 ** (attempt - 1)))
        try:
            addr = await resolve(t, allow)
        except CallbackRefused:
            return "refused"
        try:
            status = await _post_once(addr, t, call, body)
        except (
            OSError,
            TimeoutError,
            ValueError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            continue
        if 200 <= status < 300:
            return "delivered"
        if 300 <= status < 500 and status not in (408, 429):
            return "failed"  # redirects are not followed; a 4xx will not change
    return "failed"

"""How the gateway's upstream pool reads a replica endpoint: IPv4, a name, and an IPv6
Pod IP (bracketed in the endpoint and the Host header, bare for connect())."""

from __future__ import annotations

import pytest

from torpor.gateway.upstream import UpstreamPool


@pytest.mark.parametrize(
    "endpoint,host,port",
    [
        ("10.1.2.3:8080", "10.1.2.3", 8080),
        ("replica.local:9000", "replica.local", 9000),
        ("[fd00::7]:8080", "fd00::7", 8080),
        ("[::1]:1", "::1", 1),
    ],
)
def test_endpoint_host_and_port(endpoint: str, host: str, port: int) -> None:
    pool = UpstreamPool(endpoint)
    assert (pool.host, pool.port) == (host, port)
    assert pool.host_header == endpoint.encode()  # the Host header keeps the brackets


@pytest.mark.parametrize(
    "endpoint", ["fd00::7:8080", "10.1.2.3", "[fd00::7]", "host:port", "[fd00::7]x:80"]
)
def test_ambiguous_or_incomplete_endpoints_are_refused(endpoint: str) -> None:
    with pytest.raises(ValueError, match="endpoint must be host:port"):
        UpstreamPool(endpoint)

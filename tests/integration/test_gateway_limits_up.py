"""The gateway's limits end to end: a real ``torpor up`` (process driver), real replicas,
the real CLI. The gateway-level tests of the same limits are in test_gateway_limits.py.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from platform_proc import Torpor, function_copy, torpor_up

pytestmark = pytest.mark.slow
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Torpor]:
    """One `torpor up` for the end-to-end tests below; 127.0.0.2 is a trusted proxy."""
    tmp = tmp_path_factory.mktemp("limits")
    with torpor_up(tmp / "state", extra=["--trusted-proxies", "127.0.0.2/32"]) as t:
        t.tmp = tmp  # type: ignore[attr-defined]
        yield t


@pytest.mark.security
def test_e2e_oversized_body_to_a_function_at_zero_is_413_and_wakes_nothing(
    up: Torpor, attack: Any
) -> None:
    """POST a body over the function's max_body to a function at zero, to wake it for nothing"""
    up.deploy(
        function_copy(
            up.tmp,
            "echo",
            name="atzero",
            max_body="1Ki",  # type: ignore[attr-defined]
            scale={"idle": "2s"},
        )
    )
    up.wait_for(lambda: not up.function("atzero")["replicas"], 30, "the function at zero")
    r = up.request("atzero", "/", "POST", content=b"x" * 4096)
    assert r.status_code == 413 and r.json()["field"] == "max_body" and "1Ki" in r.json()["detail"]
    assert up.function("atzero")["replicas"] == []
    metrics = [
        m
        for m in httpx.get(f"{up.gateway}/metrics", timeout=5).text.splitlines()
        if '"atzero"' in m
    ]
    queued = [m for m in metrics if m.startswith("torpor_queued_requests{")]
    assert queued and all(m.endswith(" 0.0") for m in queued)
    assert not [m for m in metrics if m.startswith("torpor_requests_total{")]  # not counted
    # the next request is the one that wakes it; a body within the limit goes through whole
    r2 = up.request("atzero", "/", "POST", content=b"y" * 1000)
    assert r2.status_code == 200 and r2.json()["length"] == 1000
    assert r2.headers["x-torpor-cold-start"] == "true"
    attack.ended(f"413 {r.json()['error']} (max_body 1Ki); still 0 replicas, nothing queued")


def test_e2e_a_max_body_above_the_runtime_default_reaches_the_handler(up: Torpor) -> None:
    up.deploy(function_copy(up.tmp, "hello", name="bigbody", max_body="40Mi"))  # type: ignore[attr-defined]
    r = up.request(
        "bigbody", "/?name=big", "POST", content=b"z" * (33 * MiB)
    )  # the runtime's own default: 32Mi
    assert r.status_code == 200 and r.text == "hello, big!\n"


@pytest.mark.security
def test_e2e_spoofed_x_forwarded_for_is_replaced_and_a_trusted_proxy_appended(
    up: Torpor, attack: Any
) -> None:
    """Send X-Forwarded-For: 1.2.3.4 through torpor up, to pose as another client to the function"""
    up.deploy(function_copy(up.tmp, "echo", name="fwd"))  # type: ignore[attr-defined]
    spoof = {"X-Forwarded-For": "1.2.3.4", "Forwarded": "for=1.2.3.4", "X-Forwarded-Proto": "https"}
    seen = up.request("fwd", "/", headers=spoof).json()["headers"]
    assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-forwarded-proto"] == "http"
    assert seen["forwarded"] == 'for=127.0.0.1;host="fwd.torpor.localhost";proto=http'
    # from 127.0.0.2, the configured trusted proxy: its chain is appended to
    with httpx.Client(
        transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=30
    ) as client:
        via = client.get(
            up.gateway + "/", headers={"Host": "fwd.torpor.localhost", **spoof}
        ).json()["headers"]
    assert via["x-forwarded-for"] == "1.2.3.4, 127.0.0.2" and via["x-forwarded-proto"] == "https"
    assert via["forwarded"] == 'for=1.2.3.4, for=127.0.0.2;host="fwd.torpor.localhost";proto=http'
    attack.ended(f"replaced: the function saw X-Forwarded-For {seen['x-forwarded-for']}")


@pytest.mark.security
def test_e2e_sigterm_returns_within_the_graceful_timeout_while_clients_hold_connections(
    tmp_path: Path, attack: Any
) -> None:
    """Hold connections open (a half-sent upload, a log stream, an idle one) so that torpor up never stops"""
    t = Torpor(tmp_path / "state", extra=["--graceful-timeout", "1"]).start()
    held: list[socket.socket] = []
    try:
        t.deploy(function_copy(tmp_path, "hello"))
        assert t.request("hello").status_code == 200
        upload = socket.create_connection(("127.0.0.1", t.port), timeout=10)
        upload.sendall(
            b"POST / HTTP/1.1\r\nHost: hello.torpor.localhost\r\nContent-Length: 100000\r\n\r\n"
            + b"u" * 1000
        )
        idle = socket.create_connection(("127.0.0.1", t.port), timeout=10)
        logs = socket.create_connection(("127.0.0.1", t.api_port), timeout=10)
        auth = "".join(f"{k}: {v}\r\n" for k, v in t.api_headers.items()).encode()
        logs.sendall(
            b"GET /v1/functions/hello/logs?follow=true HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + auth
            + b"\r\n"
        )
        assert logs.recv(12) == b"HTTP/1.1 200"  # the stream has begun
        held += [upload, idle, logs]
        assert t.proc is not None
        t.proc.send_signal(signal.SIGTERM)
        code = t.proc.wait(timeout=40)  # without a bound: forever (the upload never ends)
        assert code == 0
        assert list((t.state_dir / "replicas").glob("*.json")) == []
    finally:
        for s in held:
            s.close()
        t.stop(signal.SIGKILL)
    attack.ended(
        "torpor up exited 0 after SIGTERM: what was left was cut off after --graceful-timeout 1"
    )

"""Asynchronous calls end to end: a real `torpor up` (process driver, embedded store), real
replicas, the real CLI; distributed mode with real Redis and separate processes."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import free_port
from platform_proc import Torpor, function_copy, torpor_up

pytestmark = pytest.mark.slow

FLAKY = """
from torpor_runtime import Response


def handle(request):
    attempt = int(request.headers.get("x-torpor-attempt", "0"))
    ok_at = int(request.query.get("ok_at", "1"))
    if attempt < ok_at:
        return Response({"attempt": attempt, "ok": False}, status=500)
    status = int(request.query.get("status", "200"))
    return Response({"attempt": attempt, "ok": True, "call": request.headers.get("x-call-id")}, status=status)
"""


def flaky_copy(tmp: Path, **overrides: Any) -> Path:
    folder = function_copy(tmp, "echo", name="flaky", **overrides)
    (folder / "handler.py").write_text(FLAKY)
    return folder


def fire(
    up: Torpor,
    name: str,
    path: str = "/",
    body: bytes = b"x",
    headers: dict[str, str] | None = None,
    gateway: str | None = None,
) -> str:
    r = httpx.post(
        f"{gateway or up.gateway}/async-function/{name}{path}",
        content=body,
        headers=headers or {},
        timeout=30,
    )
    assert r.status_code == 202, r.text
    assert r.json()["id"] == r.headers["x-call-id"]
    return r.headers["x-call-id"]


def call_of(up: Torpor, cid: str) -> dict[str, Any]:
    r = up.api_call("GET", f"/v1/calls/{cid}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def wait_final(up: Torpor, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Every call's record once all are final (polls the recent list, then each call)."""
    out: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        still = []
        for cid in pending:
            c = call_of(up, cid)
            if c["state"] in ("done", "failed"):
                out[cid] = c
            else:
                still.append(cid)
        pending = still
        if pending:
            time.sleep(0.5)
    assert not pending, (
        f"{len(pending)} of {len(ids)} calls not final after {timeout}s: {call_of(up, pending[0])}"
    )
    return out


@pytest.fixture
def up(tmp_path: Path):
    with torpor_up(tmp_path / "state") as t:
        yield t


def test_accept_run_status_cli_and_metrics(up: Torpor, tmp_path: Path) -> None:
    up.deploy(function_copy(tmp_path, "echo", max_body="1Ki", scale={"idle": "2s"}))
    # unknown function and a body over max_body: refused at once, nothing stored
    r = httpx.post(f"{up.gateway}/async-function/nope", content=b"x", timeout=10)
    assert r.status_code == 404 and r.json()["error"] == "function not found"
    r = httpx.post(f"{up.gateway}/async-function/echo", content=b"x" * 2048, timeout=10)
    assert r.status_code == 413 and r.json()["field"] == "max_body"
    cid = fire(up, "echo", "/a%20b?x=1", body=b"hello", headers={"X-Custom": "yes"})
    [c] = wait_final(up, [cid], 60).values()
    assert (c["state"], c["attempts"], c["status"]) == ("done", 1, 200)
    assert c["created"] <= c["finished"]
    seen = json.loads(c["body"])
    assert (seen["method"], seen["path"], seen["query"], seen["body"]) == (
        "POST",
        "/a b",
        {"x": "1"},
        "hello",
    )
    assert seen["headers"]["x-call-id"] == cid and seen["headers"]["x-torpor-attempt"] == "1"
    assert seen["headers"]["x-custom"] == "yes"
    # the CLI: --async prints the id; `torpor calls` lists it; --id shows it
    out = up.cli("invoke", "echo", "--async", "-d", "from-cli", "--path", "/cli").stdout.strip()
    assert len(out) == 32
    wait_final(up, [out], 60)
    listing = up.cli("calls", "echo").stdout
    assert out in listing and cid in listing and "done" in listing
    assert "from-cli" in up.cli("calls", "echo", "--id", out).stdout
    assert up.api_call("GET", "/v1/calls/" + "0" * 32).status_code == 404
    assert up.api_call("GET", "/v1/calls/not-an-id").status_code == 400
    assert up.api_call("GET", "/v1/functions/nope/calls").status_code == 404
    metrics = httpx.get(f"{up.gateway}/metrics", timeout=10).text
    assert 'torpor_async_attempts_total{function="echo"} 2.0' in metrics
    assert 'torpor_async_queued{function="echo"} 0.0' in metrics
    assert "torpor_async_running" in metrics and "torpor_async_failed_total" in metrics


def test_500_calls_at_zero_all_complete_with_scale_up(up: Torpor, tmp_path: Path) -> None:
    up.deploy(
        function_copy(
            tmp_path,
            "slow",
            env={"SLEEP_MS": "300", "FAIL_RATE": "0"},
            scale={"min": 0, "max": 6, "target": 2, "idle": "30s"},
            **{"async": {"concurrency": 24}},
        )
    )
    up.cli("scale", "slow", "--replicas", "0")  # at zero, for sure
    up.wait_for(lambda: not up.function("slow")["replicas"], 60, "slow at zero")
    up.cli("scale", "slow", "--min", "0", "--max", "6")
    with cf.ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda _: fire(up, "slow"), range(500)))
    assert len(set(ids)) == 500
    most = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        most = max(most, len(up.ready_replicas("slow")))
        done = sum(
            1
            for c in up.api_call("GET", "/v1/functions/slow/calls", params={"limit": 1000}).json()[
                "calls"
            ]
            if c["state"] == "done"
        )
        if done == 500:
            break
        time.sleep(0.5)
    calls = wait_final(up, ids, 60)
    assert {c["state"] for c in calls.values()} == {"done"}
    assert most > 1, "the backlog never scaled the function beyond one replica"
    replicas = {json.loads(c["body"])["replica"] for c in calls.values()}
    assert len(replicas) > 1
    assert max(json.loads(c["body"])["in_flight"] for c in calls.values()) <= 24


def test_flaky_calls_succeed_within_attempts_and_4xx_is_final(up: Torpor, tmp_path: Path) -> None:
    up.deploy(flaky_copy(tmp_path, **{"async": {"max_attempts": 3}}))
    ok = [fire(up, "flaky", "/?ok_at=3") for _ in range(5)]
    never = fire(up, "flaky", "/?ok_at=9")
    four = fire(up, "flaky", "/?status=404")
    calls = wait_final(up, [*ok, never, four], 120)
    for cid in ok:
        c = calls[cid]
        assert (c["state"], c["attempts"], c["status"]) == ("done", 3, 200)
        assert json.loads(c["body"]) == {"attempt": 3, "ok": True, "call": cid}
    assert (calls[never]["state"], calls[never]["attempts"], calls[never]["status"]) == (
        "failed",
        3,
        500,
    )
    assert (calls[four]["state"], calls[four]["attempts"], calls[four]["status"]) == (
        "done",
        1,
        404,
    )
    metrics = httpx.get(f"{up.gateway}/metrics", timeout=10).text
    assert 'torpor_async_failed_total{function="flaky"} 1.0' in metrics
    assert 'torpor_async_attempts_total{function="flaky"} 19.0' in metrics  # 5x3 + 3 + 1


class _Sink(BaseHTTPRequestHandler):
    got: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).got.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a: Any) -> None:
        pass


def test_callbacks_arrive_with_the_result(up: Torpor, tmp_path: Path) -> None:
    up.deploy(flaky_copy(tmp_path))
    _Sink.got = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook?k=1"
        ids = [fire(up, "flaky", "/?ok_at=2", headers={"X-Callback-Url": url}) for _ in range(3)]
        also = fire(
            up,
            "flaky",
            "/?status=409",
            headers={"X-Callback-Url": f"http://localhost:{server.server_port}/"},
        )
        up.wait_for(lambda: len(_Sink.got) >= 4, 60, "4 callbacks")
        by_id = {h["x-call-id"]: (h, json.loads(b)) for h, b in _Sink.got}
        assert set(by_id) == {*ids, also}
        for cid in ids:
            h, doc = by_id[cid]
            assert (doc["id"], doc["state"], doc["status"], doc["attempts"]) == (
                cid,
                "done",
                200,
                2,
            )
            assert h["x-torpor-call-state"] == "done" and h["content-type"] == "application/json"
        assert by_id[also][1]["status"] == 409
        up.wait_for(
            lambda: call_of(up, ids[0])["callback"] == "delivered", 30, "callback state recorded"
        )
    finally:
        server.shutdown()


@pytest.mark.security
def test_callback_urls_beyond_the_allow_list_are_refused(
    up: Torpor, tmp_path: Path, attack: Any
) -> None:
    """Use the call queue to reach other hosts: callback URLs to private, link-local and public addresses, user info, other schemes, numeric host names"""
    up.deploy(flaky_copy(tmp_path))
    bad = [
        "http://10.0.0.1/x",
        "http://169.254.169.254/latest/meta-data",
        "http://8.8.8.8/",
        "https://127.0.0.1/",
        "ftp://127.0.0.1/",
        "http://user:pw@127.0.0.1/",
        "http://2130706433/",
        "http://127.1/",
        "http://0x7f.0.0.1/",
        "http://[::ffff:10.0.0.1]/",
        "http://127.0.0.1:0/",
        "http://127.0.0.1/a b",
        "file:///etc/passwd",
        "http://127.0.0.1:99999/",
    ]
    for url in bad:
        r = httpx.post(
            f"{up.gateway}/async-function/flaky",
            content=b"x",
            headers={"X-Callback-Url": url},
            timeout=10,
        )
        assert r.status_code == 400, url
        assert r.json()["field"] == "X-Callback-Url"
    assert (
        up.api_call("GET", "/v1/functions/flaky/calls").json()["calls"] == []
    )  # nothing was queued
    attack.ended(f"400 at accept for all {len(bad)} URLs; nothing queued")


@pytest.mark.security
def test_callback_name_resolving_outside_the_allow_list_is_not_contacted(
    up: Torpor, tmp_path: Path, attack: Any
) -> None:
    """A callback host name that resolves outside the allow-list (DNS pointing at a private address)"""
    up.deploy(flaky_copy(tmp_path))
    # "localhost" resolves to loopback and is allowed; a name that does not resolve, or resolves
    # elsewhere, is checked at delivery: the call still runs, the callback is refused
    cid = fire(up, "flaky", headers={"X-Callback-Url": "http://nonexistent.invalid/hook"})
    up.wait_for(
        lambda: call_of(up, cid)["callback"] in ("refused", "failed"), 60, "callback refused"
    )
    c = call_of(up, cid)
    assert (c["state"], c["status"], c["callback"]) == ("done", 200, "refused")
    attack.ended(
        "call ran; callback refused at delivery (name did not resolve into the allow-list)"
    )


def test_restart_of_up_with_calls_queued_loses_none(tmp_path: Path) -> None:
    state = tmp_path / "state"
    t = Torpor(state).start()
    try:
        t.deploy(flaky_copy(tmp_path))
        t.cli("scale", "flaky", "--replicas", "0")  # held at zero by hand: calls wait
        ids = [fire(t, "flaky", f"/?n={i}") for i in range(60)]
        time.sleep(1.0)  # (a held function's calls are not claimed; nothing to poll for)
        assert {call_of(t, cid)["state"] for cid in ids} == {"queued"}
    finally:
        assert t.stop() == 0
    t2 = Torpor(state).start()
    try:
        assert {call_of(t2, cid)["state"] for cid in ids} == {"queued"}
        t2.cli("scale", "flaky", "--min", "0", "--max", "5")
        calls = wait_final(t2, ids, 120)
        assert {(c["state"], c["status"]) for c in calls.values()} == {("done", 200)}
    finally:
        t2.stop()


def test_kill_9_of_up_with_calls_running_loses_none(tmp_path: Path) -> None:
    state = tmp_path / "state"
    t = Torpor(state).start()
    try:
        t.deploy(
            function_copy(
                tmp_path,
                "slow",
                env={"SLEEP_MS": "2000", "FAIL_RATE": "0"},
                **{"async": {"concurrency": 5}},
            )
        )
        ids = [fire(t, "slow") for _ in range(30)]
        t.wait_for(
            lambda: [call_of(t, c)["state"] for c in ids].count("running"), 60, "calls running"
        )
    finally:
        t.stop(signal.SIGKILL)
    t2 = Torpor(state).start()
    try:
        calls = wait_final(t2, ids, 180)
        assert {(c["state"], c["status"]) for c in calls.values()} == {("done", 200)}
    finally:
        t2.stop()


def test_sigterm_lets_running_calls_finish_and_keeps_the_rest(tmp_path: Path) -> None:
    state = tmp_path / "state"
    t = Torpor(state).start()
    try:
        t.deploy(
            function_copy(
                tmp_path,
                "slow",
                env={"SLEEP_MS": "1500", "FAIL_RATE": "0"},
                **{"async": {"concurrency": 4}},
            )
        )
        ids = [fire(t, "slow") for _ in range(24)]
        running = t.wait_for(
            lambda: [c for c in ids if call_of(t, c)["state"] == "running"], 60, "calls running"
        )
    finally:
        assert t.stop() == 0
    stopped = time.time()
    t2 = Torpor(state).start()
    try:
        calls = wait_final(t2, ids, 180)
        assert {(c["state"], c["status"]) for c in calls.values()} == {("done", 200)}
        # what was running when SIGTERM came finished during the drain, before the restart
        assert all(calls[c]["finished"] <= stopped for c in running)
        assert any(
            c["finished"] > stopped for c in calls.values()
        )  # the rest waited for the restart
    finally:
        t2.stop()


# -- distributed mode ---------------------------------------------------------------------------


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "torpor.cli.main", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _up(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise AssertionError(f"{url} did not answer")


def test_distributed_killing_a_gateway_and_the_leading_controller_loses_none(
    tmp_path: Path, redis_url: str
) -> None:
    """Two gateways run calls and two controllers share the lease; the gateway holding
    calls and the leading controller are killed (-9) while calls run: the other gateway
    takes the calls over, the standby takes the lease, and every call completes."""
    import os

    env = {**os.environ, "TORPOR_ASYNC_RECLAIM_IDLE": "3"}
    api_port, gw1, gw2 = free_port(), free_port(), free_port()

    def common(name: str) -> list[str]:
        return ["--redis", redis_url, "--state-dir", str(tmp_path / name)]  # no shared disk

    logs = {n: tmp_path / f"{n}.log" for n in ("ctl1", "ctl2", "api", "gw1", "gw2")}
    procs = {
        "ctl1": _start(
            ["controller", *common("ctl1"), "--driver", "process", "--lease-ttl", "3"],
            logs["ctl1"],
            env,
        ),
        "ctl2": _start(
            ["controller", *common("ctl2"), "--driver", "process", "--lease-ttl", "3"],
            logs["ctl2"],
            env,
        ),
        "api": _start(
            ["api", *common("api"), "--api-port", str(api_port), "--port", str(gw1)],
            logs["api"],
            env,
        ),
        "gw1": _start(["gateway", *common("gw1"), "--port", str(gw1)], logs["gw1"], env),
        "gw2": _start(["gateway", *common("gw2"), "--port", str(gw2)], logs["gw2"], env),
    }
    try:
        for url in (
            f"http://127.0.0.1:{api_port}/healthz",
            f"http://127.0.0.1:{gw1}/healthz",
            f"http://127.0.0.1:{gw2}/healthz",
        ):
            _up(url)
        t = Torpor(tmp_path / "api")
        t.api = f"http://127.0.0.1:{api_port}"
        t.env["TORPOR_API"] = t.api

        def leader() -> dict[str, Any] | None:
            lead = t.api_call("GET", "/v1/status").json().get("leader")
            return lead if lead and lead.get("pid") else None

        t.wait_for(leader, 60, "a leading controller", every=0.2)
        t.deploy(
            function_copy(
                tmp_path,
                "slow",
                env={"SLEEP_MS": "2000", "FAIL_RATE": "0"},
                scale={"max": 4, "target": 2},
                **{"async": {"concurrency": 8}},
            )
        )
        ids = [
            fire(t, "slow", gateway=f"http://127.0.0.1:{gw1 if i % 2 else gw2}") for i in range(60)
        ]

        def gw2_holds() -> bool:
            m = httpx.get(f"http://127.0.0.1:{gw2}/metrics", timeout=5).text
            return any(
                line.startswith('torpor_async_held{function="slow"}')
                and float(line.split()[-1]) >= 1
                for line in m.splitlines()
            )

        t.wait_for(gw2_holds, 90, "gw2 holding calls", every=0.1)
        old = leader()
        assert old is not None
        [lead_name] = [n for n in ("ctl1", "ctl2") if procs[n].pid == old["pid"]]
        procs["gw2"].send_signal(signal.SIGKILL)  # it holds calls: gw1 reclaims them
        procs[lead_name].send_signal(signal.SIGKILL)  # the standby takes the lease
        procs["gw2"].wait(10)
        procs[lead_name].wait(10)
        t.wait_for(
            lambda: (lead := leader()) is not None and lead["id"] != old["id"],
            60,
            "the standby leads",
            every=0.2,
        )
        calls = wait_final(t, ids, 240)
        assert {(c["state"], c["status"]) for c in calls.values()} == {("done", 200)}
        assert "took over" in logs["gw1"].read_text()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.security
async def test_callback_redirects_are_not_followed(attack: Any) -> None:
    """Bounce a callback through a redirect to a host the allow-list would refuse (or any other)"""
    import asyncio

    from torpor.gateway.callback import Allow, deliver
    from torpor.model import Call, new_id

    hits: list[bytes] = []

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        writer.close()

    async def redirector(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            f"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:{tport}/\r\n"
            "Content-Length: 0\r\n\r\n".encode()
        )
        writer.close()

    t = await asyncio.start_server(target, "127.0.0.1", 0)
    r = await asyncio.start_server(redirector, "127.0.0.1", 0)
    tport = t.sockets[0].getsockname()[1]
    rport = r.sockets[0].getsockname()[1]
    try:
        call = Call(
            id=new_id(),
            function="f",
            state="done",
            status=200,
            callback=f"http://127.0.0.1:{rport}/",
        )
        assert await deliver(call, Allow.parse(None)) == "failed"
        assert hits == []
    finally:
        t.close()
        r.close()
    attack.ended("delivery failed on the 307; the Location was never contacted")


def test_a_body_over_the_gateways_streaming_threshold_is_kept_whole(
    up: Torpor, tmp_path: Path
) -> None:
    """Bodies over 1 MiB stream through the gateway to a replica; a call stores them whole."""
    folder = function_copy(tmp_path, "echo", name="bigecho", max_body="4Mi", scale={"idle": "2s"})
    (folder / "handler.py").write_text(
        "import hashlib\n\n\ndef handle(request):\n"
        "    return {'length': len(request.body), 'sha256': hashlib.sha256(request.body).hexdigest()}\n"
    )
    up.deploy(folder)
    body = bytes(range(256)) * (3 * 4096)  # 3 MiB
    cid = fire(up, "bigecho", body=body)
    [c] = wait_final(up, [cid], 60).values()
    assert (c["state"], c["status"]) == ("done", 200)
    assert json.loads(c["body"]) == {
        "length": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    r = httpx.post(f"{up.gateway}/async-function/bigecho", content=body + body, timeout=30)
    assert r.status_code == 413 and r.json()["field"] == "max_body"

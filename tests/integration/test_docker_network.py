"""What a Docker replica can reach, against a real Docker Engine and the real DockerDriver.

Each function's replicas sit on a network of their own with inter-container traffic off,
and cannot open connections to the host; the gateway still reaches them on their port
published on 127.0.0.1. Probes run inside a replica (``docker exec python3``) and only
target containers these tests started and this host's own bridge addresses.
Marked ``docker``: these FAIL (never skip) when no engine answers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest

from torpor.drivers.base import Running
from torpor.drivers.baseimage import BaseImageError, build_base_image
from torpor.drivers.docker import DockerDriver
from torpor.drivers.dockernet import FIREWALL_RULE, METADATA_RULE, network_name
from torpor.model import Revision, Spec

pytestmark = pytest.mark.docker

HANDLER = """\
def handle(request):
    return "hello from " + request.path
"""

# Run inside a replica: connect to HOST PORT, print CONNECTED or FAILED <why>.
PROBE = """\
import socket, sys
s = socket.socket()
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("CONNECTED")
except OSError as e:
    print("FAILED", type(e).__name__, e)
"""
PROBE_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def engine() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as e:
        pytest.fail(f"Docker Engine unreachable ({e}); install and start it: .ci/install-docker.sh")
    try:
        build_base_image(progress=lambda _line: None)  # no-op when present
    except BaseImageError as e:
        pytest.fail(f"base image unavailable: {e}")
    yield client
    client.close()


class Env:
    def __init__(self, tmp: Path, engine: docker.DockerClient, pool: int = 0) -> None:
        self.tmp = tmp
        self.engine = engine
        self.pool = pool  # members of the warm pool (0: every start is a docker run)
        self.driver = DockerDriver(tmp / "state", pool_size=pool)
        self.drivers = [self.driver]
        self.prepared: list[Revision] = []

    def new_driver(self) -> DockerDriver:
        d = DockerDriver(self.tmp / "state", pool_size=self.pool)
        self.drivers.append(d)
        return d

    async def revision(self) -> Revision:
        fn = f"net-{uuid.uuid4().hex[:8]}"
        src = self.tmp / fn
        src.mkdir()
        (src / "handler.py").write_text(HANDLER)
        spec = Spec(name=fn, handler="handler:handle")
        rev = Revision(name=f"{fn}-00001", function=fn, number=1, spec=spec, source=str(src))
        self.prepared.append(rev)
        return await self.driver.prepare(rev, progress=lambda _line: None)

    async def up(self, rev: Revision, driver: DockerDriver | None = None) -> Running:
        d = driver or self.driver
        if self.pool:  # the start must take a member, not fall back to a docker run
            d.pool.start()
            assert await d.pool.wait_full(120), "the pool did not fill"
            waiting = d.pool.ids()
        running = await d.start(rev, f"{rev.name}-r{uuid.uuid4().hex[:5]}")
        if self.pool:
            assert running.driver_id in waiting, "not a pooled replica"
        await wait_healthy(running.endpoint)
        return running

    def networks(self) -> list[dict[str, Any]]:
        return list(
            self.engine.api.networks(filters={"label": [f"torpor.instance={self.driver.instance}"]})
        )

    async def cleanup(self) -> None:
        for d in self.drivers:
            for r in await d.list():
                await d.stop(r, grace=0)
        for rev in self.prepared:
            await self.driver.remove(rev)
        for d in self.drivers:
            await d.close()
        for net in self.networks():  # a failed test must not leave networks behind
            self.engine.api.remove_network(net["Id"])


@pytest.fixture
async def env(
    request: pytest.FixtureRequest, tmp_path: Path, engine: docker.DockerClient
) -> AsyncIterator[Env]:
    e = Env(tmp_path, engine, pool=getattr(request, "param", 0))
    try:
        yield e
    finally:
        await e.cleanup()


async def wait_healthy(endpoint: str, timeout: float = 30.0) -> None:
    assert endpoint
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with httpx.AsyncClient(trust_env=False) as client:
        while loop.time() < deadline:
            try:
                if (
                    await client.get(f"http://{endpoint}/_torpor/health", timeout=2.0)
                ).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    pytest.fail(f"{endpoint} not healthy within {timeout}s")


def addresses(engine: docker.DockerClient, running: Running) -> tuple[str, str]:
    """(container IP, gateway IP) of the replica's one network."""
    nets = engine.api.inspect_container(running.driver_id)["NetworkSettings"]["Networks"]
    assert len(nets) == 1, nets
    (net,) = nets.values()
    return net["IPAddress"], net["Gateway"]


async def probe(engine: docker.DockerClient, running: Running, host: str, port: int) -> str:
    """Connect from inside ``running`` to ``host:port``; CONNECTED or FAILED <why>."""

    def run() -> str:
        result = engine.containers.get(running.driver_id).exec_run(
            ["python3", "-c", PROBE, host, str(port), str(PROBE_TIMEOUT)]
        )
        return str(result.output.decode(errors="replace").strip())

    return await asyncio.wait_for(asyncio.to_thread(run), PROBE_TIMEOUT + 20)


@pytest.fixture
def host_listener() -> Iterator[int]:
    """A throwaway TCP listener on 0.0.0.0 (every address of this host); yields its port."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _host_connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("env", [0, 2], ids=["no-pool", "pool"], indirect=True)
@pytest.mark.security
async def test_a_replica_connects_to_another_functions_replica(
    env: Env, engine: docker.DockerClient, attack: Any
) -> None:
    """Replica of function A connects to replica B's container IP:port"""
    a = await env.up(await env.revision())
    b = await env.up(await env.revision())
    b_ip, _ = addresses(engine, b)
    # the probe works: A reaches its own runtime, and the host reaches B's container IP
    assert await probe(engine, a, "127.0.0.1", 8080) == "CONNECTED"
    assert _host_connects(b_ip, 8080)
    seen = await probe(engine, a, b_ip, 8080)
    attack.ended(f"{seen} (A -> B {b_ip}:8080)")
    assert seen.startswith("FAILED"), seen
    # both still serve through their published ports
    async with httpx.AsyncClient(trust_env=False) as client:
        for r in (a, b):
            resp = await client.get(f"http://{r.endpoint}/x", timeout=10)
            assert resp.text == "hello from /x"


@pytest.mark.parametrize("env", [0, 2], ids=["no-pool", "pool"], indirect=True)
@pytest.mark.security
async def test_a_replica_connects_to_a_host_service_on_all_interfaces(
    env: Env, engine: docker.DockerClient, host_listener: int, attack: Any
) -> None:
    """Replica connects to a host port bound to 0.0.0.0 (API, Redis) via the bridge gateway"""
    a = await env.up(await env.revision())
    _, gateway = addresses(engine, a)
    ipam = engine.api.inspect_network("bridge")["IPAM"]["Config"][0]  # docker0, another bridge
    default_gateway = ipam.get("Gateway") or str(ipaddress.ip_network(ipam["Subnet"])[1])
    assert _host_connects("127.0.0.1", host_listener), "the listener does not answer on the host"
    assert _host_connects(gateway, host_listener), (
        "the listener does not answer on the bridge address"
    )
    seen = {ip: await probe(engine, a, ip, host_listener) for ip in (gateway, default_gateway)}
    attack.ended(f"{seen}")
    assert all(v.startswith("FAILED") for v in seen.values()), seen
    # and the gateway's way in still works: the published port on 127.0.0.1
    async with httpx.AsyncClient(trust_env=False) as client:
        assert (await client.get(f"http://{a.endpoint}/", timeout=10)).text == "hello from /"


async def test_replicas_of_one_function_share_a_labelled_network_without_icc(
    env: Env, engine: docker.DockerClient
) -> None:
    rev = await env.revision()
    one = await env.up(rev)
    two = await env.up(rev)
    name = network_name(env.driver.instance, rev.function)
    net = engine.api.inspect_network(name)
    assert net["Labels"] == {
        "torpor.managed": "true",
        "torpor.instance": env.driver.instance,
        "torpor.function": rev.function,
    }
    assert net["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    assert net["Options"]["com.docker.network.bridge.name"].startswith("torpor")
    assert not net["Internal"]  # egress is kept
    for r in (one, two):
        nets = engine.api.inspect_container(r.driver_id)["NetworkSettings"]["Networks"]
        assert list(nets) == [name]
    two_ip, _ = addresses(engine, two)
    assert (await probe(engine, one, two_ip, 8080)).startswith("FAILED")  # no ICC, even within


async def test_the_network_is_adopted_after_a_restart_and_removed_with_the_function(
    env: Env,
) -> None:
    rev = await env.revision()
    first = await env.up(rev)
    name = network_name(env.driver.instance, rev.function)
    before = [n["Id"] for n in env.networks() if n["Name"] == name]
    assert len(before) == 1
    second = env.new_driver()  # a restarted controller on the same state directory
    other = await env.up(rev, driver=second)
    assert [n["Id"] for n in env.networks() if n["Name"] == name] == before
    await second.close()  # a network in use survives a driver's close
    assert [n["Id"] for n in env.networks() if n["Name"] == name] == before
    await env.driver.remove(rev)  # replicas still there: the network stays
    assert [n["Id"] for n in env.networks() if n["Name"] == name] == before
    for r in (first, other):
        await env.driver.stop(r, grace=0)
    await env.driver.remove(rev)
    assert env.networks() == []


async def test_a_start_recreates_a_network_removed_under_the_driver(
    env: Env, engine: docker.DockerClient
) -> None:
    rev = await env.revision()
    first = await env.up(rev)
    await env.driver.stop(first, grace=0)
    engine.api.remove_network(
        network_name(env.driver.instance, rev.function)
    )  # e.g. `docker network prune`
    again = await env.up(rev)  # the driver still has the old network cached
    async with httpx.AsyncClient(trust_env=False) as client:
        assert (await client.get(f"http://{again.endpoint}/", timeout=10)).text == "hello from /"


async def test_close_prunes_networks_left_empty(env: Env) -> None:
    rev = await env.revision()
    running = await env.up(rev)
    await env.driver.stop(running, grace=0)
    assert len(env.networks()) == 1
    await env.driver.close()
    assert env.networks() == []


async def test_the_host_firewall_rule_is_installed(env: Env) -> None:
    """Root with iptables (as here and in CI): the INPUT and the link-local rules are in
    place after a start (the metadata address itself is never probed: not ours)."""
    await env.up(await env.revision())
    r = subprocess.run(
        ["iptables", "-w", "5", "-C", "INPUT", *FIREWALL_RULE], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        ["iptables", "-w", "5", "-C", "DOCKER-USER", *METADATA_RULE], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert env.driver.networks.firewall_problem is None

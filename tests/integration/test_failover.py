"""Fail-over drills (distributed mode on loopback): a real redis-server, two controllers
(docker driver, one engine), one API and two gateways, each a separate process in its
own mount namespace with a private tmpfs over its state dir (tests/isolated.py), as on
separate hosts.

- Kill -9 each controller in turn during a burst through both gateways: no request fails,
  the standby takes over within the lease TTL (read from ``GET /v1/status``), every
  container of the function carries the one installation id, none is left running once
  the API reports zero replicas, and a function at zero still wakes through either
  gateway after each takeover.
- Restart redis-server (with persistence) while warm traffic flows: the gateways serve
  on from memory, the API's first call after the restart succeeds, pub/sub comes back
  (a wake from zero needs a poke and a change message to cross it), scale-to-zero
  resumes, and nothing is lost or duplicated.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import isolated
import pytest
import redis
from helpers import free_port
from platform_proc import DOMAIN, function_copy

pytestmark = [
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.skipif(isolated.available() is not None, reason=str(isolated.available())),
]

TTL = 3.0  # --lease-ttl of both controllers
TOKEN = "failover-drill-token-0123456789"
FN = "slow"


def _wait(predicate: Any, timeout: float, what: str, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (httpx.HTTPError, OSError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Redis:
    """A redis-server of the drill's own, with persistence (AOF, fsync always) in ``dir``."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "redis"
        self.dir.mkdir()
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(self.dir),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--save",
                    "",
                    "--daemonize",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        client = redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=1)
        try:
            _wait(lambda: self._ping(client), 10, "redis-server to answer PING")
        finally:
            client.close()

    def _ping(self, client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis-server flushes the AOF and exits
            self.proc.wait(15)


class Cluster:
    """The components as separate processes, each with its own ``--state-dir``."""

    def __init__(self, workdir: Path, redis_url: str) -> None:
        self.dir = workdir
        self.redis = redis_url
        self.env = {**os.environ, "TORPOR_TOKEN": TOKEN}
        self.api_port = free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.gateways = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.log = workdir / "components.log"

    def _start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """A component in its own mount namespace over a private tmpfs state dir (as on a host
        of its own: no component can read another's state dir)."""
        state = self.dir / f"state-{name}"
        proc = isolated.spawn(
            state, [*args, "--redis", self.redis, "--log-level", "warning"], self.log, self.env
        )
        self.procs[name] = proc
        return proc

    def controller(self, name: str) -> str:
        """Start controller ``name``; returns its health URL once it answers /readyz."""
        port = free_port()
        self._start(
            name,
            "controller",
            "--driver",
            "docker",
            "--lease-ttl",
            str(TTL),
            "--health-port",
            str(port),
            "--health-host",
            "127.0.0.1",
        )
        url = f"http://127.0.0.1:{port}"
        _wait(
            lambda: self._alive(name) and httpx.get(f"{url}/readyz", timeout=1).status_code == 200,
            60,
            f"controller {name} ready",
        )
        return url

    def _alive(self, name: str) -> bool:
        assert self.procs[name].poll() is None, f"{name} exited:\n{self.log.read_text()[-4000:]}"
        return True

    def start_rest(self) -> None:
        gw_ports = [u.rsplit(":", 1)[1] for u in self.gateways]
        self._start("api", "api", "--api-port", str(self.api_port), "--port", gw_ports[0])
        for i, port in enumerate(gw_ports):
            self._start(f"gw{i + 1}", "gateway", "--port", port)
        for name, url in (
            ("api", f"{self.api}/healthz"),
            ("gw1", f"{self.gateways[0]}/healthz"),
            ("gw2", f"{self.gateways[1]}/healthz"),
        ):
            _wait(
                lambda url=url, name=name: (
                    self._alive(name) and httpx.get(url, timeout=1).status_code == 200
                ),
                30,
                f"{name} to answer",
            )

    def kill9(self, name: str) -> float:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        return time.time()

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(
            method,
            self.api + path,
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=kw.pop("timeout", 10),
            **kw,
        )

    def status(self) -> dict[str, Any]:
        r = self.call("GET", "/v1/status")
        r.raise_for_status()
        return dict(r.json())

    def replicas(self) -> list[dict[str, Any]]:
        r = self.call("GET", f"/v1/functions/{FN}")
        r.raise_for_status()
        return list(r.json()["replicas"])

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "torpor.cli.main", "--api", self.api, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, (
            f"torpor {' '.join(args)}: {out.stderr}\n{self.log.read_text()[-3000:]}"
        )
        return out.stdout

    def get(self, gateway: int, path: str = "/?ms=20", timeout: float = 60) -> httpx.Response:
        return httpx.get(
            self.gateways[gateway] + path, headers={"Host": f"{FN}.{DOMAIN}"}, timeout=timeout
        )


class Traffic:
    """``workers`` threads sending requests through both gateways (alternating) until stopped."""

    def __init__(self, cluster: Cluster, workers: int, pause: float = 0.0) -> None:
        self.cluster, self.pause = cluster, pause
        self.results: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)
        ]

    def _run(self, i: int) -> None:
        n = 0
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                gw = (i + n) % 2
                n += 1
                try:
                    r = client.get(
                        self.cluster.gateways[gw] + "/?ms=20", headers={"Host": f"{FN}.{DOMAIN}"}
                    )
                    outcome = str(r.status_code)
                except httpx.HTTPError as e:
                    outcome = f"{type(e).__name__}"
                with self._lock:
                    self.results[outcome] += 1
                    if outcome != "200":
                        self.failures.append(f"gw{gw + 1}: {outcome}")
                if self.pause:
                    time.sleep(self.pause)

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(90)

    def count(self) -> int:
        with self._lock:
            return sum(self.results.values())


@pytest.fixture
def engine() -> Iterator[docker.DockerClient]:
    client = docker.from_env(timeout=30)
    client.ping()  # fails (not skips) without an engine: CI installs one
    yield client
    client.close()


def _containers(
    engine: docker.DockerClient, instance: str | None = None, running: bool = False
) -> list[Any]:
    mine = [f"torpor.instance={instance}"] if instance else []
    labels = [f"torpor.function={FN}", *mine]
    found = list(engine.containers.list(all=not running, filters={"label": labels}))
    # a replica made of a Docker warm-pool member keeps the pool's labels, named torpor-REPLICA;
    # the SDK lists, then inspects each: a member removed in between is a 404, so again
    name = re.compile(rf"torpor-{re.escape(FN)}-\d{{5}}-[0-9a-f]{{6}}")
    for attempt in range(5):
        try:
            pooled = engine.containers.list(
                all=not running, filters={"label": ["torpor.pool", *mine]}
            )
            return found + [ct for ct in pooled if name.fullmatch(ct.name)]
        except docker.errors.NotFound:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


_instances_started: set[str] = set()


@pytest.fixture
def cluster(tmp_path: Path, engine: docker.DockerClient) -> Iterator[tuple[Cluster, Redis]]:
    rs = Redis(tmp_path)
    rs.start()
    c = Cluster(tmp_path, rs.url)
    try:
        yield c, rs
    finally:
        c.stop_all()
        rs.stop()
        # controllers alone leave replicas for the next one to adopt: remove this run's
        for instance in _instances_started:
            for ct in _containers(engine, instance):
                ct.remove(force=True)
            pool = {"label": ["torpor.pool", f"torpor.instance={instance}"]}
            for ct in engine.containers.list(all=True, filters=pool):  # waiting members
                ct.remove(force=True)
            for net in engine.networks.list(filters={"label": f"torpor.instance={instance}"}):
                try:
                    net.remove()
                except docker.errors.DockerException:
                    pass
            for img in engine.api.images(filters={"label": "torpor.managed=true"}):
                if any(t.endswith(f"-{instance[:8]}") for t in img.get("RepoTags") or []):
                    try:
                        engine.images.remove(img["Id"], force=True)
                    except docker.errors.DockerException:
                        pass
        _instances_started.clear()


def _deploy(c: Cluster, tmp_path: Path) -> None:
    folder = function_copy(
        tmp_path,
        FN,
        scale={"idle": "3s", "window": "6s", "target": 5},
        env={"SLEEP_MS": "1", "FAIL_RATE": "0"},
    )
    c.cli("deploy", str(folder))


def _leader(c: Cluster) -> dict[str, Any] | None:
    lead = c.status()["leader"]
    return dict(lead) if lead else None


def _new_leader(c: Cluster, old: dict[str, Any]) -> dict[str, Any] | None:
    """The leader, once it is not ``old`` and its own heartbeat says since when it leads."""
    lead = _leader(c)
    return lead if lead and lead["id"] != old["id"] and lead["since"] else None


def _more(traffic: Traffic, than: int) -> bool:
    return traffic.count() >= than


def _at_zero_and_nothing_runs(c: Cluster, engine: docker.DockerClient, instance: str) -> None:
    _wait(lambda: not c.replicas(), 60, "the API to report zero replicas", every=0.2)
    running = _containers(engine, instance, running=True)
    assert not running, f"the API reports zero replicas but {[x.name for x in running]} run"


def test_kill_9_each_controller_in_turn_during_a_burst(
    tmp_path: Path, cluster: tuple[Cluster, Redis], engine: docker.DockerClient
) -> None:
    c, _ = cluster
    c.controller("c1")
    c.start_rest()
    lead = _wait(lambda: _leader(c), 10, "a leader")
    c.controller("c2")
    st = c.status()
    instance = st["instance"]
    _instances_started.add(instance)
    assert {x["role"] for x in st["controllers"]} == {"leader", "standby"}, st["controllers"]
    _deploy(c, tmp_path)
    for gw in (0, 1):
        r = c.get(gw)
        assert r.status_code == 200 and r.headers["x-torpor-revision"] == "slow-00001", r.text
    spare = {"c1": "c2", "c2": "c1"}
    for round_, wake_through in ((1, 0), (2, 1)):
        victim = "c1" if lead["pid"] == c.procs["c1"].pid else "c2"
        assert lead["pid"] == c.procs[victim].pid
        with Traffic(c, workers=6) as traffic:
            _wait(lambda: traffic.count() >= 50, 30, "the burst to be under way")
            killed_at = c.kill9(victim)
            new = _wait(
                functools.partial(_new_leader, c, lead),
                TTL * 4,
                f"a new leader after killing {victim}",
            )
            _wait(
                functools.partial(_more, traffic, traffic.count() + 50),
                30,
                "the burst to go on after the takeover",
            )
        # takeover within the TTL, as the status endpoint tells it (both processes on this host)
        assert new["token"] > lead["token"]
        assert new["pid"] == c.procs[spare[victim]].pid
        assert new["since"] - killed_at <= TTL + 0.25, (new, killed_at)
        print(
            f"round {round_}: killed {victim}; {new['id']} leads {new['since'] - killed_at:.2f}s later "
            f"(ttl {TTL:g}s); burst {dict(traffic.results)}"
        )
        assert not traffic.failures, (
            f"round {round_}: {Counter(traffic.failures)} of {dict(traffic.results)}"
        )
        assert traffic.results["200"] >= 100
        # the killed one comes back as the standby
        c.controller(victim)
        roles = {x["pid"]: x["role"] for x in c.status()["controllers"]}
        assert roles.get(c.procs[victim].pid) == "standby" and roles.get(new["pid"]) == "leader", (
            roles
        )
        # one installation identity on every container of the function
        assert {ct.labels.get("torpor.instance") for ct in _containers(engine)} <= {instance}
        # at zero nothing runs; a wake from zero works through either gateway
        _at_zero_and_nothing_runs(c, engine, instance)
        r = c.get(wake_through)
        assert r.status_code == 200 and r.headers["x-torpor-cold-start"] == "true", (
            r.status_code,
            r.headers,
        )
        r = c.get(1 - wake_through)
        assert r.status_code == 200
        lead = new
    # the last leader adopted what the others started: still one identity, still nothing left at zero
    assert {ct.labels.get("torpor.instance") for ct in _containers(engine)} == {instance}
    _at_zero_and_nothing_runs(c, engine, instance)


def test_redis_restart_while_warm_traffic_flows(
    tmp_path: Path, cluster: tuple[Cluster, Redis], engine: docker.DockerClient
) -> None:
    c, rs = cluster
    c.controller("c1")
    c.start_rest()
    _wait(lambda: _leader(c), 10, "a leader")
    c.controller("c2")
    instance = c.status()["instance"]
    _instances_started.add(instance)
    _deploy(c, tmp_path)
    for gw in (0, 1):
        assert c.get(gw).status_code == 200
    fn_before = c.call("GET", f"/v1/functions/{FN}").json()
    with Traffic(c, workers=2, pause=0.02) as traffic:
        _wait(lambda: traffic.count() >= 20, 30, "warm traffic")
        rs.stop()
        down, down_at = traffic.count(), time.monotonic()
        # down for longer than the lease: the leader must give way and a leader sync afresh after
        _wait(
            lambda: traffic.count() >= down + 50 and time.monotonic() - down_at > TTL + 1,
            30,
            "the gateways to serve on while Redis is down",
        )
        served_while_down = traffic.count() - down
        rs.start()
        # the API's first call after the restart succeeds
        r = c.call("GET", f"/v1/functions/{FN}")
        assert r.status_code == 200, r.text
        after = traffic.count()
        _wait(lambda: traffic.count() >= after + 50, 30, "traffic after the restart")
    assert not traffic.failures, f"{Counter(traffic.failures)} of {dict(traffic.results)}"
    assert served_while_down >= 50
    # nothing lost: the function, its revision and traffic are as they were
    fn_after = c.call("GET", f"/v1/functions/{FN}").json()
    assert [r["name"] for r in fn_after["revisions"]] == [r["name"] for r in fn_before["revisions"]]
    assert fn_after["traffic"] == fn_before["traffic"]
    # a leader again, with both controllers and both gateways heartbeating
    st = _wait(
        lambda: (
            lambda s: (
                s
                if s["leader"] and len(s["controllers"]) == 2 and len(s["gateways"]) == 2
                else None
            )
        )(c.status()),
        TTL * 4,
        "every component back in the status",
    )
    assert st["instance"] == instance
    # scale-to-zero resumes, and nothing is duplicated: no container runs once the API says zero
    _at_zero_and_nothing_runs(c, engine, instance)
    # pub/sub is back: a wake from zero needs the gateway's poke and the controller's change to cross it
    for gw in (0, 1):
        r = c.get(gw)
        assert r.status_code == 200, r.text
    reps = _wait(lambda: c.replicas(), 10, "the woken replica in the API")
    running = _containers(engine, instance, running=True)
    assert sorted(
        x.labels.get("torpor.replica") or x.name.removeprefix("torpor-") for x in running
    ) == sorted(x["name"] for x in reps)

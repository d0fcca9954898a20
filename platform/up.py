"""``torpor up``: the store, controller (with the autoscaler), API and gateway in one
event loop. SIGTERM/SIGINT: the gateway stops accepting and drains its in-flight
requests, then the controller drains and stops every replica, then the API stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from torpor.api.app import ApiConfig, create_app
from torpor.controller.reconcile import Controller, Settings
from torpor.drivers.base import Driver
from torpor.gateway.app import Gateway
from torpor.gateway.server import Server as GatewayServer
from torpor.logs import LogReader, LogServer, local_reader, remote_reader
from torpor.store import open_store

log = logging.getLogger("torpor")

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class UpError(Exception):
    """A setting that stops the platform from starting (one line for the user)."""


def default_state_dir() -> Path:
    env = os.environ.get("TORPOR_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "torpor"


@dataclass
class UpConfig:
    driver: str = "auto"  # auto | process | docker | kubernetes
    namespace: str | None = None  # kubernetes: TORPOR_K8S_NAMESPACE, else in-cluster namespace, else default
    redis: str | None = None
    host: str = "127.0.0.1"  # gateway bind address
    port: int = 8080
    api_host: str = "127.0.0.1"
    api_port: int = 8081
    token: str | None = None
    state_dir: Path = field(default_factory=default_state_dir)
    domain: str = "torpor.localhost"
    max_replicas: int = 100
    keep_revisions: int = 5  # retired revisions kept before garbage collection
    drain: float = 30.0
    base_image: str | None = None
    pause_idle: float = 0.0  # keep scaled-to-zero replicas paused this long (0 = remove at once)
    log_level: str = "warning"


def read_token(token_file: str | None) -> str | None:
    if token_file:
        try:
            tok = Path(token_file).read_text().strip()
        except OSError as e:
            raise UpError(f"--token-file {token_file}: {e.strerror}") from e
        if not tok:
            raise UpError(f"--token-file {token_file} is empty")
        return tok
    return os.environ.get("TORPOR_TOKEN") or None


def check_config(cfg: UpConfig) -> None:
    if cfg.api_host not in LOOPBACK and not cfg.token:
        raise UpError(f"--api-host {cfg.api_host} is beyond loopback: give a token with --token-file or TORPOR_TOKEN")
    if cfg.token is not None and len(cfg.token) < 16:
        raise UpError("the API token must be at least 16 characters")


def docker_available() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        client.close()
        return True
    except Exception:
        return False


def make_driver(cfg: UpConfig) -> Driver:
    choice = cfg.driver
    if choice == "auto":
        choice = "docker" if docker_available() else "process"
    if choice == "docker":
        if cfg.driver == "docker" and not docker_available():
            raise UpError("--driver docker: no Docker Engine answers (is dockerd running?)")
        from torpor.drivers.docker import DockerDriver

        kwargs: dict[str, Any] = {}
        if cfg.base_image:
            kwargs["base_image"] = cfg.base_image
        return DockerDriver(cfg.state_dir, **kwargs)
    if choice == "process":
        from torpor.drivers.process import ProcessDriver

        return ProcessDriver(cfg.state_dir)
    if choice == "kubernetes":
        try:
            from torpor.drivers.kubernetes import KubernetesDriver, KubernetesError
        except ImportError as e:
            raise UpError(f"--driver kubernetes needs lightkube: pip install 'torpor[kubernetes]' ({e})") from e
        from torpor.drivers.docker import instance_id

        try:
            return KubernetesDriver(instance_id(cfg.state_dir), cfg.namespace)
        except KubernetesError as e:
            raise UpError(f"--driver kubernetes: {e}") from e
    raise UpError(f"--driver {choice!r}: expected process, docker, kubernetes or auto")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `up` owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _uvicorn(app: Any, host: str, port: int, level: str) -> _Server:
    config = uvicorn.Config(app, host=host, port=port, lifespan="off", access_log=False, log_level=level,
                            http="httptools", loop="none", timeout_keep_alive=75, server_header=False,
                            date_header=False, proxy_headers=False, timeout_graceful_shutdown=None)
    return _Server(config)


ALL = frozenset({"api", "controller", "gateway"})


class Platform:
    """The components wired together; ``run()`` until ``request_stop()``.

    ``torpor up`` runs all three in one event loop. Distributed mode runs one per process
    (``torpor gateway`` / ``controller`` / ``api``) on a shared Redis store.
    """

    def __init__(self, cfg: UpConfig, components: frozenset[str] = ALL) -> None:
        check_config(cfg)
        if components != ALL and not cfg.redis:
            raise UpError(f"{'/'.join(sorted(components))} alone needs a shared store: give --redis URL")
        self.cfg = cfg
        self.components = components
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = open_store(redis_url=cfg.redis, state_dir=None if cfg.redis else cfg.state_dir)
        self.driver: Driver | None = None
        self.controller: Controller | None = None
        self.gateway: Gateway | None = None
        self.servers: list[tuple[str, _Server | GatewayServer, str]] = []
        if "controller" in components:
            self.driver = make_driver(cfg)
            self.controller = Controller(self.store, self.driver, settings=Settings(
                max_replicas=cfg.max_replicas, pause_for=cfg.pause_idle, source_root=cfg.state_dir / "sources",
                drain_grace=cfg.drain, keep_revisions=max(cfg.keep_revisions, 0)))
        if "gateway" in components:
            self.gateway = Gateway(self.store, domain=cfg.domain)
            self.servers.append(("gateway", GatewayServer(self.gateway, cfg.host, cfg.port),
                                 f"{cfg.host}:{cfg.port}"))
        if "api" in components:
            gateway_url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
            ready = self.controller.synced.is_set if self.controller else (lambda: True)
            api = create_app(self.store, ApiConfig(
                state_dir=cfg.state_dir, gateway_url=gateway_url, domain=cfg.domain, max_replicas=cfg.max_replicas,
                token=cfg.token, ready=ready, logs=self._log_reader()))
            self.servers.append(("api", _uvicorn(api, cfg.api_host, cfg.api_port, cfg.log_level),
                                 f"{cfg.api_host}:{cfg.api_port}"))
        self._stop = asyncio.Event()
        self.started = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    def _log_reader(self) -> LogReader:
        """Logs through the driver here, or (an API alone) from the controller over the bus."""
        if self.driver is not None:
            return functools.partial(local_reader, self.logs)
        return functools.partial(remote_reader, self.store)

    async def logs(self, function: str, follow: bool, tail: int) -> AsyncIterator[str]:
        driver = self.driver
        assert driver is not None
        runs = [r for r in await driver.list() if r.function == function]
        if not follow:
            for r in runs:
                async for line in driver.logs(r, follow=False, tail=tail):
                    yield f"[{r.replica}] {line}"
            return
        queue: asyncio.Queue[str] = asyncio.Queue()
        seen: set[str] = set()

        async def pump(r: Any) -> None:
            async for line in driver.logs(r, follow=True, tail=tail):
                await queue.put(f"[{r.replica}] {line}")

        tasks: list[asyncio.Task[None]] = []
        try:
            while True:
                for r in await driver.list():
                    if r.function == function and r.replica not in seen and r.alive:
                        seen.add(r.replica)
                        tasks.append(asyncio.create_task(pump(r)))
                try:
                    yield await asyncio.wait_for(queue.get(), 1.0)
                    while not queue.empty():
                        yield queue.get_nowait()
                except TimeoutError:
                    continue
        finally:
            for t in tasks:
                t.cancel()

    async def run(self, on_started: Callable[[Platform], None] | None = None) -> None:
        log_server: asyncio.Task[None] | None = None
        if self.controller:
            await self.controller.start()
            if self.cfg.redis:  # API processes elsewhere ask this one for replica logs
                log_server = asyncio.create_task(LogServer(self.store, self.logs).run())
        if self.gateway:
            await self.gateway.start()
        tasks = {name: asyncio.create_task(server.serve()) for name, server, _ in self.servers}
        try:
            while not all(server.started for _, server, _ in self.servers):
                for name, _server, addr in self.servers:
                    if tasks[name].done():
                        raise UpError(f"{name}: could not listen on {addr} (address in use?)")
                await asyncio.sleep(0.01)
            self.started.set()
            if on_started:
                on_started(self)
            await self._stop.wait()
        finally:
            servers = {name: server for name, server, _ in self.servers}
            # 1. gateway: stop accepting, finish in-flight requests
            if "gateway" in servers and self.gateway:
                servers["gateway"].should_exit = True
                await asyncio.gather(tasks["gateway"], return_exceptions=True)
                await self.gateway.stop(drain=self.cfg.drain)
            # 2. replicas: drain and stop (a controller alone leaves them for the next one to adopt)
            if self.controller:
                await self.controller.stop(stop_replicas=self.components == ALL)
            # 3. API and store
            if "api" in servers:
                servers["api"].should_exit = True
                await asyncio.gather(tasks["api"], return_exceptions=True)
            if log_server is not None:
                log_server.cancel()
                await asyncio.gather(log_server, return_exceptions=True)
            if self.driver:
                await self.driver.close()
            await self.store.close()


def run_up(cfg: UpConfig, components: frozenset[str] = ALL) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if os.environ.get("TORPOR_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass

    name = "up" if components == ALL else next(iter(components))

    async def main() -> None:
        platform = Platform(cfg, components)
        loop = asyncio.get_running_loop()
        # driver calls (Docker SDK) run in threads: enough of them that a burst of starts
        # does not queue behind listings
        loop.set_default_executor(ThreadPoolExecutor(max_workers=32, thread_name_prefix="torpor"))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, platform.request_stop)
        store = "redis" if cfg.redis else "embedded"
        if platform.driver is not None:
            reason = "" if cfg.driver != "auto" else (
                " (a Docker Engine answers)" if platform.driver.name == "docker" else " (no Docker Engine answers)")
            print(f"torpor {name}: driver={platform.driver.name}{reason} store={store} state={cfg.state_dir}",
                  file=sys.stderr, flush=True)

        def started(p: Platform) -> None:
            if p.gateway is not None:
                print(f"torpor {name}: gateway http://{cfg.host}:{cfg.port}  (Host: NAME.{cfg.domain} or "
                      "/function/NAME/)", file=sys.stderr, flush=True)
            if "api" in p.components:
                print(f"torpor {name}: api     http://{cfg.api_host}:{cfg.api_port}/v1"
                      + ("  (bearer token required)" if cfg.token else ""), file=sys.stderr, flush=True)
            if p.driver is None and p.gateway is None:
                print(f"torpor {name}: ready (store={store})", file=sys.stderr, flush=True)

        await platform.run(started)

    try:
        asyncio.run(main())
    except UpError as e:
        print(f"torpor {name}: {e}", file=sys.stderr)
        return 2
    return 0

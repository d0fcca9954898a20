"""``torpor up``: the store, controller (with the autoscaler), API and gateway in one
event loop. The controller acts only while it holds the controller lease (in memory for
the embedded store, in Redis otherwise: ``torpor.lease``); the installation's id (the
``torpor.instance`` label, image tags) comes from the store. SIGTERM/SIGINT: the gateway stops accepting and drains its in-flight
requests (for at most ``graceful_timeout`` seconds, then what is left is cut off), then
the controller drains and stops every replica, then the API stops (within
``graceful_timeout`` too).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvicorn

from torpor.api.app import ApiConfig, create_app
from torpor.api.status import version
from torpor.apitoken import TokenError, default_state_dir, given_token, load_or_create, token_path
from torpor.archive import ArchiveLimits
from torpor.controller.blobs import GRACE
from torpor.controller.health import health_app
from torpor.controller.leader import Leadership
from torpor.controller.reconcile import Controller, Settings
from torpor.drivers.base import Driver
from torpor.gateway.app import MAX_BUFFERED, Gateway
from torpor.gateway.forwarded import parse_trusted_proxies
from torpor.gateway.server import Server as GatewayServer
from torpor.lease import Lease, lease_for
from torpor.logs import LogReader, LogServer, local_reader, remote_reader
from torpor.spec import MAX_IDLE, MAX_SCALE
from torpor.store import open_store
from torpor.store.callq import close_queue

log = logging.getLogger("torpor")

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class UpError(Exception):
    """A setting that stops the platform from starting (one line for the user)."""


def _seconds_env(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        return math.nan  # refused by check_config, naming the variable


def _csv_env(name: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in os.environ.get(name, "").split(",") if x.strip())


@dataclass
class UpConfig:
    driver: str = "auto"  # auto | process | docker | kubernetes
    namespace: str | None = (
        None  # kubernetes: TORPOR_K8S_NAMESPACE, else in-cluster namespace, else default
    )
    redis: str | None = None
    host: str = "127.0.0.1"  # gateway bind address
    port: int = 8080
    api_host: str = "127.0.0.1"
    api_port: int = 8081
    token: str | None = None  # given (TORPOR_TOKEN / --token-file); None: STATE_DIR/token
    token_source: str = ""  # where the token came from, for messages (never the token)
    api_allowed_hosts: tuple[str, ...] = field(
        default_factory=lambda: _csv_env("TORPOR_API_ALLOWED_HOSTS")
    )
    api_allowed_origins: tuple[str, ...] = field(
        default_factory=lambda: _csv_env("TORPOR_API_ALLOWED_ORIGINS")
    )
    public_url: str | None = (
        None  # scheme://host[:port] users reach the gateway at; None: its own address
    )
    state_dir: Path = field(default_factory=default_state_dir)
    domain: str = "torpor.localhost"
    max_replicas: int = 100
    keep_revisions: int = 5  # retired revisions kept before garbage collection
    drain: float = 30.0
    base_image: str | None = None
    pause_idle: float = 0.0  # keep scaled-to-zero replicas paused this long (0 = remove at once)
    limits: ArchiveLimits = field(
        default_factory=ArchiveLimits
    )  # caps on a deploy's upload (API), and on unpacking
    # s a source archive that no revision names is kept after its last put (TORPOR_ARCHIVE_GRACE)
    archive_grace: float = field(
        default_factory=lambda: _seconds_env("TORPOR_ARCHIVE_GRACE", GRACE)
    )
    log_level: str = "warning"
    # the gateway's bounds on what a client can hold (see torpor.gateway.server / app)
    trusted_proxies: str = ""  # CIDR,... whose Forwarded/X-Forwarded-* are appended to
    graceful_timeout: float = 30.0  # shutdown: in-flight requests get this long
    head_timeout: float = 10.0  # a request head must arrive whole within this
    body_timeout: float = 30.0  # silence allowed while a request body is coming
    write_timeout: float = 30.0  # a client that reads nothing of its response for this long
    max_connections: int = 10_000  # open client connections; beyond: 503 + Retry-After
    max_buffered: int = MAX_BUFFERED  # request body bytes held at once; beyond: 503
    lease_ttl: float = (
        5.0  # controller lease: a standby takes over at most this long after the leader's end
    )
    health_port: int | None = (
        None  # controller: /healthz and /readyz for probes (TORPOR_HEALTH_PORT)
    )
    health_host: str = "0.0.0.0"


def read_token(token_file: str | None) -> tuple[str, str] | None:
    """(token, where it came from) given by ``TORPOR_TOKEN`` (it wins) or ``--token-file``;
    None if neither: the API then uses ``STATE_DIR/token``."""
    try:
        tok = given_token(token_file)
    except TokenError as e:
        raise UpError(str(e)) from e
    return (tok.value, tok.source) if tok else None


def check_public_url(url: str) -> str:
    """``scheme://host[:port]`` (http or https, no path, query or credentials), without a
    trailing slash; UpError naming what is wrong otherwise."""
    parts = urlsplit(url.strip())
    what = f"--public-url {url[:100]!r}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpError(
            f"{what}: expected http:// or https:// and a host, e.g. https://fn.example.com"
        )
    if parts.username is not None or parts.password is not None:
        raise UpError(f"{what}: credentials do not belong in a public URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UpError(
            f"{what}: expected scheme://host[:port] only (function URLs are NAME.DOMAIN on it)"
        )
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise UpError(f"{what}: the port is not a number from 0 to 65535") from None
    return f"{parts.scheme}://{parts.netloc}"


def check_config(cfg: UpConfig, components: frozenset[str] = frozenset({"api"})) -> None:
    if not 0 <= cfg.archive_grace <= 86400:  # NaN fails it too
        raise UpError(
            f"TORPOR_ARCHIVE_GRACE: expected seconds from 0 to 86400, got {cfg.archive_grace:g}"
        )
    if "controller" in components:
        if not 0.5 <= cfg.lease_ttl <= 60:  # NaN fails it too
            raise UpError(f"--lease-ttl {cfg.lease_ttl}: expected seconds from 0.5 to 60")
        if cfg.health_port is not None and not 1 <= cfg.health_port <= 65535:
            raise UpError(f"--health-port {cfg.health_port}: expected a TCP port from 1 to 65535")
    if "api" not in components:
        return
    if cfg.public_url:
        cfg.public_url = check_public_url(cfg.public_url)
    if cfg.api_host not in LOOPBACK and not cfg.token:
        raise UpError(
            f"--api-host {cfg.api_host} is beyond loopback: give a token with --token-file or TORPOR_TOKEN "
            f"(the generated {token_path(cfg.state_dir)} serves loopback only)"
        )
    if cfg.token is not None and len(cfg.token) < 16:
        raise UpError("the API token must be at least 16 characters")
    if not 1 <= cfg.max_replicas <= MAX_SCALE:
        raise UpError(
            f"--max-replicas {cfg.max_replicas}: expected an integer from 1 to {MAX_SCALE}"
        )
    if not 0 <= cfg.pause_idle <= MAX_IDLE:  # NaN fails it too
        raise UpError(f"--pause-idle {cfg.pause_idle}: expected seconds from 0 to {MAX_IDLE:g}")

    try:
        parse_trusted_proxies(cfg.trusted_proxies)
    except ValueError as e:
        raise UpError(f"--trusted-proxies: {e}") from None
    for flag, value in (
        ("--graceful-timeout", cfg.graceful_timeout),
        ("--head-timeout", cfg.head_timeout),
        ("--body-timeout", cfg.body_timeout),
        ("--write-timeout", cfg.write_timeout),
    ):
        if not 0 < value <= 3600:
            raise UpError(f"{flag}: expected seconds > 0 and <= 3600, got {value:g}")
    if cfg.max_connections < 1:
        raise UpError(f"--max-connections: expected an integer >= 1, got {cfg.max_connections}")
    if cfg.max_buffered < 1:
        raise UpError(f"--max-buffered: expected a size >= 1 byte, got {cfg.max_buffered}")


def api_token(cfg: UpConfig) -> tuple[str, str]:
    """(token, source): the given one, else ``STATE_DIR/token`` (generated if missing)."""
    if cfg.token:
        return cfg.token, cfg.token_source or "the given token"
    try:
        tok = load_or_create(cfg.state_dir)
    except TokenError as e:
        raise UpError(str(e)) from e
    except OSError as e:
        raise UpError(
            f"cannot write the API token to {token_path(cfg.state_dir)}: {e.strerror}"
        ) from e
    return tok.value, f"{tok.source} ({'new, ' if tok.generated else ''}the CLI reads it)"


def docker_available() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        client.close()
        return True
    except Exception:
        return False


def legacy_instance(state_dir: Path) -> str:
    """The id an installation had before it was kept in the store (derived from its state dir)."""
    from torpor.drivers.docker import instance_id

    return instance_id(state_dir)


def use_instance(driver: Driver, instance: str) -> None:
    """Make ``driver`` label (and tag) what it starts with the installation's ``instance``."""
    if hasattr(driver, "use_instance"):
        driver.use_instance(instance)
    elif hasattr(driver, "instance"):  # kubernetes: the id is in its Pod settings too
        import dataclasses

        driver.instance = instance
        settings = getattr(driver, "settings", None)
        if (
            settings is not None
            and dataclasses.is_dataclass(settings)
            and not isinstance(settings, type)
        ):
            driver.settings = dataclasses.replace(settings, instance=instance)  # type: ignore[attr-defined]


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
        try:
            return DockerDriver(cfg.state_dir, **kwargs)
        except ValueError as e:  # TORPOR_DOCKER_POOL
            raise UpError(str(e)) from e
    if choice == "process":
        from torpor.drivers.process import ProcessDriver

        return ProcessDriver(cfg.state_dir)
    if choice == "kubernetes":
        try:
            from torpor.drivers.kubernetes import KubernetesDriver, KubernetesError
        except ImportError as e:
            raise UpError(
                f"--driver kubernetes needs lightkube: pip install 'torpor[kubernetes]' ({e})"
            ) from e
        try:  # the installation's id from the store replaces this one before anything starts
            return KubernetesDriver(legacy_instance(cfg.state_dir), cfg.namespace)
        except KubernetesError as e:
            raise UpError(f"--driver kubernetes: {e}") from e
    raise UpError(f"--driver {choice!r}: expected process, docker, kubernetes or auto")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `up` owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _uvicorn(app: Any, host: str, port: int, level: str, graceful: float | None = None) -> _Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        access_log=False,
        log_level=level,
        http="httptools",
        loop="none",
        timeout_keep_alive=75,
        server_header=False,
        date_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=None if graceful is None else max(1, round(graceful)),
    )
    return _Server(config)


ALL = frozenset({"api", "controller", "gateway"})


class Platform:
    """The components wired together; ``run()`` until ``request_stop()``.

    ``torpor up`` runs all three in one event loop. Distributed mode runs one per process
    (``torpor gateway`` / ``controller`` / ``api``) on a shared Redis store.
    """

    def __init__(self, cfg: UpConfig, components: frozenset[str] = ALL) -> None:
        check_config(cfg, components)
        if components != ALL and not cfg.redis:
            raise UpError(
                f"{'/'.join(sorted(components))} alone needs a shared store: give --redis URL"
            )
        self.cfg = cfg
        self.components = components
        if not cfg.state_dir.exists():
            cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.token_source = ""
        self.store = open_store(redis_url=cfg.redis, state_dir=None if cfg.redis else cfg.state_dir)
        self.driver: Driver | None = None
        self.controller: Controller | None = None
        self.gateway: Gateway | None = None
        self.servers: list[tuple[str, _Server | GatewayServer, str]] = []
        self.store_kind = "redis" if cfg.redis else "embedded"
        # one lease per installation: the controller holds it, the API names its holder
        self.lease: Lease | None = (
            lease_for(self.store) if components & {"controller", "api"} else None
        )
        if "controller" in components:
            self._add_controller()
        if "gateway" in components:
            self._add_gateway()
        if "api" in components:
            self._add_api()
        self._stop = asyncio.Event()
        self.started = asyncio.Event()

    def _add_controller(self) -> None:
        """The driver, the controller (leader-elected on ``self.lease``) and, with
        ``health_port``, its health endpoint."""
        cfg = self.cfg
        assert self.lease is not None
        self.driver = make_driver(cfg)
        ttl = cfg.lease_ttl
        leadership = Leadership(
            self.lease, ttl=ttl, renew_every=min(1.0, ttl / 4), poll=min(0.25, ttl / 10)
        )
        self.controller = Controller(
            self.store,
            self.driver,
            settings=Settings(
                max_replicas=cfg.max_replicas,
                pause_for=cfg.pause_idle,
                source_root=cfg.state_dir / "sources",
                source_cache=cfg.state_dir / "sources-cache",
                source_limits=cfg.limits,
                blob_grace=cfg.archive_grace,
                drain_grace=cfg.drain,
                keep_revisions=max(cfg.keep_revisions, 0),
            ),
            leadership=leadership,
            lease_key=getattr(self.lease, "key", None),
            info={
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "driver": self.driver.name,
                "store": self.store_kind,
                "version": version(),
            },
        )
        if cfg.health_port is not None:
            ctl = self.controller
            app = health_app(ctl.alive, ctl.ready, lambda: ctl.role)
            self.servers.append(
                (
                    "health",
                    _uvicorn(app, cfg.health_host, cfg.health_port, cfg.log_level, 1.0),
                    f"{cfg.health_host}:{cfg.health_port}",
                )
            )

    def _add_gateway(self) -> None:
        """The gateway and its HTTP server."""
        cfg = self.cfg
        self.gateway = Gateway(
            self.store,
            domain=cfg.domain,
            max_buffered=cfg.max_buffered,
            trusted_proxies=parse_trusted_proxies(cfg.trusted_proxies),
        )
        server = GatewayServer(
            self.gateway,
            cfg.host,
            cfg.port,
            head_timeout=cfg.head_timeout,
            body_timeout=cfg.body_timeout,
            write_timeout=cfg.write_timeout,
            max_connections=cfg.max_connections,
            graceful_timeout=cfg.graceful_timeout,
        )
        self.servers.append(("gateway", server, f"{cfg.host}:{cfg.port}"))

    def _add_api(self) -> None:
        """The control API (its token written before it listens) and its server."""
        cfg = self.cfg
        gateway_url = (
            cfg.public_url
            or f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
        )
        ready = self.controller.ready if self.controller else (lambda: True)
        token, self.token_source = api_token(cfg)  # written before the API listens
        api = create_app(
            self.store,
            ApiConfig(
                state_dir=cfg.state_dir,
                token=token,
                gateway_url=gateway_url,
                domain=cfg.domain,
                max_replicas=cfg.max_replicas,
                bind_host=cfg.api_host,
                allowed_hosts=cfg.api_allowed_hosts,
                allowed_origins=cfg.api_allowed_origins,
                ready=ready,
                logs=self._log_reader(),
                limits=cfg.limits,
                lease=self.lease,
                store_kind=self.store_kind,
            ),
        )
        self.servers.append(
            (
                "api",
                _uvicorn(api, cfg.api_host, cfg.api_port, cfg.log_level, cfg.graceful_timeout),
                f"{cfg.api_host}:{cfg.api_port}",
            )
        )

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
                    async with asyncio.timeout(1.0):  # not wait_for: it can lose a cancel
                        line = await queue.get()
                    yield line
                    while not queue.empty():
                        yield queue.get_nowait()
                except TimeoutError:
                    continue
        finally:
            for t in tasks:
                t.cancel()

    async def _identity(self) -> str:
        """The installation's id, from the store (created once). An installation from before
        ids were kept in the store (an embedded one, or a Redis one that already holds
        functions) takes the id this state dir gave it, so what runs is still adopted."""
        legacy: str | None = legacy_instance(self.cfg.state_dir)
        if self.cfg.redis and not await self.store.list_functions():
            legacy = None  # a new installation: a random id
        return await self.store.instance_id(legacy)

    async def _gateway_heartbeats(self) -> None:
        assert self.gateway is not None
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "address": f"{self.cfg.host}:{self.cfg.port}",
            "version": version(),
        }
        while True:
            try:
                await self.store.heartbeat("gateway", self.gateway.id, info)
            except Exception as e:  # the store is away: the gateway serves on from memory
                log.debug("gateway heartbeat failed: %s", e)
            await asyncio.sleep(1.0)

    async def run(self, on_started: Callable[[Platform], None] | None = None) -> None:
        log_server: asyncio.Task[None] | None = None
        heartbeat: asyncio.Task[None] | None = None
        if self.controller:
            assert self.driver is not None
            use_instance(self.driver, await self._identity())
            await self.controller.start()
            if self.cfg.redis:  # API processes elsewhere ask this one for replica logs
                log_server = asyncio.create_task(LogServer(self.store, self.logs).run())
        if self.gateway:
            await self.gateway.start()
            heartbeat = asyncio.create_task(self._gateway_heartbeats())
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
            if "health" in servers:
                servers["health"].should_exit = True
                await asyncio.gather(tasks["health"], return_exceptions=True)
            for task in (log_server, heartbeat):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if self.driver:
                await self.driver.close()
            await close_queue(self.store)
            await self.store.close()


def run_up(cfg: UpConfig, components: frozenset[str] = ALL) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
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
            reason = (
                ""
                if cfg.driver != "auto"
                else (
                    " (a Docker Engine answers)"
                    if platform.driver.name == "docker"
                    else " (no Docker Engine answers)"
                )
            )
            print(
                f"torpor {name}: driver={platform.driver.name}{reason} store={store} state={cfg.state_dir}",
                file=sys.stderr,
                flush=True,
            )

        def started(p: Platform) -> None:
            if p.gateway is not None:
                print(
                    f"torpor {name}: gateway http://{cfg.host}:{cfg.port}  (Host: NAME.{cfg.domain} or "
                    "/function/NAME/)",
                    file=sys.stderr,
                    flush=True,
                )
            if "api" in p.components:
                print(
                    f"torpor {name}: api     http://{cfg.api_host}:{cfg.api_port}/v1  (bearer token: "
                    f"{p.token_source})",
                    file=sys.stderr,
                    flush=True,
                )
            if p.driver is None and p.gateway is None:
                print(f"torpor {name}: ready (store={store})", file=sys.stderr, flush=True)

        await platform.run(started)

    try:
        asyncio.run(main())
    except UpError as e:
        print(f"torpor {name}: {e}", file=sys.stderr)
        return 2
    return 0

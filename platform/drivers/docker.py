"""The ``docker`` driver: each replica is a container on the local Docker Engine.

Source functions are built into ``torpor/fn-NAME:REVISION-INSTANCE`` from a locally built base
image (see ``baseimage.py``; nothing is pulled). Dependencies from ``requirements.txt``
are installed on the host with pip (containers cannot reach PyPI) and copied into the
image at ``/fn/.deps``: names from the package index only, binary wheels only, pip run
from an empty directory with a scrubbed environment (``pip.py``), so nothing of the
upload is built or run on the host. Replicas run as uid 65534 on a read-only root file system with
no capabilities, memory/CPU/pid limits, no volumes, and publish their port on
127.0.0.1 only. Each function's replicas sit on a bridge network of their own with
inter-container traffic off, and cannot open connections to the host (``dockernet.py``).

Containers carry the labels ``torpor.function``, ``torpor.revision``,
``torpor.replica``, ``torpor.managed=true`` and ``torpor.instance`` (the installation's
id, kept in the store: ``use_instance``; derived from the state directory until then),
so any controller of the installation adopts what another started and two Torpor
installations on one engine never touch each other's replicas. The Docker SDK is blocking: every call runs in a worker thread.

A cold start of a source function takes a container of the warm pool (``dockerpool``:
generic runtime containers made by the same hardened code path, ``_hardened``) and
specialises it instead of running the revision's image, when one is waiting; such a
replica keeps the pool's labels (``torpor.pool``) and is told apart by ``served``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import docker
import docker.errors

from torpor.archive import ignore_skipped
from torpor.drivers import dockerpool, pip
from torpor.drivers.base import BuildError, Progress, Running, contract_env, runtime_env
from torpor.drivers.baseimage import BaseImageError, base_image_name, build_base_image
from torpor.drivers.dockernet import Networks
from torpor.drivers.dockerpool import POOL_FUNCTION, POOL_LABEL, POOL_PORT, Member, Pool, PoolError
from torpor.drivers.runtimeimage import build_context
from torpor.model import Resources, Revision
from torpor.runtime.fetch import launch_code

log = logging.getLogger("torpor")

MANAGED = "torpor.managed"
INSTANCE = "torpor.instance"
USER = "65534:65534"
PIDS_LIMIT = 256
TMPFS = {"/tmp": "rw,size=64m"}

# The image of a source function. ``{...}`` are filled in by ``dockerfile()``.
DOCKERFILE = """\
FROM {base}
COPY torpor/ /torpor/
RUN python3 -m compileall -q /torpor
COPY fn/ /fn/
RUN python3 -m compileall -q /fn || true
ENV TORPOR_DIR=/fn \\
    TORPOR_HANDLER={handler} \\
    TORPOR_HOST=0.0.0.0 \\
    PORT={port} \\
    PYTHONDONTWRITEBYTECODE=1 \\
    PYTHONUNBUFFERED=1 \\
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
WORKDIR /fn
USER {user}
EXPOSE {port}
CMD {cmd}
"""


def dockerfile(base: str, handler: str, port: int) -> str:
    cmd = json.dumps(["python3", "-c", launch_code("/torpor/server.py")])
    return DOCKERFILE.format(
        base=base, handler=json.dumps(handler), port=int(port), user=USER, cmd=cmd
    )


def runtime_server() -> Path:
    """Path of the stand-alone runtime (``torpor.runtime.server``) without importing it."""
    spec = importlib.util.find_spec("torpor.runtime.server")
    if spec is not None and spec.origin:
        return Path(spec.origin)
    return Path(__file__).resolve().parent.parent / "runtime" / "server.py"


def image_name(revision: Revision, instance: str) -> str:
    """The tag a source revision is built as: ``torpor/fn-NAME:REVISION-INSTANCE``
    (lowercase). The installation's id in the tag keeps two installations on one engine
    from re-tagging (and on deletion removing) each other's images of a same-named function."""
    return f"torpor/fn-{revision.function}:{revision.name}-{instance[:8]}".lower()


def instance_id(state_dir: Path) -> str:
    return hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:12]


def engine_reachable(timeout: float = 3.0) -> bool:
    """True if a Docker Engine answers a ping (``DOCKER_HOST`` or the default socket)."""
    try:
        client = docker.from_env(timeout=int(max(1, timeout)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def cached_from_log(lines: Iterable[str]) -> bool | None:
    """Did every COPY/RUN/ADD step of a ``docker build`` log reuse a cached layer? (None:
    no such step.) Metadata steps, such as the revision's own LABEL, never count."""
    work: list[bool] = []
    current: str | None = None
    for line in lines:
        m = re.match(r"Step \d+/\d+ : (\w+)", line)
        if m:
            current = m.group(1).upper()
            if current in ("COPY", "RUN", "ADD"):
                work.append(False)
        elif "Using cache" in line and current in ("COPY", "RUN", "ADD") and work:
            work[-1] = True
    return all(work) if work else None


def _tail(lines: Iterable[str], n: int = 8) -> str:
    kept = [line for line in lines if line.strip()]
    return "\n".join(kept[-n:])


def _exit_code(status: str) -> int | None:
    m = re.match(r"Exited \((-?\d+)\)", status or "")
    return int(m.group(1)) if m else None


def _make_readable(root: Path) -> None:
    """The image runs as uid 65534: everything copied in must be world-readable."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            mode = p.stat().st_mode
            extra = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
            if stat.S_ISDIR(mode) or mode & stat.S_IXUSR:
                extra |= stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
            p.chmod(stat.S_IMODE(mode) | extra)


class DockerDriver:
    name = "docker"

    def __init__(
        self,
        state_dir: Path,
        base_image: str | None = None,
        host: str = "127.0.0.1",
        client: docker.DockerClient | None = None,
        pool_size: int | None = None,
    ) -> None:
        """``pool_size``: members of the warm pool (``dockerpool``); None reads
        ``TORPOR_DOCKER_POOL`` (default 10), 0 is no pool."""
        self.state_dir = Path(state_dir)
        self.base_image = base_image or base_image_name()
        self.host = host
        self.endpoint_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self.instance = instance_id(self.state_dir)
        self._client = client
        self._base_lock = asyncio.Lock()
        self._base_python: str | None = None
        self.networks = Networks(lambda: self.client, self.instance)
        size = dockerpool.pool_size() if pool_size is None else pool_size
        self.pool = Pool(size, self._create_member, self._discard)
        self.pool_owner = secrets.token_hex(6)  # this driver's members: label torpor.pool
        # container id -> (function, revision, replica) of specialised members: their
        # labels cannot say. Kept in the state directory (an embedded store keeps no
        # replica records over a restart) and given back by the controller's records
        # (``recall``: a store shared by controllers on other state directories).
        self._served_lock = threading.Lock()
        self.served: dict[str, tuple[str, str, str]] = self._load_served()
        self._packed: dict[tuple[str, str], Any] = {}
        self._pool_image: str | None = None
        self._pool_image_lock = threading.Lock()
        self._sweeping: asyncio.Task[None] | None = None  # recall's removal of stale members

    def use_instance(self, instance: str) -> None:
        """Label, tag and network what this driver makes as installation ``instance``."""
        self.instance = instance
        self.networks.instance = instance

    # -- plumbing --------------------------------------------------------------------------
    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = docker.from_env(timeout=120)
        return self._client

    async def ping(self) -> None:
        """Raise if the engine does not answer."""
        await asyncio.to_thread(self.client.ping)

    def _labels(self, revision: Revision, replica: str | None = None) -> dict[str, str]:
        labels = {
            MANAGED: "true",
            INSTANCE: self.instance,
            "torpor.function": revision.function,
            "torpor.revision": revision.name,
        }
        if replica is not None:
            labels["torpor.replica"] = replica
        return labels

    # -- build -----------------------------------------------------------------------------
    async def prepare(self, revision: Revision, progress: Progress | None = None) -> Revision:
        loop = asyncio.get_running_loop()

        def say(line: str) -> None:  # callable from worker threads; runs on the loop
            if progress is not None:
                loop.call_soon_threadsafe(progress, line)

        spec = revision.spec
        if spec.image:
            try:
                await asyncio.to_thread(self.client.images.get, spec.image)
            except docker.errors.ImageNotFound:
                raise BuildError(
                    f"image {spec.image} not found locally (no registry is reachable: "
                    f"build or load it with `docker build`/`docker load` first)"
                ) from None
            except docker.errors.DockerException as e:
                raise BuildError(f"Docker Engine error while looking up {spec.image}: {e}") from e
            revision.image = spec.image
            return revision

        if not revision.source or not Path(revision.source).is_dir():
            raise BuildError(f"source folder {revision.source!r} is missing")
        await self._ensure_base(say)
        tag = image_name(revision, self.instance)
        work = self.state_dir / "docker-build"
        work.mkdir(parents=True, exist_ok=True)
        ctx = Path(tempfile.mkdtemp(prefix=f"{revision.name}-", dir=work))
        try:
            await asyncio.to_thread(self._context, revision, ctx, say)
            await asyncio.to_thread(self._build, revision, ctx, tag, say)
        finally:
            shutil.rmtree(ctx, ignore_errors=True)
        revision.image = tag
        return revision

    def build_info(self, revision: Revision, lines: list[str]) -> dict[str, Any]:
        """``{"size": bytes, "cached": bool}`` of a revision just built (blocking; the
        controller's one-line build event). Cached: every COPY/RUN step reused a layer."""
        info: dict[str, Any] = {}
        if revision.image:
            try:
                info["size"] = int(self.client.images.get(revision.image).attrs.get("Size") or 0)
            except docker.errors.DockerException:
                pass
        cached = cached_from_log(lines)
        if cached is not None:
            info["cached"] = cached
        return info

    async def _ensure_base(self, say: Callable[[str], None]) -> None:
        async with self._base_lock:
            try:
                await asyncio.to_thread(self.client.images.get, self.base_image)
                return
            except docker.errors.ImageNotFound:
                pass
            except docker.errors.DockerException as e:
                raise BuildError(f"Docker Engine not reachable: {e}") from e
            can_build = (
                self.base_image == "torpor/python-base:bookworm"
                and shutil.which("debootstrap") is not None
                and os.geteuid() == 0
            )
            if not can_build:
                raise BuildError(
                    f"base image {self.base_image} not found locally: build it with "
                    "`python -m torpor.drivers.baseimage` (debootstrap, as root) or set "
                    "TORPOR_BASE_IMAGE to an image you have (e.g. python:3.12-slim)"
                )
            say(f"base image {self.base_image} missing: building it once (about a minute)")
            try:
                await asyncio.to_thread(build_base_image, self.base_image, say)
            except BaseImageError as e:
                raise BuildError(str(e)) from e

    def _python_of_base(self) -> str:
        """``X.Y`` of the base image's python3 (cached); pip installs deps for it."""
        if self._base_python is None:
            out = self.client.containers.run(
                self.base_image,
                ["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                remove=True,
                network_disabled=True,
                user=USER,
            )
            self._base_python = out.decode().strip()
        return self._base_python

    def _context(self, revision: Revision, ctx: Path, say: Callable[[str], None]) -> None:
        src = Path(revision.source or "")
        server = runtime_server()
        if not server.is_file():
            raise BuildError(f"runtime {server} is missing")
        (ctx / "torpor").mkdir()
        shutil.copy2(server, ctx / "torpor" / "server.py")
        shutil.copy2(
            server.parent / "openfaas.py", ctx / "torpor" / "openfaas.py"
        )  # handler_style: openfaas
        shutil.copytree(
            src,
            ctx / "fn",
            symlinks=True,  # never dereference a link to a host file
            ignore=ignore_skipped,
        )
        requirements = pip.read_requirements(
            src
        )  # before anything runs: a bad line is a BuildError
        if requirements:
            self._pip(requirements, ctx / "fn" / ".deps", say)
        _make_readable(ctx)
        (ctx / "Dockerfile").write_text(
            dockerfile(
                self.base_image, revision.spec.handler or "handler:handle", revision.spec.port
            )
        )

    def _pip(self, requirements: list[str], target: Path, say: Callable[[str], None]) -> None:
        """Install the (validated) requirements for the base image's python, on the host:
        wheels only, from an empty directory (``torpor.drivers.pip``)."""
        try:
            base_py = self._python_of_base()
        except docker.errors.DockerException as e:
            raise BuildError(f"cannot run the base image {self.base_image}: {e}") from e
        host_py = f"{sys.version_info[0]}.{sys.version_info[1]}"
        # Cross-version install: wheels for the image's interpreter.
        cross = base_py if base_py and base_py != host_py else None
        say(
            f"pip install -r requirements.txt (for python {base_py or host_py}, on the host, wheels only)"
        )
        pip.install(
            requirements,
            target,
            python=sys.executable,
            python_version=cross,
            cache_dir=self.state_dir / "pip-cache",
            say=say,
        )

    def _build(self, revision: Revision, ctx: Path, tag: str, say: Callable[[str], None]) -> None:
        say(f"building image {tag} from {self.base_image}")
        lines: list[str] = []
        try:
            for chunk in self.client.api.build(
                path=str(ctx),
                tag=tag,
                labels=self._labels(revision),
                rm=True,
                forcerm=True,
                pull=False,
                decode=True,
            ):
                if "stream" in chunk:
                    for line in str(chunk["stream"]).splitlines():
                        if line.strip():
                            lines.append(line)
                            say(line)
                if "error" in chunk:
                    detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                    raise BuildError(f"docker build of {tag} failed: {detail}\n{_tail(lines)}")
        except docker.errors.DockerException as e:
            raise BuildError(f"docker build of {tag} failed: {e}\n{_tail(lines)}") from e

    async def remove(self, revision: Revision) -> None:
        try:  # the function's network, once none of its containers is left
            await asyncio.to_thread(self.networks.remove_if_unused, revision.function)
        except docker.errors.DockerException as e:
            log.warning("removing the network of %s failed: %s", revision.function, e)
        if revision.spec.image:
            return  # the user's image, not ours
        tag = image_name(revision, self.instance)

        def rm() -> None:
            try:
                image = self.client.images.get(tag)
                owner = image.labels.get(INSTANCE)
                if owner and owner != self.instance:
                    return  # built by another Torpor installation on this engine
                self.client.images.remove(tag, force=True)
            except docker.errors.ImageNotFound:
                pass
            except docker.errors.APIError as e:
                if e.status_code != 404:
                    raise

        await asyncio.to_thread(rm)

    # -- replicas --------------------------------------------------------------------------
    def _env(
        self, revision: Revision, replica: str, secret_env: Mapping[str, str] | None
    ) -> dict[str, str]:
        """The env of a replica of ``revision``: spec, secrets, the runtime's settings."""
        spec = revision.spec
        env = {
            **spec.env,
            **(secret_env or {}),
            "PORT": str(spec.port),
            "TORPOR_FUNCTION": revision.function,
            "TORPOR_REVISION": revision.name,
            "TORPOR_REPLICA": replica,
            "TORPOR_MAX_BODY": str(
                spec.max_body
            ),  # the runtime takes what the gateway lets through
            **runtime_env(revision),
            **contract_env(revision),
        }
        if not spec.image:
            env["TORPOR_HOST"] = "0.0.0.0"  # the runtime must listen beyond the container's lo
        return env

    def _hardened(
        self,
        name: str,
        labels: dict[str, str],
        env: dict[str, str],
        port: int,
        resources: Resources,
    ) -> dict[str, Any]:
        """``containers.create`` arguments of every container this driver runs code in (a
        replica, a pool member): uid 65534, no capabilities, no new privileges, read-only
        root with a small tmpfs /tmp, pid/CPU/memory limits, the port published on
        ``self.host`` only. The network is the caller's (``self.networks``)."""
        kwargs: dict[str, Any] = dict(
            name=name,
            labels=labels,
            environment=env,
            ports={f"{port}/tcp": (self.host, None)},
            user=USER,
            read_only=True,
            tmpfs=dict(TMPFS),
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            privileged=False,
            pids_limit=PIDS_LIMIT,
        )
        if resources.cpu > 0:
            kwargs["nano_cpus"] = max(1_000_000, int(resources.cpu * 1e9))
        if resources.memory > 0:
            kwargs["mem_limit"] = int(resources.memory)
        return kwargs

    async def start(
        self, revision: Revision, replica: str, secret_env: Mapping[str, str] | None = None
    ) -> Running:
        image = revision.image or revision.spec.image
        if not image:
            raise BuildError(f"revision {revision.name} has no image: prepare it first")
        if self.pool.size > 0:
            self.pool.start()
            if dockerpool.not_pooled(revision) is None:
                running = await self._from_pool(revision, replica, secret_env)
                if running is not None:
                    return running
        spec = revision.spec
        # Docker keeps env in the container's config: `docker inspect` shows it
        env = self._env(revision, replica, secret_env)
        kwargs = self._hardened(
            f"torpor-{replica}",
            {**spec.labels, **self._labels(revision, replica)},
            env,
            spec.port,
            spec.resources,
        )
        if spec.image and spec.command is not None:
            kwargs["entrypoint"] = list(spec.command)  # Knative `command`: the image's ENTRYPOINT
        if spec.image and spec.args is not None:
            kwargs["command"] = list(spec.args)  # Knative `args`: the image's CMD

        def create() -> Any:
            # create + start rather than containers.run, which would try to pull a
            # missing image (no registry here) and leave a half-made container behind.
            kwargs["network"] = self.networks.ensure(revision.function)
            try:
                return self.client.containers.create(image, **kwargs)
            except docker.errors.ImageNotFound:
                raise BuildError(
                    f"image {image} of {revision.name} not found locally: prepare it again"
                ) from None
            except docker.errors.APIError as e:
                if e.status_code != 409:
                    raise
            self._remove_stale(kwargs["name"])  # a leftover of the same name
            return self.client.containers.create(image, **kwargs)

        def run_once() -> Running:
            container = create()
            try:
                container.start()
                container.reload()
            except BaseException:
                try:
                    container.remove(force=True)
                except docker.errors.DockerException:
                    pass
                raise
            return self._running(container.attrs)

        def run() -> Running:
            try:
                return run_once()
            except docker.errors.NotFound as e:
                if isinstance(e, docker.errors.ImageNotFound) or "network" not in str(e).lower():
                    raise
            # the network was removed under us (emptied by a remove() or a prune): again
            self.networks.forget(revision.function)
            return run_once()

        return await asyncio.to_thread(run)

    # -- the warm pool (dockerpool) ------------------------------------------------------
    def _ensure_pool_image(self) -> str:
        """The pool image: the generic runtime image (``runtimeimage``) on this driver's
        base image, tagged by the hash of its build context; built once if missing."""
        with self._pool_image_lock:
            if self._pool_image is not None:
                return self._pool_image
            work = self.state_dir / "docker-build"
            work.mkdir(parents=True, exist_ok=True)
            ctx = Path(tempfile.mkdtemp(prefix="pool-", dir=work))
            try:
                build_context(ctx, self.base_image, "pool")
                digest = hashlib.sha256(self.base_image.encode())
                for p in sorted(ctx.rglob("*")):
                    if p.is_file():
                        digest.update(str(p.relative_to(ctx)).encode() + b"\0" + p.read_bytes())
                tag = f"torpor/pool:{digest.hexdigest()[:16]}"
                if not self.client.images.list(name=tag):
                    self.client.images.get(self.base_image)  # missing: ImageNotFound, no pull
                    for chunk in self.client.api.build(
                        path=str(ctx), tag=tag, rm=True, forcerm=True, pull=False, decode=True
                    ):
                        if "error" in chunk:
                            raise PoolError(f"docker build of {tag} failed: {chunk['error']}")
            finally:
                shutil.rmtree(ctx, ignore_errors=True)
            self._pool_image = tag
            return tag

    async def _create_member(self) -> Member:
        """One pool member, created and started hardened like a replica, waiting."""

        def create() -> Member:
            image = self._ensure_pool_image()
            token = dockerpool.new_token()
            env = {
                "PORT": str(POOL_PORT),
                "TORPOR_HOST": "0.0.0.0",
                "TORPOR_POOL_TOKEN": token,
                "TORPOR_FETCH_DIR": "/tmp/fn",
            }
            labels = {
                MANAGED: "true",
                INSTANCE: self.instance,
                POOL_LABEL: self.pool_owner,
                "torpor.function": POOL_FUNCTION,  # its network's: see dockernet.prune
            }
            kwargs = self._hardened(
                f"torpor-pool-{secrets.token_hex(6)}", labels, env, POOL_PORT, Resources()
            )
            kwargs["command"] = [
                "python3",
                "-c",
                "import sys; sys.path.insert(0, '/torpor'); import fetch; "
                "sys.exit(fetch.pooled_main())",
            ]
            kwargs["network"] = self.networks.ensure(POOL_FUNCTION)
            try:
                container = self.client.containers.create(image, **kwargs)
            except docker.errors.NotFound as e:
                if "network" not in str(e).lower():
                    raise
                self.networks.forget(POOL_FUNCTION)
                kwargs["network"] = self.networks.ensure(POOL_FUNCTION)
                container = self.client.containers.create(image, **kwargs)
            try:
                container.start()
                container.reload()
            except BaseException:
                with contextlib.suppress(docker.errors.DockerException):
                    container.remove(force=True)
                raise
            endpoint = self._endpoint(container.attrs.get("NetworkSettings", {}).get("Ports"))
            if not endpoint:
                with contextlib.suppress(docker.errors.DockerException):
                    container.remove(force=True)
                raise PoolError("the pool member has no published port")
            deadline = time.monotonic() + 60.0
            while not dockerpool.is_waiting(endpoint):
                if time.monotonic() > deadline:
                    with contextlib.suppress(docker.errors.DockerException):
                        container.remove(force=True)
                    raise PoolError("the pool member did not start waiting within 60 s")
                time.sleep(0.02)
            return Member(container_id=container.id, endpoint=endpoint, token=token)

        return await asyncio.to_thread(create)

    async def _discard(self, container_id: str) -> None:
        def rm() -> None:
            try:
                self.client.api.remove_container(container_id, force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                if e.status_code not in (404, 409):
                    raise

        await asyncio.to_thread(rm)

    def _archive(self, revision: Revision) -> tuple[str, bytes]:
        """(expected sha256, archive bytes) of a source revision: the normalised archive of
        its folder (``torpor.sources.pack``), which must hash to ``source_sha256`` (else
        OSError: no member; and a member refuses bytes that do not match the hash it is
        given); kept for the next start of the same folder."""
        from torpor.sources import pack

        key = (revision.name, str(revision.source))
        packed = self._packed.get(key)
        if packed is None:
            folder = Path(revision.source or "")
            size = sum(
                (Path(d) / f).lstat().st_size for d, _, files in os.walk(folder) for f in files
            )
            if size > dockerpool.MAX_SOURCE:
                raise OSError(f"{size} bytes of source, over the pool's {dockerpool.MAX_SOURCE}")
            packed = pack(folder)
            if len(self._packed) >= 64:  # at most 64 x MAX_SOURCE (compressed) held
                self._packed.pop(next(iter(self._packed)))
            self._packed[key] = packed
        want = revision.source_sha256 or packed.sha256
        if packed.sha256 != want:
            # a folder changed since its archive was stored, or a gzip that packs otherwise
            # on this host: the revision's own image (prepare) runs it, not a member
            raise OSError(f"its folder packs to {packed.sha256[:12]}, not {want[:12]}")
        return want, packed.data

    async def _from_pool(
        self, revision: Revision, replica: str, secret_env: Mapping[str, str] | None
    ) -> Running | None:
        """A replica made of a pool member, or None when none is idle (or the revision's
        source cannot be packed): the caller then runs its image. A member that refuses
        the archive is removed and the start fails."""
        from torpor.sources import SourceError

        try:
            want, archive = await asyncio.to_thread(self._archive, revision)
        except (SourceError, OSError) as e:
            log.warning("docker pool: %s cannot use the pool: %s", revision.name, e)
            return None
        spec = revision.spec
        env = {
            **self._env(revision, replica, secret_env),
            "TORPOR_HANDLER": spec.handler or "handler:handle",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        }
        body = dockerpool.specialise_body(want, env, archive)
        update = dockerpool.limits_update(spec.resources)
        while (member := self.pool.take()) is not None:

            def specialise(m: Member = member) -> Running:
                if update:
                    api = self.client.api  # the SDK's update_container knows no NanoCpus
                    url = api._url("/containers/{0}/update", m.container_id)
                    api._raise_for_status(api._post_json(url, data=update))
                self.served[m.container_id] = (revision.function, revision.name, replica)
                # named like any replica (`docker ps` shows whose it is), beside the request
                rename = threading.Thread(target=self._rename, args=(m, replica), daemon=True)
                rename.start()
                try:
                    self._save_served()
                    dockerpool.send_specialise(m, body)
                except BaseException:
                    self.served.pop(m.container_id, None)
                    raise
                finally:
                    rename.join(10.0)
                return Running(
                    replica=replica,
                    function=revision.function,
                    revision=revision.name,
                    driver_id=m.container_id,
                    endpoint=m.endpoint,
                    labels={
                        MANAGED: "true",
                        INSTANCE: self.instance,
                        POOL_LABEL: self.pool_owner,
                        "torpor.function": revision.function,
                        "torpor.revision": revision.name,
                        "torpor.replica": replica,
                    },
                )

            try:
                return await asyncio.to_thread(specialise)
            except PoolError as e:
                await self._discard(member.container_id)
                if "refused" in str(e):
                    raise BuildError(f"{revision.name}: {e}") from None
                log.warning("docker pool: %s", e)  # a member that died: the next one
            except docker.errors.DockerException as e:
                await self._discard(member.container_id)
                log.warning("docker pool: member %s: %s", member.container_id[:12], e)
        return None

    @property
    def _served_file(self) -> Path:
        return self.state_dir / "docker-pool-replicas.json"

    def _load_served(self) -> dict[str, tuple[str, str, str]]:
        """What an earlier run of this state directory specialised (only ever applied to
        containers labelled ``torpor.pool`` of this installation, see ``list``)."""
        try:
            doc = json.loads(self._served_file.read_text())
        except (OSError, ValueError):
            return {}
        out: dict[str, tuple[str, str, str]] = {}
        if isinstance(doc, dict):
            for cid, rec in doc.items():
                if (
                    isinstance(cid, str)
                    and isinstance(rec, list)
                    and len(rec) == 3
                    and all(isinstance(x, str) for x in rec)
                ):
                    out[cid] = (rec[0], rec[1], rec[2])
        return out

    def _save_served(self) -> None:
        with self._served_lock:
            try:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                tmp = self._served_file.with_suffix(f".tmp-{os.getpid()}-{threading.get_ident()}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "w") as f:
                    json.dump({k: list(v) for k, v in self.served.items()}, f)
                os.replace(tmp, self._served_file)
            except OSError as e:
                log.warning("docker pool: cannot record pooled replicas: %s", e)

    def _rename(self, member: Member, replica: str) -> None:
        try:
            self.client.api.rename(member.container_id, f"torpor-{replica}")
        except docker.errors.DockerException as e:  # a leftover of that name: keep its own
            log.warning(
                "docker pool: naming %s torpor-%s: %s", member.container_id[:12], replica, e
            )

    async def recall(self, records: Iterable[tuple[str, str, str, str]]) -> None:
        """The controller's replica records, ``(driver_id, function, revision, replica)``,
        after a restart: pool members one names are its replicas again (their labels
        cannot say); members no record names and this driver did not make (left by an
        earlier run, specialised or not) are removed, in the background. Starts the pool's
        refill."""
        known = {r[0]: (r[1], r[2], r[3]) for r in records if r[0]}

        def sweep() -> list[str]:
            rows = self.client.api.containers(
                all=True,
                filters={"label": [f"{MANAGED}=true", f"{INSTANCE}={self.instance}", POOL_LABEL]},
            )
            mine = self.pool.ids()
            changed = False
            stale: list[str] = []
            for row in rows:
                cid = row["Id"]
                if cid in self.served or cid in mine:
                    continue
                if cid in known:
                    self.served[cid] = known[cid]
                    changed = True
                    continue
                if (row.get("Labels") or {}).get(POOL_LABEL) == self.pool_owner:
                    continue  # being created by this driver right now
                stale.append(cid)
            present = {row["Id"] for row in rows}
            for cid in [c for c in self.served if c not in present]:  # gone meanwhile
                del self.served[cid]
                changed = True
            if changed:
                self._save_served()
            return stale

        stale = await asyncio.to_thread(sweep)
        self.pool.start()
        if stale:  # after adoption, not in its way (a force-remove takes ~0.1 s each)
            self._sweeping = asyncio.get_running_loop().create_task(self._remove_all(stale))

    async def _remove_all(self, ids: list[str]) -> None:
        for cid in ids:
            try:
                await self._discard(cid)
            except docker.errors.DockerException as e:
                log.warning("docker pool: removing %s left by an earlier run: %s", cid[:12], e)

    def _remove_stale(self, name: str) -> None:
        """A container of the same name is left over: remove it if it is ours."""
        try:
            old = self.client.containers.get(name)
        except docker.errors.NotFound:
            return
        if old.labels.get(INSTANCE) != self.instance:
            raise RuntimeError(f"container {name} exists and was not started by this Torpor")
        old.remove(force=True)

    def _endpoint(self, ports: Any) -> str:
        """``host:port`` from inspect data (dict) or list data (list of dicts)."""
        if isinstance(ports, dict):
            for bindings in ports.values():
                for b in bindings or []:
                    if b.get("HostPort"):
                        return f"{self.endpoint_host}:{b['HostPort']}"
        elif isinstance(ports, list):
            for p in ports:
                if p.get("PublicPort"):
                    return f"{self.endpoint_host}:{p['PublicPort']}"
        return ""

    def _running(self, attrs: dict[str, Any]) -> Running:
        """From ``docker inspect`` output."""
        labels = dict(attrs.get("Config", {}).get("Labels") or {})
        state = attrs.get("State", {})
        alive = state.get("Status") == "running"
        return Running(
            replica=labels.get("torpor.replica", ""),
            function=labels.get("torpor.function", ""),
            revision=labels.get("torpor.revision", ""),
            driver_id=attrs["Id"],
            endpoint=self._endpoint(attrs.get("NetworkSettings", {}).get("Ports")),
            alive=alive,
            exit_code=None if alive else state.get("ExitCode"),
            labels=labels,
        )

    async def list(self) -> list[Running]:
        def ls() -> list[Running]:
            rows = self.client.api.containers(
                all=True, filters={"label": [f"{MANAGED}=true", f"{INSTANCE}={self.instance}"]}
            )
            out = []
            for row in rows:
                labels = dict(row.get("Labels") or {})
                if POOL_LABEL in labels:
                    served = self.served.get(row["Id"])
                    if served is None:
                        continue  # a waiting member (or another run's, until recall): no replica
                    labels.update(
                        zip(
                            ("torpor.function", "torpor.revision", "torpor.replica"),
                            served,
                            strict=True,
                        )
                    )
                alive = row.get("State") == "running"
                code = None if alive else _exit_code(row.get("Status", ""))
                if not alive and code is None:
                    try:
                        code = self.client.api.inspect_container(row["Id"])["State"]["ExitCode"]
                    except docker.errors.NotFound:
                        continue
                out.append(
                    Running(
                        replica=labels.get("torpor.replica", ""),
                        function=labels.get("torpor.function", ""),
                        revision=labels.get("torpor.revision", ""),
                        driver_id=row["Id"],
                        endpoint=self._endpoint(row.get("Ports")),
                        alive=alive,
                        exit_code=code,
                        labels=labels,
                    )
                )
            return sorted(out, key=lambda r: r.replica)

        return await asyncio.to_thread(ls)

    async def stop(self, running: Running, grace: float = 10.0) -> None:
        ref = running.driver_id or f"torpor-{running.replica}"

        def stop() -> None:
            try:
                container = self.client.containers.get(ref)
            except docker.errors.NotFound:
                return
            try:
                container.stop(timeout=max(0, math.ceil(grace)))
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as e:
                if e.status_code not in (304, 404, 409):
                    raise
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                # 409: removal already in progress (a concurrent stop)
                if e.status_code not in (404, 409):
                    raise

        await asyncio.to_thread(stop)
        if self.served.pop(running.driver_id, None) is not None:
            await asyncio.to_thread(self._save_served)

    async def pause(self, running: Running) -> None:
        """Freeze the container (cgroup freezer: no CPU, memory kept)."""
        ref = running.driver_id or f"torpor-{running.replica}"
        await asyncio.to_thread(lambda: self.client.api.pause(ref))

    async def unpause(self, running: Running) -> None:
        ref = running.driver_id or f"torpor-{running.replica}"

        def unpause() -> None:
            try:
                self.client.api.unpause(ref)  # no inspect first: it costs the wake a round trip
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                if "is not paused" not in str(e):  # a race with another unpause
                    raise

        await asyncio.to_thread(unpause)

    async def logs(
        self, running: Running, follow: bool = False, tail: int = 200
    ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue(maxsize=1000)
        ref = running.driver_id or f"torpor-{running.replica}"
        box: dict[str, Any] = {}
        stopped = threading.Event()

        def put(item: str | BaseException | None) -> None:
            """Hand one item to the consumer; waits while its queue is full."""
            if stopped.is_set():
                return
            try:
                fut = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
            except RuntimeError:  # the loop is gone
                stopped.set()
                return
            while not stopped.is_set():
                try:
                    fut.result(timeout=1.0)
                    return
                except TimeoutError:
                    continue
                except Exception:
                    break
            fut.cancel()
            stopped.set()

        def pump() -> None:
            try:
                stream = self.client.api.logs(
                    ref,
                    stdout=True,
                    stderr=True,
                    stream=True,
                    follow=follow,
                    tail=tail if tail else 0,
                )
                box["stream"] = stream
                if stopped.is_set():
                    stream.close()
                    return
                decoder = io.IncrementalNewlineDecoder(None, translate=True)
                buf = ""
                for chunk in stream:
                    buf += decoder.decode(chunk.decode("utf-8", errors="replace"))
                    *done, buf = buf.split("\n")
                    for line in done:
                        put(line)
                    if stopped.is_set():
                        break
                if buf:
                    put(buf)
            except docker.errors.NotFound:
                pass
            except BaseException as e:
                if not stopped.is_set():
                    put(e)
            finally:
                put(None)

        thread = threading.Thread(target=pump, name=f"logs-{running.replica}", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stopped.set()
            stream = box.get("stream")
            if stream is not None:
                try:
                    stream.close()
                except Exception:
                    pass
            while not queue.empty():  # unblock a pump waiting on a full queue
                queue.get_nowait()

    async def close(self) -> None:
        if self._sweeping is not None:
            await self._sweeping
        await self.pool.close()  # idle members go; specialised ones are replicas: they stay
        if self._client is not None:
            try:  # networks left empty (their replicas stopped): adopted ones stay
                await asyncio.to_thread(self.networks.prune)
            except docker.errors.DockerException as e:
                log.warning("pruning empty networks failed: %s", e)
            client, self._client = self._client, None
            await asyncio.to_thread(client.close)

"""The generic runtime image of source functions on a cluster (``torpor images build-runtime``).

One image for every source function: the locally built base image (``baseimage.py``;
any image with ``python3`` and a uid 65534 will do) plus the stand-alone runtime
(``torpor/runtime/*.py``). Its entry point is ``fetch.py``: it downloads the function's
archive by hash, checks it, extracts it into ``/tmp/fn`` and execs ``server.py`` on it.
Built with the local Docker Engine, tagged ``torpor/runtime:VERSION``; the user pushes it
to a registry the cluster pulls from and names it with ``TORPOR_RUNTIME_IMAGE``.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from torpor.drivers.baseimage import base_image_name

RUNTIME_LABEL = "torpor.runtime"

DOCKERFILE = """\
FROM {base}
COPY torpor/ /torpor/
RUN python3 -m compileall -q /torpor && chmod -R a+rX /torpor
ENV TORPOR_HOST=0.0.0.0 \\
    TORPOR_FETCH_DIR=/tmp/fn \\
    PORT=8080 \\
    PYTHONDONTWRITEBYTECODE=1 \\
    PYTHONUNBUFFERED=1 \\
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL {label}={version}
WORKDIR /tmp
USER 65534:65534
EXPOSE 8080
CMD ["python3", "-c", "import sys; sys.path.insert(0, '/torpor'); import fetch; sys.exit(fetch.main())"]
"""


class RuntimeImageError(Exception):
    """Building the runtime image failed; the message says why."""


def torpor_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torpor")
    except PackageNotFoundError:
        return "dev"


def default_tag() -> str:
    return f"torpor/runtime:{torpor_version()}"


def runtime_dir() -> Path:
    """The folder of the stand-alone runtime (server.py, fetch.py...) without importing it."""
    spec = importlib.util.find_spec("torpor.runtime.fetch")
    if spec is not None and spec.origin:
        return Path(spec.origin).parent
    return Path(__file__).resolve().parent.parent / "runtime"


def build_context(ctx: Path, base: str, version: str) -> None:
    """Write the build context (Dockerfile + torpor/*.py) into the empty folder ``ctx``."""
    src = runtime_dir()
    files = sorted(p for p in src.glob("*.py") if p.name != "__init__.py")
    if not any(p.name == "fetch.py" for p in files) or not any(
        p.name == "server.py" for p in files
    ):
        raise RuntimeImageError(
            f"the runtime in {src} is incomplete (fetch.py and server.py needed)"
        )
    (ctx / "torpor").mkdir()
    for p in files:
        shutil.copy2(p, ctx / "torpor" / p.name)
    (ctx / "Dockerfile").write_text(
        DOCKERFILE.format(base=base, label=RUNTIME_LABEL, version=version)
    )


def build_runtime_image(
    tag: str | None = None, base: str | None = None, progress: Callable[[str], None] = print
) -> str:
    """Build the image; returns its tag. Raises RuntimeImageError."""
    import docker
    import docker.errors

    tag = tag or default_tag()
    base = base or base_image_name()
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as e:
        raise RuntimeImageError(f"Docker Engine not reachable: {e}") from e
    ctx = Path(tempfile.mkdtemp(prefix="torpor-runtime-"))
    try:
        try:
            client.images.get(base)
        except docker.errors.ImageNotFound:
            raise RuntimeImageError(
                f"base image {base} not found locally: build it with `torpor images build-base` "
                "or give --base (any image with python3 and a uid 65534)"
            ) from None
        build_context(ctx, base, torpor_version())
        progress(f"building {tag} from {base}")
        lines: list[str] = []
        try:
            for chunk in client.api.build(
                path=str(ctx), tag=tag, rm=True, forcerm=True, pull=False, decode=True
            ):
                for line in str(chunk.get("stream", "")).splitlines():
                    if line.strip():
                        lines.append(line)
                        progress(line)
                if "error" in chunk:
                    detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                    raise RuntimeImageError(
                        f"docker build of {tag} failed: {detail}\n" + "\n".join(lines[-8:])
                    )
        except docker.errors.DockerException as e:
            raise RuntimeImageError(f"docker build of {tag} failed: {e}") from e
        progress(
            f"built {tag}: push it to your registry (docker tag/push) and set TORPOR_RUNTIME_IMAGE"
        )
        return tag
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
        client.close()

"""The base image for Python functions, built locally (no registry needed).

``debootstrap`` a minimal Debian bookworm with ``python3`` into a temporary folder,
then ``docker import`` it as ``torpor/python-base:bookworm``. Users with a registry
set ``TORPOR_BASE_IMAGE=python:3.12-slim`` (any image with ``python3`` on PATH and a
uid 65534) and never need this.

    python -m torpor.drivers.baseimage [--force] [--name NAME]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_BASE_IMAGE = os.environ.get("TORPOR_BASE_IMAGE") or "torpor/python-base:bookworm"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BASE_LABEL = "torpor.base"

# Dropped from the root file system before import: caches and docs nobody reads in a replica.
_PRUNE = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
)


class BaseImageError(Exception):
    """Building the base image failed; the message says why."""


def base_image_name() -> str:
    """The configured base image (``TORPOR_BASE_IMAGE`` read at call time)."""
    return os.environ.get("TORPOR_BASE_IMAGE") or "torpor/python-base:bookworm"


def _source_files(root: Path) -> list[Path]:
    files = [root / "sources.list"]
    d = root / "sources.list.d"
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    return [f for f in files if f.is_file()]


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses for ``bookworm`` (one-line or deb822)."""
    for f in _source_files(apt_dir):
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    k, _, v = line.partition(":")
                    fields[k.strip().lower()] = v.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                types = fields.get("types", "").split()
                suites = fields.get("suites", "").split()
                if "deb" in types and SUITE in suites and fields.get("uris"):
                    return fields["uris"].split()[0].rstrip("/")
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()
                if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                    return parts[1].rstrip("/")
    return DEFAULT_MIRROR


def _client():  # type: ignore[no-untyped-def]
    import docker

    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as e:
        raise BaseImageError(f"Docker Engine not reachable: {e}") from e
    return client


def image_exists(name: str) -> bool:
    import docker.errors

    client = _client()
    try:
        client.images.get(name)
        return True
    except docker.errors.ImageNotFound:
        return False
    finally:
        client.close()


def build_base_image(
    name: str | None = None,
    progress: Callable[[str], None] = print,
    force: bool = False,
    mirror: str | None = None,
) -> str:
    """Build (or find) the base image; returns its name. Raises BaseImageError."""
    name = name or base_image_name()
    client = _client()
    try:
        if not force:
            try:
                client.images.get(name)
                progress(f"base image {name} already present")
                return name
            except Exception:
                pass
        if shutil.which("debootstrap") is None:
            raise BaseImageError(
                f"base image {name} is missing and debootstrap is not installed "
                "(apt-get install -y debootstrap), or set TORPOR_BASE_IMAGE to an image you have"
            )
        mirror = mirror or debian_mirror()
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix="torpor-rootfs-"))
        root = tmp / "root"
        try:
            _debootstrap(root, mirror, progress)
            prune_rootfs(root)
            progress(f"docker import -> {name}")
            _docker_import(client, root, name)
            progress(f"built {name} in {time.monotonic() - t0:.1f}s")
            return name
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        client.close()


def _debootstrap(root: Path, mirror: str, progress: Callable[[str], None]) -> None:
    """A minimal Debian ``SUITE`` with python3 in ``root``, each output line to
    ``progress``; BaseImageError with the last lines if debootstrap fails."""
    progress(f"debootstrap {SUITE} (minbase + python3) from {mirror}")
    cmd = [
        "debootstrap",
        "--variant=minbase",
        "--include=python3",
        SUITE,
        str(root),
        mirror,
    ]
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-15:]
            progress(line)
    if proc.returncode != 0:
        raise BaseImageError(f"debootstrap failed (exit {proc.returncode}):\n" + "\n".join(tail))


def prune_rootfs(root: Path) -> None:
    """Empty the caches and docs of ``_PRUNE`` under ``root`` (their folders stay; apt's
    ``lock`` files stay; a link is removed, never followed)."""
    for rel in _PRUNE:
        p = root / rel
        if p.is_dir():
            for child in p.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                elif child.name != "lock":
                    child.unlink(missing_ok=True)


def repo_and_tag(name: str) -> tuple[str, str]:
    """``REPO:TAG`` split for ``docker import``; a name without a tag (or whose last
    ``:`` is a registry port) gets ``latest``."""
    repo, _, tag = name.rpartition(":")
    if not repo or "/" in tag:
        repo, tag = name, "latest"
    return repo, tag


def _docker_import(client: Any, root: Path, name: str) -> None:
    """``root`` as the image ``name`` (tar streamed into ``docker import``); BaseImageError
    if tar fails or the image is not there afterwards."""
    repo, tag = repo_and_tag(name)
    with subprocess.Popen(
        ["tar", "--numeric-owner", "-C", str(root), "-c", "."],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as tar:
        assert tar.stdout is not None
        try:
            client.api.import_image(
                src=tar.stdout,
                repository=repo,
                tag=tag,
                changes=[
                    'CMD ["python3"]',
                    "ENV LANG=C.UTF-8",
                    f"LABEL {BASE_LABEL}={SUITE}",
                ],
                stream_src=True,
            )
        finally:
            tar.stdout.close()
            err = tar.stderr.read().decode(errors="replace") if tar.stderr else ""
    if tar.returncode != 0:
        raise BaseImageError(f"tar of the root file system failed: {err.strip()}")
    try:
        client.images.get(name)
    except Exception as e:
        raise BaseImageError(f"docker import did not produce {name}: {e}") from e


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m torpor.drivers.baseimage",
        description="Build the local base image for Python functions (debootstrap + docker import).",
    )
    ap.add_argument("--name", default=None, help=f"image name (default {base_image_name()})")
    ap.add_argument("--force", action="store_true", help="rebuild even if the image exists")
    ap.add_argument("--mirror", default=None, help="Debian mirror (default: the one apt uses)")
    args = ap.parse_args(argv)
    try:
        build_base_image(args.name, progress=print, force=args.force, mirror=args.mirror)
    except BaseImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

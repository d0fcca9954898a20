"""One list of what is left out of a function folder: the CLI's upload (``torpor deploy``
and ``deploy FILE``) and the Docker driver's build context skip exactly the same names."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path, PurePath

import pytest

from torpor.archive import SKIP_NAMES, ignore_skipped, skipped, skipped_path
from torpor.cli import main as cli
from torpor.drivers.docker import DockerDriver
from torpor.model import Revision, Spec

KEPT = {"torpor.yaml", "handler.py", "lib", "lib/util.py", "lib/data.pyx", "venvs", "venvs/a.py"}


def folder(tmp_path: Path) -> Path:
    """A function folder with every skipped name at the top and one level down, each
    holding a file, plus ``*.pyc`` files next to kept ones."""
    src = tmp_path / "fn"
    (src / "lib").mkdir(parents=True)
    (src / "venvs").mkdir()
    (src / "torpor.yaml").write_text("name: skip\nhandler: handler:handle\n")
    (src / "handler.py").write_text("def handle(request):\n    return 'hi'\n")
    (src / "lib" / "util.py").write_text("X = 1\n")
    (src / "lib" / "data.pyx").write_text("# kept: not bytecode\n")
    (src / "venvs" / "a.py").write_text("A = 1\n")
    (src / "handler.pyc").write_bytes(b"\0")
    (src / "lib" / "util.cpython-312.pyc").write_bytes(b"\0")
    for name in SKIP_NAMES:
        for parent in (src, src / "lib"):
            (parent / name).mkdir()
            (parent / name / "inside.py").write_text("LEFT_OUT = True\n")
    return src


def cli_names(src: Path) -> set[str]:
    with tarfile.open(fileobj=io.BytesIO(cli.pack(src)), mode="r:gz") as tar:
        return set(tar.getnames())


def docker_names(src: Path, tmp_path: Path) -> set[str]:
    """What the Docker driver copies into the build context's ``fn/`` (no engine needed:
    a folder without requirements never reaches the client)."""
    driver = DockerDriver(tmp_path / "state")
    revision = Revision(
        name="skip-00001", function="skip", number=1, spec=Spec(name="skip"), source=str(src)
    )
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    driver._context(revision, ctx, lambda _line: None)
    fn = ctx / "fn"
    return {p.relative_to(fn).as_posix() for p in fn.rglob("*")}


def test_cli_upload_and_docker_context_skip_the_same_names(tmp_path: Path) -> None:
    src = folder(tmp_path)
    assert cli_names(src) == KEPT
    assert docker_names(src, tmp_path) == KEPT


def test_the_list_is_the_union_the_two_places_had() -> None:
    # the CLI skipped node_modules, the Docker driver venv: both now skip both
    assert {".git", "__pycache__", ".deps", ".venv", "venv", "node_modules"} <= SKIP_NAMES
    assert {".mypy_cache", ".pytest_cache"} <= SKIP_NAMES


@pytest.mark.parametrize(
    ("name", "left_out"),
    [
        ("node_modules", True),
        ("venv", True),
        (".venv", True),
        ("__pycache__", True),
        ("mod.pyc", True),
        (".pyc", True),
        ("mod.py", False),
        ("mod.pyx", False),
        ("venvs", False),
        ("Node_Modules", False),  # exact names only
        ("pyc", False),
        ("", False),
    ],
)
def test_skipped(name: str, left_out: bool) -> None:
    assert skipped(name) is left_out


@pytest.mark.parametrize(
    ("rel", "left_out"),
    [
        ("lib/node_modules/x/index.js", True),
        ("venv/bin/python", True),
        ("lib/x.pyc", True),
        ("lib/x.py", False),
        ("a/venvs/b", False),
    ],
)
def test_skipped_path(rel: str, left_out: bool) -> None:
    assert skipped_path(PurePath(rel)) is left_out


def test_ignore_skipped_keeps_order_of_what_it_drops() -> None:
    names = ["a.py", "venv", "b.pyc", "lib", ".git"]
    assert ignore_skipped("/any", names) == ["venv", "b.pyc", ".git"]

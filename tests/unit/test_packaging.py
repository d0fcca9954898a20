"""The source folders are mapped to import names without shadowing the stdlib.

platform/ is the source root of ``torpor`` and gateway/ of ``torpor.gateway``. Neither
may have an ``__init__.py`` at its top, or ``import platform`` run from the repository
root would find our folder instead of the standard library's module.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def test_import_platform_is_the_standard_library() -> None:
    import platform

    assert platform.__file__ is not None
    assert Path(platform.__file__).resolve().parent == STDLIB
    assert platform.system()


def test_import_platform_from_the_repository_root_is_the_standard_library() -> None:
    # `python -c` puts the current directory first on sys.path: the worst case.
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import platform; print(platform.__file__); print(platform.system())",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert Path(out[0]).resolve().parent == STDLIB
    assert out[1]


def test_torpor_modules_import() -> None:
    model = importlib.import_module("torpor.model")
    assert Path(model.__file__ or "").resolve() == ROOT / "platform" / "model.py"
    gateway = importlib.import_module("torpor.gateway")
    assert str(ROOT / "gateway") in [str(Path(p).resolve()) for p in gateway.__path__]
    importlib.import_module("torpor.store.base")


def test_no_init_at_the_top_of_the_source_roots() -> None:
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert not (ROOT / "gateway" / "__init__.py").exists()

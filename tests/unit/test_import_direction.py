"""Which way the imports point (DEVELOPERS.md): the vocabulary imports nothing of Torpor
but itself,
the gateway imports no control-plane code, the control plane imports no gateway code
(``up.py`` composes both and is the one exception), and the in-replica runtime is
standard library only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def torpor_imports(path: Path) -> set[str]:
    """Every ``torpor...`` module ``path`` imports (relative imports resolved to the top)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0].startswith("torpor"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torpor"):
            found.add(node.module)
    return found


def files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_the_vocabulary_imports_nothing_of_torpor_but_itself() -> None:
    assert torpor_imports(ROOT / "platform/model.py") == set()
    assert torpor_imports(ROOT / "platform/spec.py") <= {"torpor.model"}
    # the bus payloads, shared by the gateway and the control plane
    assert torpor_imports(ROOT / "platform/messages.py") <= {"torpor.model"}


@pytest.mark.parametrize("path", files("gateway"), ids=lambda p: p.name)
def test_the_gateway_imports_no_control_plane_code(path: Path) -> None:
    allowed = ("torpor.gateway", "torpor.messages", "torpor.model", "torpor.spec", "torpor.store")
    assert {m for m in torpor_imports(path) if not m.startswith(allowed)} == set()


@pytest.mark.parametrize(
    "path",
    [p for p in files("platform") if p.name != "up.py" and "runtime" not in p.parts],
    ids=lambda p: str(p.relative_to(ROOT / "platform")),
)
def test_the_control_plane_imports_no_gateway_code(path: Path) -> None:
    assert {m for m in torpor_imports(path) if m.startswith("torpor.gateway")} == set()


@pytest.mark.parametrize("path", files("platform/runtime"), ids=lambda p: p.name)
def test_the_runtime_is_standard_library_only(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    tops = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    tops |= {
        n.module.split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module and n.level == 0
    }
    siblings = {p.stem for p in files("platform/runtime")}  # copied beside each other into images
    assert {t for t in tops if t not in sys.stdlib_module_names and t not in siblings} == set()

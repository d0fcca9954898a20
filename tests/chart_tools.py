"""Rendering charts/torpor in tests: scripts/render-chart (helm when installed, else the
offline Go renderer), parsed into dicts, and small helpers to query the manifests.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RENDER = ROOT / "scripts" / "render-chart"
CHART = ROOT / "charts" / "torpor"

Doc = dict[str, Any]


def require_renderer() -> None:
    """Fail (never skip) when neither helm nor go can render: CI installs go."""
    if shutil.which("helm") is None and shutil.which("go") is None:
        pytest.fail(
            "scripts/render-chart needs helm or go on PATH; neither is installed. On Debian: "
            "apt-get install golang-go golang-github-masterminds-sprig-dev golang-k8s-sigs-yaml-dev "
            "(scripts/test.sh does this)",
            pytrace=False,
        )


def run_render(
    *args: str | Path,
    chart: Path = CHART,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RENDER), str(chart), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def render_text(*args: str | Path, chart: Path = CHART) -> str:
    require_renderer()
    out = run_render(*args, chart=chart)
    assert out.returncode == 0, f"render-chart {' '.join(map(str, args))} failed:\n{out.stderr}"
    return out.stdout


def render(*args: str | Path, chart: Path = CHART) -> list[Doc]:
    return [d for d in yaml.safe_load_all(render_text(*args, chart=chart)) if d is not None]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (
        f"expected one {kind} {name}, found {[d['metadata']['name'] for d in of_kind(docs, kind)]}"
    )
    return found[0]


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Doc) -> Iterator[Doc]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers", []) or []
    yield from spec["containers"]


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_value(secret: Doc, key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for ex in selector.get("matchExpressions") or []:
        key, op, values = ex["key"], ex["operator"], ex.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


_ENV_READERS = frozenset({"get", "getenv", "pop", "env", "_csv_env", "_seconds", "_size"})


def env_names_read(*roots: Path, exclude: tuple[Path, ...] = ()) -> set[str]:
    """``TORPOR_*`` names the Python code under ``roots`` reads from its environment:
    the first argument of ``os.environ.get``/``os.getenv``/``env(...)``-style calls, and
    ``os.environ["..."]`` subscripts (parsed, not grepped: a name in a comment or a
    message does not count)."""
    import ast

    names: set[str] = set()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if any(path.is_relative_to(x) for x in exclude):
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                arg: ast.expr | None = None
                if isinstance(node, ast.Call) and node.args:
                    fn = node.func
                    called = (
                        fn.attr
                        if isinstance(fn, ast.Attribute)
                        else fn.id
                        if isinstance(fn, ast.Name)
                        else ""
                    )
                    if called in _ENV_READERS:
                        arg = node.args[0]
                elif (
                    isinstance(node, ast.Subscript)
                    and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "environ"
                ):
                    arg = node.slice
                if (
                    isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)
                    and arg.value.startswith("TORPOR_")
                ):
                    names.add(arg.value)
    return names

"""scripts/cluster-smoke.sh cannot run here (it needs a real cluster), so what can be
checked without one is: shellcheck finds nothing, every ``torpor`` command line in it
parses with the CLI's own parser, the function it deploys and the canary spec it writes
are valid, and it covers every step cluster mode promises."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from torpor.cli.main import build_parser
from torpor.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "cluster-smoke.sh"
TEXT = SCRIPT.read_text()
# `torpor ARGS` where a command starts: at a line's start, after `$(`, `{ ` or `|| `
_CALL = re.compile(r"(?:^|\$\(|\{ |\|\| |&& )\s*torpor ([^|;)&>\n]*)", re.M)


def _torpor_calls() -> list[list[str]]:
    calls = []
    for m in _CALL.finditer(TEXT):
        words = shlex.split(re.sub(r"\$\{?(\w+)\}?", r"\1", m[1]))
        calls.append(words)
    return calls


def test_shellcheck_finds_nothing() -> None:
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed (apt-get install shellcheck)", pytrace=False)
    r = subprocess.run(
        ["shellcheck", "--severity=style", str(SCRIPT)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_torpor_command_in_it_parses() -> None:
    calls = _torpor_calls()
    commands = {c[0] for c in calls}
    assert {"deploy", "describe", "delete"} <= commands, calls
    for argv in calls:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(
                f"`torpor {' '.join(argv)}` in {SCRIPT.name} is not a command the CLI accepts"
            )
        assert args.cmd == argv[0]


def test_it_covers_install_deploy_wake_burst_canary_and_uninstall() -> None:
    for step in (
        "helm install",
        "torpor deploy functions/hello",
        "scale to zero",
        "burst",
        "--canary 20",
        "helm uninstall",
        "function Pods to be garbage-collected",
    ):
        assert step in TEXT, step
    assert "NOT RUN IN CI" in TEXT and "KUBECONFIG" in TEXT


def test_the_function_and_the_canary_spec_it_deploys_are_valid(tmp_path: Path) -> None:
    hello = tmp_path / "hello"
    shutil.copytree(ROOT / "functions" / "hello", hello)
    load_spec(hello)
    sed = re.search(r"sed -i '(s/[^']+)' \"\$workdir/hello/torpor.yaml\"", TEXT)
    rollout = re.search(r"printf '([^']+)\\n' >>\"\$workdir/hello/torpor.yaml\"", TEXT)
    assert sed and rollout
    _, old, new, _ = sed[1].split("/")
    yaml_text = (hello / "torpor.yaml").read_text()
    assert old in yaml_text
    (hello / "torpor.yaml").write_text(yaml_text.replace(old, new) + rollout[1] + "\n")
    spec = load_spec(hello)
    assert spec.env["GREETING"] == "howdy"
    assert spec.rollout.steps[-1] == 100

"""Everyday CLI pieces without a platform: `torpor new` and its shipped templates, -o
json|yaml, completion scripts, --version, exit codes, and the deploy's phase lines."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from torpor.cli import main as cli
from torpor.cli.completion import completion_script, tree
from torpor.cli.new import NewError, available, create
from torpor.cli.output import emit
from torpor.cli.progress import Phases
from torpor.controller.buildlog import BuildLog, human_bytes
from torpor.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torpor.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_templates_are_listed_from_the_package() -> None:
    found = available()
    assert set(found["python"]) >= {"http", "json"}
    out = run_cli("new", "--list")
    assert (
        out.returncode == 0
        and "http" in out.stdout
        and "json" in out.stdout
        and "(default)" in out.stdout
    )


@pytest.mark.parametrize("template", ["http", "json"])
def test_new_writes_a_folder_that_loads_and_whose_test_passes(
    tmp_path: Path, template: str
) -> None:
    r = run_cli("new", "my-fn", "--template", template, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    dest = tmp_path / "my-fn"
    assert sorted(p.name for p in dest.iterdir()) == [
        "handler.py",
        "requirements.txt",
        "test_handler.py",
        "torpor.yaml",
    ]
    spec = load_spec(dest)  # the same validation a deploy does
    assert spec.name == "my-fn" and spec.handler == "handler:handle"
    assert "#" in (dest / "torpor.yaml").read_text()  # commented
    assert "__NAME__" not in "".join(p.read_text() for p in dest.iterdir())
    t = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_handler.py"],
        cwd=dest,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert t.returncode == 0 and " passed" in t.stdout, t.stdout + t.stderr


def test_new_refuses_bad_names_unknown_templates_and_existing_folders(tmp_path: Path) -> None:
    with pytest.raises(NewError, match="DNS label"):
        create("Bad_Name", tmp_path)
    with pytest.raises(NewError, match="no such python template"):
        create("ok", tmp_path, template="nope")
    with pytest.raises(NewError, match="no such language"):
        create("ok", tmp_path, lang="cobol")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    r = run_cli("new", "taken", cwd=tmp_path)
    assert r.returncode == 1 and "already exists" in r.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert run_cli("new", "Bad_Name", cwd=tmp_path).returncode == 2


@pytest.mark.slow
def test_the_wheel_ships_the_templates_and_the_dashboard(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a clean copy: no build/ or egg-info left from other builds
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git",
            "*.egg-info",
            "build",
            "__pycache__",
            ".mypy_cache",
            ".pytest_cache",
            ".ruff_cache",
            "docs",
        ),
    )
    # as `pip install .` builds it (build isolation: setuptools and wheel from the index)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    wheel = next((tmp_path / "dist").glob("torpor-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for want in (
        "torpor/templates/python/http/torpor.yaml",
        "torpor/templates/python/http/handler.py",
        "torpor/templates/python/http/test_handler.py",
        "torpor/templates/python/http/requirements.txt",
        "torpor/templates/python/json/handler.py",
        "torpor/api/static/index.html",
        "torpor/api/static/app.js",
        "torpor/api/static/style.css",
    ):
        assert want in names, want


def test_output_formats_and_the_json_alias() -> None:
    p = argparse.ArgumentParser()
    from torpor.cli.output import add_output

    add_output(p)
    assert p.parse_args([]).output == "table"
    assert p.parse_args(["--json"]).output == "json"
    assert p.parse_args(["-o", "yaml"]).output == "yaml"
    with pytest.raises(SystemExit) as e:
        p.parse_args(["-o", "xml"])
    assert e.value.code == 2
    data = {
        "functions": [{"name": "hello", "traffic": [{"revision": "hello-00001", "percent": 100}]}]
    }
    for fmt, parse in (("json", json.loads), ("yaml", yaml.safe_load)):
        buf = io.StringIO()
        old, sys.stdout = sys.stdout, buf
        try:
            assert emit(argparse.Namespace(output=fmt), data)
        finally:
            sys.stdout = old
        assert parse(buf.getvalue()) == data
    assert not emit(argparse.Namespace(output="table"), data)


@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "-o", "json"],
        ["ls", "--json"],
        ["describe", "x", "-o", "yaml"],
        ["top", "--once", "-o", "json"],
        ["secret", "ls", "-o", "yaml"],
        ["secret", "ls", "--json"],
        ["rollout", "x", "-o", "json"],
    ],
)
def test_listing_commands_take_an_output_format(argv: list[str]) -> None:
    args = cli.build_parser().parse_args(argv)
    assert args.output in ("json", "yaml")


def test_version_and_usage_exit_codes() -> None:
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("torpor ") and r.stdout.split()[1][0].isdigit()
    assert run_cli("deploy", "--canary", "x").returncode == 2
    assert run_cli("no-such-command").returncode == 2
    help_text = run_cli("--help").stdout
    assert "3  not found" in help_text and "4  refused by a rollout judgement" in help_text


def test_an_api_404_exits_3(tmp_path: Path) -> None:
    import httpx

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            404, json={"error": "function not found", "detail": "no function named 'x'"}
        )

    api = cli.Api("http://127.0.0.1:1", "t")
    api.client = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://127.0.0.1:1")
    with pytest.raises(cli.CliError) as e:
        api.call("GET", "/v1/functions/x")
    assert e.value.code == 3 and "no function named" in str(e.value)


def test_completion_scripts_know_every_command() -> None:
    p = cli.build_parser()
    t = tree(p)
    assert {"deploy", "new", "ui", "completion", "rollout", "secret"} <= set(t[""][0])
    assert "--verbose" in t["deploy"][1] and "--quiet" in t["deploy"][1]
    assert "set" in t["secret"][0] and "--from-file" in t["secret set"][1]
    bash = completion_script(p, "bash")
    if shutil.which("bash"):
        check = subprocess.run(
            ["bash", "-n"], input=bash, capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0, check.stderr
        # complete `torpor dep` and `torpor secret s`
        probe = bash + (
            'COMP_WORDS=(torpor dep); COMP_CWORD=1; _torpor; echo "${COMPREPLY[*]}"\n'
            'COMP_WORDS=(torpor secret s); COMP_CWORD=2; _torpor; echo "${COMPREPLY[*]}"\n'
            'COMP_WORDS=(torpor deploy --q); COMP_CWORD=2; _torpor; echo "${COMPREPLY[*]}"\n'
        )
        out = subprocess.run(
            ["bash", "-c", probe], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()
        assert out == ["deploy", "set", "--quiet"], out
    assert completion_script(p, "zsh").startswith("#compdef torpor")
    fish = completion_script(p, "fish")
    assert "__fish_seen_subcommand_from deploy' -l quiet" in fish
    r = run_cli("completion", "bash")
    assert r.returncode == 0 and "complete -o default -F _torpor torpor" in r.stdout


def test_build_log_messages() -> None:
    log = BuildLog("fn-00001")
    for i in range(500):
        log.add(f"line {i}")
    assert len(log.lines) == 400 and log.dropped == 100 and log.lines[-1] == "line 499"
    msg = log.finished_message({"size": 151_200_000, "cached": False})
    assert msg.startswith("fn-00001: built in ") and "image 151.2 MB" in msg and "not cached" in msg
    failed = log.failed_message("build failed: pip said no")
    assert (
        failed.splitlines()[0].startswith("fn-00001: build failed after")
        and failed.splitlines()[-1] == "line 499"
    )
    assert human_bytes(999) == "999 B" and human_bytes(1500) == "1.5 KB"
    warned = BuildLog("fn-00002")
    warned.add("warning: requirements.txt is not installed on a cluster")
    assert warned.finished_message({}).endswith(
        ", warning: requirements.txt is not installed on a cluster"
    )


def test_phases_print_plain_lines_in_a_pipe_and_nothing_when_quiet() -> None:
    buf = io.StringIO()
    ph = Phases(stream=buf)
    ph.wait("building")  # no spinner in a pipe
    ph.done("fn-00001: built in 1.0s")
    ph.raw("Step 1/14")
    ph.close()
    assert buf.getvalue() == "fn-00001: built in 1.0s\n  | Step 1/14\n"
    quiet = io.StringIO()
    q = Phases(quiet=True, stream=quiet)
    q.done("x")
    q.raw("y")
    assert quiet.getvalue() == ""
    q.fail("fn-00001: failed: build failed: pip said no")  # the one line a quiet failure still says
    assert quiet.getvalue() == "torpor: deploy: fn-00001: failed: build failed: pip said no\n"


def test_a_build_is_cached_when_every_copy_and_run_step_reused_a_layer() -> None:
    from torpor.drivers.docker import cached_from_log

    log = [
        "Step 1/4 : FROM base",
        " ---> 6ad3",
        "Step 2/4 : COPY fn/ /fn/",
        " ---> Using cache",
        " ---> b79",
        "Step 3/4 : RUN python3 -m compileall /fn",
        " ---> Using cache",
        " ---> f2b",
        "Step 4/4 : LABEL torpor.revision=fn-00002",
        " ---> Running in 8f11",
        " ---> 9787",
    ]
    assert cached_from_log(log) is True
    assert cached_from_log(log[:3] + log[4:]) is False  # COPY ran afresh
    assert cached_from_log(["installing requirements.txt"]) is None

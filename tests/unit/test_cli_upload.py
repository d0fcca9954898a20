"""The CLI's side of uploads: what ``pack`` ships (and warns about), the content type of
the deploy request, and the upload caps as flags and environment variables."""

from __future__ import annotations

import io
import os
from pathlib import Path

import httpx
import pytest

from torpor.archive import ArchiveLimits, extract
from torpor.cli import main as cli


def folder(tmp_path: Path) -> Path:
    src = tmp_path / "fn"
    (src / "lib").mkdir(parents=True)
    (src / "torpor.yaml").write_text("name: packed\nhandler: handler:handle\n")
    (src / "handler.py").write_text("def handle(request):\n    return 'hi'\n")
    (src / "lib" / "util.py").write_text("X = 1\n")
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "handler.cpython-311.pyc").write_bytes(b"\0")
    outside = tmp_path / "secret.txt"
    outside.write_text("not for upload")
    (src / "leak.txt").symlink_to(outside)
    (src / "lib" / "shared").symlink_to(tmp_path)
    os.mkfifo(src / "pipe")
    return src


def test_pack_skips_links_and_special_files_with_a_warning(tmp_path: Path) -> None:
    warnings: list[str] = []
    data = cli.pack(folder(tmp_path), warn=warnings.append)
    out = tmp_path / "out"
    got = extract(io.BytesIO(data), out, ArchiveLimits())  # what the server accepts
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "handler.py",
        "lib",
        "lib/util.py",
        "torpor.yaml",
    ]
    assert got.files == 3
    assert len(warnings) == 3
    assert any(
        w.startswith("skipping symlink leak.txt -> ") and "regular files and folders only" in w
        for w in warnings
    )
    assert any(w.startswith("skipping symlink lib/shared -> ") for w in warnings)
    assert any(w == "skipping pipe: not a regular file or folder" for w in warnings)


def test_deploy_sends_the_archive_as_application_gzip(tmp_path: Path, capsys) -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "POST":
            return httpx.Response(201, json={"function": "packed", "revision": "packed-00001"})
        if request.url.path.endswith("/events"):
            return httpx.Response(200, json={"events": []})
        if "/revisions/" in request.url.path:
            return httpx.Response(200, json={"status": "ready"})
        return httpx.Response(
            200, json={"url": "http://packed.torpor.localhost:8080/", "traffic": []}
        )

    api = cli.Api("http://api.invalid", None)
    api.client = httpx.Client(base_url="http://api.invalid", transport=httpx.MockTransport(answer))
    args = cli.build_parser().parse_args(["deploy", str(folder(tmp_path)), "--wait", "10"])
    assert cli.cmd_deploy(api, args) == 0
    post = seen[0]
    assert post.method == "POST" and post.url.path == "/v1/functions"
    assert post.headers["content-type"] == "application/gzip"
    assert post.content[:2] == b"\x1f\x8b"
    err = capsys.readouterr().err
    assert "torpor: deploy: skipping symlink leak.txt" in err


@pytest.mark.parametrize("cmd", ["up", "api"])
def test_upload_caps_are_flags_with_defaults(cmd: str) -> None:
    args = cli.build_parser().parse_args([cmd])
    assert (
        cli.upload_limits(args)
        == ArchiveLimits()
        == ArchiveLimits(
            max_upload=64 << 20, max_unpacked=256 << 20, max_members=10_000, max_depth=32
        )
    )
    args = cli.build_parser().parse_args(
        [
            cmd,
            "--max-upload",
            "1Mi",
            "--max-unpacked",
            "512Ki",
            "--max-members",
            "7",
            "--max-depth",
            "3",
        ]
    )
    assert cli.upload_limits(args) == ArchiveLimits(1 << 20, 512 << 10, 7, 3)


def test_upload_caps_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("TORPOR_MAX_UPLOAD", "8Mi")
    monkeypatch.setenv("TORPOR_MAX_UNPACKED", "1G")
    monkeypatch.setenv("TORPOR_MAX_MEMBERS", "100")
    monkeypatch.setenv("TORPOR_MAX_DEPTH", "4")
    args = cli.build_parser().parse_args(["up"])
    assert cli.upload_limits(args) == ArchiveLimits(8 << 20, 10**9, 100, 4)
    args = cli.build_parser().parse_args(["up", "--max-members", "5"])  # a flag beats the env
    assert cli.upload_limits(args).max_members == 5


@pytest.mark.parametrize(
    "argv,why",
    [
        (["--max-upload", "lots"], "expected a size such as 64Mi"),
        (["--max-unpacked", "0"], "at least 1 byte"),
        (["--max-members", "-1"], "whole number >= 1"),
        (["--max-depth", "2.5"], "whole number >= 1"),
    ],
)
def test_bad_caps_are_refused_naming_the_flag(argv: list[str], why: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["up", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[0]}" in err and why in err, err
    assert "Traceback" not in err

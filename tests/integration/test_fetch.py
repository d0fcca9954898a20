"""The runtime's archive fetcher (``torpor/runtime/fetch.py``), run for real: a subprocess
of the stand-alone module fetches from a loopback archive server, checks the hash,
extracts, and execs the runtime, which then answers HTTP on a loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from archive_server import ArchiveServer, tar_bytes

from torpor.runtime import fetch

HANDLER = "import os\n\ndef handle(request):\n    return 'fetched ' + os.environ.get('TORPOR_ARCHIVE_TOKEN', '<no token>')\n"


@pytest.fixture
def archives() -> Iterator[ArchiveServer]:
    srv = ArchiveServer().start()
    try:
        yield srv
    finally:
        srv.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tmp: Path, url: str, sha: str, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TORPOR_ARCHIVE_URL": url,
        "TORPOR_ARCHIVE_SHA256": sha,
        "TORPOR_FETCH_DIR": str(tmp / "fn"),
        "TORPOR_HOST": "127.0.0.1",
        "PORT": str(_free_port()),
        "TORPOR_FETCH_TIMEOUT": "10",
        "PYTHONDONTWRITEBYTECODE": "1",
        **extra,
    }


def run_fetch(env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the fetcher to its end (for archives it must refuse)."""
    return subprocess.run(
        [sys.executable, "-s", fetch.__file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def serve(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """Start the fetcher; returns it and the body of GET / once the runtime answers."""
    proc = subprocess.Popen(
        [sys.executable, "-s", fetch.__file__],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"fetcher exited {proc.returncode}: {out}")
        try:
            r = httpx.get(f"http://127.0.0.1:{env['PORT']}/", trust_env=False, timeout=2)
            return proc, f"{r.status_code} {r.text}"
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("the fetched function did not answer within 30 s")


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def fn_folder(tmp: Path, handler: str = HANDLER) -> Path:
    src = tmp / "src"
    src.mkdir()
    (src / "handler.py").write_text(handler)
    (src / "lib").mkdir()
    (src / "lib" / "data.txt").write_text("x" * 100)
    return src


def test_a_good_archive_is_fetched_checked_extracted_and_served(
    tmp_path: Path, archives: ArchiveServer
) -> None:
    sha = archives.add_folder(fn_folder(tmp_path))
    proc, body = serve(_env(tmp_path, archives.url(sha), sha))
    try:
        assert body == "200 fetched <no token>"
        fn = tmp_path / "fn"
        assert (fn / "handler.py").read_text() == HANDLER
        assert (
            fn / "lib" / "data.txt"
        ).stat().st_mode & 0o777 == 0o444  # read-only, as /fn on Docker
        assert fn.stat().st_mode & 0o777 == 0o555
        assert not list(tmp_path.glob("fn.archive-*")) and not list(tmp_path.glob("fn.partial-*"))
    finally:
        out = stop(proc)
    assert f"torpor-fetch: sha256:{sha[:12]} ok, 2 files" in out


def test_the_download_is_retried_while_the_server_answers_503(
    tmp_path: Path, archives: ArchiveServer
) -> None:
    sha = archives.add_folder(fn_folder(tmp_path))
    archives.fail_first = 2
    proc, body = serve(_env(tmp_path, archives.url(sha), sha))
    out = stop(proc)
    assert body.startswith("200 ")
    assert out.count("HTTP 503") == 2 and len(archives.requests) == 3


def test_an_unknown_archive_fails_at_once_with_the_servers_answer(
    tmp_path: Path, archives: ArchiveServer
) -> None:
    sha = "ab" * 32
    r = run_fetch(_env(tmp_path, archives.url(sha), sha))
    assert r.returncode == fetch.EXIT_DOWNLOAD
    assert "HTTP 404" in r.stderr and "archive not found" in r.stderr
    assert len(archives.requests) == 1  # a 404 is not retried


def test_bad_configuration_exits_2(tmp_path: Path, archives: ArchiveServer) -> None:
    r = run_fetch(_env(tmp_path, archives.url("x"), "not-a-hash"))
    assert r.returncode == fetch.EXIT_CONFIG
    assert "TORPOR_ARCHIVE_SHA256" in r.stderr
    env = _env(tmp_path, archives.url("ab" * 32), "ab" * 32)
    del env["TORPOR_ARCHIVE_URL"]
    r = run_fetch(env)
    assert r.returncode == fetch.EXIT_CONFIG and "TORPOR_ARCHIVE_URL is not set" in r.stderr


def test_the_token_authorises_the_download(tmp_path: Path) -> None:
    srv = ArchiveServer(token="archive-token-0123456789").start()
    try:
        sha = srv.add_folder(fn_folder(tmp_path))
        r = run_fetch(_env(tmp_path, srv.url(sha), sha))  # no token: 401, not retried
        assert r.returncode == fetch.EXIT_DOWNLOAD and "HTTP 401" in r.stderr
        proc, body = serve(
            _env(tmp_path, srv.url(sha), sha, TORPOR_ARCHIVE_TOKEN="archive-token-0123456789")
        )
        stop(proc)
        assert body.startswith("200 ")
        assert srv.requests[-1][1] == "Bearer archive-token-0123456789"
    finally:
        srv.stop()


# -- attacks ---------------------------------------------------------------------------------
def _refused(
    tmp: Path, archives: ArchiveServer, data: bytes, **extra: str
) -> subprocess.CompletedProcess[str]:
    sha = archives.add(data)
    r = run_fetch(_env(tmp, archives.url(sha), sha, **extra))
    assert r.returncode == fetch.EXIT_REFUSED, (r.returncode, r.stdout, r.stderr)
    assert not (tmp / "fn").exists(), "nothing of a refused archive is left to run"
    assert not list(tmp.glob("fn.partial-*")) and not list(tmp.glob("fn.archive-*"))
    assert "torpor-runtime" not in r.stdout + r.stderr  # the runtime never started
    return r


def _reg(name: str, data: bytes = b"x = 1\n") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


@pytest.mark.security
def test_tampered_archive_is_refused(
    tmp_path: Path, archives: ArchiveServer, attack: object
) -> None:
    """Serve an archive whose content is not the one its hash names (a tampered store)"""
    good = archives.add_folder(fn_folder(tmp_path))
    evil_src = tmp_path / "evil"
    evil_src.mkdir()
    (evil_src / "handler.py").write_text("def handle(r):\n    return 'evil'\n")
    archives.archives[good] = archives.archives[archives.add_folder(evil_src)]
    r = run_fetch(_env(tmp_path, archives.url(good), good))
    assert r.returncode == fetch.EXIT_MISMATCH
    assert f"sha256 mismatch for {archives.url(good)}: expected {good}" in r.stderr
    assert "refusing to run it" in r.stderr
    assert not (tmp_path / "fn").exists()
    attack.ended(f"exit {r.returncode}: " + r.stderr.strip().splitlines()[-1][:120])  # type: ignore[attr-defined]


@pytest.mark.security
def test_member_with_dotdot_is_refused(
    tmp_path: Path, archives: ArchiveServer, attack: object
) -> None:
    """Fetch an archive whose member is ../../escaped.py"""
    r = _refused(tmp_path, archives, tar_bytes([_reg("handler.py"), _reg("../../escaped.py")]))
    assert "leaves the target folder" in r.stderr
    assert not (tmp_path / "escaped.py").exists() and not (tmp_path.parent / "escaped.py").exists()
    attack.ended(f"exit 8: {r.stderr.strip()[:120]}")  # type: ignore[attr-defined]


@pytest.mark.security
def test_member_with_absolute_name_is_refused(
    tmp_path: Path, archives: ArchiveServer, attack: object
) -> None:
    """Fetch an archive whose member has an absolute name (/tmp/.../abs.py)"""
    target = tmp_path / "abs.py"
    r = _refused(tmp_path, archives, tar_bytes([_reg(str(target))]))
    assert "absolute name" in r.stderr and not target.exists()
    attack.ended(f"exit 8: {r.stderr.strip()[:120]}")  # type: ignore[attr-defined]


@pytest.mark.security
def test_symlink_member_is_refused(tmp_path: Path, archives: ArchiveServer, attack: object) -> None:
    """Fetch an archive with a symlink to a folder outside, then a file written through it"""
    outside = tmp_path / "outside"
    outside.mkdir()
    r = _refused(
        tmp_path,
        archives,
        tar_bytes([_special("link", tarfile.SYMTYPE, str(outside)), _reg("link/planted.py")]),
    )
    assert "is a symlink" in r.stderr and not (outside / "planted.py").exists()
    attack.ended(f"exit 8: {r.stderr.strip()[:120]}")  # type: ignore[attr-defined]


@pytest.mark.security
def test_hardlink_member_is_refused(
    tmp_path: Path, archives: ArchiveServer, attack: object
) -> None:
    """Fetch an archive with a hard link to a file outside the target (/etc/passwd)"""
    r = _refused(
        tmp_path, archives, tar_bytes([_special("passwd", tarfile.LNKTYPE, "/etc/passwd")])
    )
    assert "is a hard link" in r.stderr
    attack.ended(f"exit 8: {r.stderr.strip()[:120]}")  # type: ignore[attr-defined]


@pytest.mark.security
def test_device_member_is_refused(tmp_path: Path, archives: ArchiveServer, attack: object) -> None:
    """Fetch an archive with a character device member (a /dev/mem look-alike)"""
    info, _ = _special("mem", tarfile.CHRTYPE)
    info.devmajor, info.devminor = 1, 1
    r = _refused(tmp_path, archives, tar_bytes([(info, None)]))
    assert "is a device" in r.stderr
    attack.ended(f"exit 8: {r.stderr.strip()[:120]}")  # type: ignore[attr-defined]


@pytest.mark.security
def test_decompression_bomb_is_refused(
    tmp_path: Path, archives: ArchiveServer, attack: object
) -> None:
    """Fetch a small gzip that expands to 64 MiB of zeros, over a 16 MiB size cap"""
    data = tar_bytes([_reg("zeros.bin", bytes(64 * 1024 * 1024))])
    assert len(data) < 1024 * 1024
    r = _refused(tmp_path, archives, data, TORPOR_ARCHIVE_MAX_SIZE="16Mi")
    assert "TORPOR_ARCHIVE_MAX_SIZE" in r.stderr
    attack.ended(f"exit 8: {r.stderr.strip()[:120]}")  # type: ignore[attr-defined]


@pytest.mark.security
def test_long_header_bomb_is_refused(
    tmp_path: Path, archives: ArchiveServer, attack: object
) -> None:
    """Fetch a tar whose pax header (a 32 MiB file name) would be read into memory whole"""
    data = tar_bytes([_reg("a" * (32 * 1024 * 1024))])
    r = _refused(
        tmp_path, archives, data, TORPOR_ARCHIVE_MAX_SIZE="1Mi", TORPOR_ARCHIVE_MAX_MEMBERS="10"
    )
    assert "size cap" in r.stderr
    attack.ended(f"exit 8: {r.stderr.strip()[:120]}")  # type: ignore[attr-defined]


@pytest.mark.security
def test_too_many_members_are_refused(
    tmp_path: Path, archives: ArchiveServer, attack: object
) -> None:
    """Fetch an archive of 2,000 empty files against a cap of 1,000 members (inode exhaustion)"""
    data = tar_bytes([_reg(f"f{i}", b"") for i in range(2000)])
    r = _refused(tmp_path, archives, data, TORPOR_ARCHIVE_MAX_MEMBERS="1000")
    assert "more than 1000 members" in r.stderr
    attack.ended(f"exit 8: {r.stderr.strip()[:120]}")  # type: ignore[attr-defined]


@pytest.mark.security
def test_oversized_download_is_refused(
    tmp_path: Path, archives: ArchiveServer, attack: object
) -> None:
    """Serve an archive of 3 MiB against a 1 MiB download cap"""
    data = tar_bytes([_reg("blob.bin", os.urandom(3 * 1024 * 1024))])
    r = _refused(tmp_path, archives, data, TORPOR_ARCHIVE_MAX_DOWNLOAD="1Mi")
    assert "TORPOR_ARCHIVE_MAX_DOWNLOAD" in r.stderr
    attack.ended(f"exit 8: {r.stderr.strip()[:120]}")  # type: ignore[attr-defined]


@pytest.mark.security
def test_duplicate_member_is_refused(
    tmp_path: Path, archives: ArchiveServer, attack: object
) -> None:
    """Fetch an archive with handler.py twice (a second, different copy after the reviewed one)"""
    r = _refused(
        tmp_path,
        archives,
        tar_bytes([_reg("handler.py", b"ok = 1\n"), _reg("handler.py", b"evil = 1\n")]),
    )
    assert "appears twice" in r.stderr
    attack.ended(f"exit 8: {r.stderr.strip()[:120]}")  # type: ignore[attr-defined]


@pytest.mark.security
def test_the_function_cannot_read_the_download_token(tmp_path: Path, attack: object) -> None:
    """A function reads the archive download token from its own environment"""
    srv = ArchiveServer(token="archive-token-0123456789").start()
    try:
        sha = srv.add_folder(fn_folder(tmp_path))
        proc, body = serve(
            _env(tmp_path, srv.url(sha), sha, TORPOR_ARCHIVE_TOKEN="archive-token-0123456789")
        )
        stop(proc)
    finally:
        srv.stop()
    assert body == "200 fetched <no token>"
    attack.ended(f"the handler's environment has no TORPOR_ARCHIVE_TOKEN ({body})")  # type: ignore[attr-defined]


@pytest.mark.security
def test_a_redirect_does_not_carry_the_token_away(tmp_path: Path, attack: object) -> None:
    """The archive server redirects the download to another host to collect the bearer token"""
    collector = ArchiveServer().start()
    srv = ArchiveServer(token="archive-token-0123456789").start()
    try:
        sha = srv.add_folder(fn_folder(tmp_path))
        srv.redirect_to = collector.url(sha)
        r = run_fetch(
            _env(tmp_path, srv.url(sha), sha, TORPOR_ARCHIVE_TOKEN="archive-token-0123456789")
        )
    finally:
        srv.stop()
        collector.stop()
    assert (
        r.returncode == fetch.EXIT_DOWNLOAD and "redirected" in r.stderr and "refused" in r.stderr
    )
    assert collector.requests == []  # never followed: no token sent elsewhere
    attack.ended(f"exit 6: {r.stderr.strip()[:120]}")  # type: ignore[attr-defined]

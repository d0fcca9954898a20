"""Hostile uploads against a real ``torpor up`` (process driver), and requirements.txt
that would build code from the upload on the host.

The platform runs with small caps given through the environment (TORPOR_MAX_UPLOAD=256Ki,
TORPOR_MAX_UNPACKED=1Mi, TORPOR_MAX_MEMBERS=50, TORPOR_MAX_DEPTH=8). After every attack
the state directory holds exactly what it held before: no file, no temporary directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from archives import M, cve_2025_4517, function, gzip_bomb, sdist
from platform_proc import Torpor

from torpor.drivers.base import BuildError
from torpor.drivers.process import ProcessDriver
from torpor.model import Revision, Spec

CAPS = {
    "TORPOR_MAX_UPLOAD": "256Ki",
    "TORPOR_MAX_UNPACKED": "1Mi",
    "TORPOR_MAX_MEMBERS": "50",
    "TORPOR_MAX_DEPTH": "8",
}


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Torpor]:
    t = Torpor(tmp_path_factory.mktemp("uploads") / "state", env=CAPS).start()
    try:
        yield t
    finally:
        t.stop()


def snapshot(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its size (-1 for a directory)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")
    }


def post(t: Torpor, body: bytes | object, **headers: str) -> httpx.Response:
    return t.api_call(
        "POST",
        "/v1/functions",
        content=body,
        timeout=60,
        headers={"content-type": "application/gzip", **headers},
    )


def attempt(t: Torpor, body: bytes | object, status: int, *fragments: str) -> dict[str, str]:
    """POST ``body``; the answer must be ``status`` with every fragment in its detail,
    no function may appear, and the state directory must not change."""
    before = snapshot(t.state_dir)
    r = post(t, body)
    assert r.status_code == status, r.text
    err = r.json()
    for fragment in fragments:
        assert fragment in err["detail"], err
    after = snapshot(t.state_dir)
    assert after == before, f"the state directory changed: {set(after) ^ set(before)}"
    uploads = t.state_dir / "uploads"
    leftovers = (
        [p.name for p in uploads.iterdir() if p.name.startswith(".upload-")]
        if uploads.exists()
        else []
    )
    assert leftovers == [], f"temporary upload folders left: {leftovers}"
    assert t.api_call("GET", "/v1/functions").json()["functions"] == []
    return dict(err)


def ended(attack, err: dict[str, str], status: int) -> None:
    attack.ended(f"{status} {err['error']}: {err['detail']}")


@pytest.mark.security
def test_cve_2025_4517_chain_writes_nothing_beside_the_upload(up: Torpor, attack) -> None:
    """POST the CVE-2025-4517 symlink chain that escapes tarfile's data filter."""
    (up.state_dir / "uploads").mkdir(exist_ok=True)
    dest = str(up.state_dir / "uploads" / ".upload-xxxxxxxx")  # what the API's mkdtemp makes
    err = attempt(up, cve_2025_4517(dest), 400, "is a symbolic link")
    assert not (up.state_dir / "uploads" / "newfile").exists()
    ended(attack, err, 400)


@pytest.mark.security
def test_a_symlink_inside_the_upload_is_refused(up: Torpor, attack) -> None:
    """POST a tar with a symlink member pointing at a file of the upload."""
    err = attempt(
        up,
        function(M("config.py", kind="symlink", link="handler.py")),
        400,
        "'config.py' is a symbolic link",
    )
    ended(attack, err, 400)


@pytest.mark.security
def test_a_hardlink_is_refused(up: Torpor, attack) -> None:
    """POST a tar with a hard link member."""
    err = attempt(
        up,
        function(M("copy.py", kind="hardlink", link="handler.py")),
        400,
        "'copy.py' is a hard link",
    )
    ended(attack, err, 400)


@pytest.mark.security
def test_dot_dot_and_absolute_names_are_refused(up: Torpor, attack) -> None:
    """POST tars whose members are ../escape.py and /tmp/.../escape.py."""
    target = up.state_dir.parent / "escape.py"
    attempt(up, function(M("../escape.py", data=b"x")), 400, "'../escape.py' has a '..' component")
    err = attempt(up, function(M(str(target), data=b"x")), 400, "has an absolute name")
    assert not target.exists()
    ended(attack, err, 400)


@pytest.mark.security
def test_a_gzip_bomb_is_a_413(up: Torpor, attack) -> None:
    """POST a 9 KiB gzip that expands to 8 MiB (the cap is 1 MiB)."""
    bomb = gzip_bomb(8 << 20)
    assert len(bomb) < 64 << 10
    err = attempt(up, bomb, 413, "'big.bin' (8 MiB)", "cap of 1 MiB unpacked")
    assert err["error"] == "upload too large"
    ended(attack, err, 413)


@pytest.mark.security
def test_too_many_members_is_a_413(up: Torpor, attack) -> None:
    """POST a tar of 60 empty files (the cap is 50 members)."""
    err = attempt(up, function(*(M(f"f{i}") for i in range(60))), 413, "more than 50 members")
    ended(attack, err, 413)


@pytest.mark.security
def test_too_deep_a_path_is_a_413(up: Torpor, attack) -> None:
    """POST a tar whose member name has 12 components (the cap is 8)."""
    err = attempt(
        up,
        function(M("/".join("d" * 11) + "/x.py", data=b"")),
        413,
        "12 levels deep",
        "cap of 8 levels",
    )
    ended(attack, err, 413)


@pytest.mark.security
def test_an_upload_over_the_cap_is_a_413_before_it_is_read(up: Torpor, attack) -> None:
    """POST a 512 KiB upload with its Content-Length (the cap is 256 KiB)."""
    body = function(M("noise.bin", data=os.urandom(512 << 10)))
    err = attempt(up, body, 413, "over the 256 KiB cap on compressed size")
    ended(attack, err, 413)


@pytest.mark.security
def test_a_chunked_upload_is_cut_at_the_cap(up: Torpor, attack) -> None:
    """POST 4 MiB of chunked body with no Content-Length (the cap is 256 KiB)."""

    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield os.urandom(64 << 10)

    err = attempt(up, chunks(), 413, "over the 256 KiB cap on compressed size")
    ended(attack, err, 413)


@pytest.mark.security
def test_requirements_naming_an_archive_of_the_upload_are_refused_at_deploy(
    up: Torpor, tmp_path: Path, attack
) -> None:
    """POST a function whose requirements.txt names p-1.0.tar.gz, an sdist shipped in the upload."""
    marker = tmp_path / "built-on-host"
    body = function(
        M("p-1.0.tar.gz", data=sdist(str(marker))),
        M("requirements.txt", data=b"six\np-1.0.tar.gz\n"),
    )
    err = attempt(up, body, 400, "requirements.txt:2: 'p-1.0.tar.gz'", "a file name")
    assert err["error"] == "invalid requirements" and err["field"] == "requirements.txt:2"
    assert not marker.exists()
    ended(attack, err, 400)


def test_a_clean_upload_still_deploys_and_the_spool_leaves_nothing(up: Torpor) -> None:
    r = post(up, function(M("lib/util.py", data=b"X = 1\n")))
    assert r.status_code == 201, r.text
    uploads = up.state_dir / "uploads"
    assert [p for p in uploads.rglob("*")] == []  # the spool and the checked folder are gone
    # what is kept is the normalised archive in the store, named by its hash
    sha = up.api_call("GET", "/v1/functions/evil").json()["revisions"][0]["source_sha256"]
    blob = (up.state_dir / "blobs" / sha).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == sha
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        assert sorted(m.name for m in tar.getmembers() if m.isfile()) == [
            "handler.py",
            "lib/util.py",
            "torpor.yaml",
        ]
    up.api_call("DELETE", "/v1/functions/evil")
    up.wait_for(
        lambda: up.api_call("GET", "/v1/functions").json()["functions"] == [], 30, "evil deleted"
    )


# -- the process driver: requirements never build anything of the upload ------------------
def revision(src: Path, requirements: str) -> Revision:
    (src / "handler.py").write_text("def handle(request):\n    return 'hi'\n")
    (src / "requirements.txt").write_text(requirements)
    spec = Spec(name="rq", handler="handler:handle")
    return Revision(name="rq-00001", function="rq", number=1, spec=spec, source=str(src))


@pytest.mark.security
async def test_process_driver_never_builds_an_sdist_shipped_in_the_upload(
    tmp_path: Path, attack
) -> None:
    """Deploy (process driver) with requirements.txt naming an sdist of the upload by path."""
    marker = tmp_path / "built-on-host"
    src = tmp_path / "src"
    src.mkdir()
    (src / "p-1.0.tar.gz").write_bytes(sdist(str(marker)))
    driver = ProcessDriver(tmp_path / "state")
    try:
        for line in (
            str(src / "p-1.0.tar.gz"),
            "p-1.0.tar.gz",
            "./p-1.0.tar.gz",
            f"p @ file://{src / 'p-1.0.tar.gz'}",
            "-e .",
        ):
            with pytest.raises(BuildError) as err:
                await driver.prepare(revision(src, f"{line}\n"))
            assert str(err.value).startswith("requirements.txt:1: "), err.value
            assert not marker.exists(), f"{line!r}: the upload's build backend ran on the host"
            assert not (src / ".deps").exists()
    finally:
        await driver.close()
    attack.ended(f"BuildError {str(err.value)[:120]}")


@pytest.mark.security
async def test_process_driver_expands_no_variable_into_build_messages(
    tmp_path: Path, monkeypatch, attack
) -> None:
    """Deploy (process driver) with requirements.txt six==${SECRET} to read the platform's env."""
    monkeypatch.setenv("TORPOR_TEST_SECRET", "s3cr3t-value-of-the-platform")
    src = tmp_path / "src"
    src.mkdir()
    driver = ProcessDriver(tmp_path / "state")
    try:
        with pytest.raises(BuildError) as err:
            await driver.prepare(revision(src, "six==${TORPOR_TEST_SECRET}\n"))
    finally:
        await driver.close()
    assert "s3cr3t" not in str(err.value)
    assert "requirements.txt:1:" in str(err.value) and "not expanded" in str(err.value)
    attack.ended(f"BuildError {str(err.value)[:120]}")


async def test_process_driver_installs_wheels_whatever_pip_settings_the_host_has(
    tmp_path: Path, monkeypatch
) -> None:
    # pip settings of the platform's environment are not read (--isolated): a dead index here
    # would fail the install if they were.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_BINARY", ":all:")
    src = tmp_path / "src"
    src.mkdir()
    driver = ProcessDriver(tmp_path / "state")
    lines: list[str] = []
    try:
        rev = await asyncio.wait_for(driver.prepare(revision(src, "six\n"), lines.append), 300)
    finally:
        await driver.close()
    assert rev.source
    assert (Path(rev.source) / ".deps" / "six.py").is_file()
    assert lines == ["installing requirements.txt (wheels only)"]

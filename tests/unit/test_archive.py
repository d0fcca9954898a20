"""torpor.archive: the upload extractor. Every hostile archive is refused with 400/413 and
a reason naming the member or the limit, and nothing is written outside ``dest``."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
from archives import HANDLER, SPEC, M, cve_2025_4517, function, gzip_bomb, tar

from torpor.archive import ArchiveError, ArchiveLimits, Extracted, clean_name, extract, human_size

SMALL = ArchiveLimits(max_upload=1 << 20, max_unpacked=1 << 20, max_members=50, max_depth=8)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def refused(tmp_path: Path, data: bytes, limits: ArchiveLimits = SMALL) -> ArchiveError:
    """Extract ``data`` into tmp_path/out; it must be refused, and nothing may appear
    beside ``out`` (the directory the caller then removes)."""
    before = tree(tmp_path)
    with pytest.raises(ArchiveError) as err:
        extract(io.BytesIO(data), tmp_path / "out", limits)
    outside = {p for p in tree(tmp_path) - before if not p.startswith("out")}
    assert outside == set(), f"written outside the destination: {outside}"
    for p in (tmp_path / "out").rglob("*"):
        assert not p.is_symlink()
    return err.value


# -- what is accepted -----------------------------------------------------------------------
def test_a_function_folder_round_trips_with_safe_modes(tmp_path: Path) -> None:
    data = tar(
        [
            M("torpor.yaml", data=SPEC),
            M("handler.py", data=HANDLER, mode=0o6777),
            M("./lib//", kind="dir", mode=0o777),
            M("lib/util.py", data=b"x = 1\n", mode=0o600),
            M("lib/deep/er/mod.py", data=b""),
            M("bin/run", data=b"#!/bin/sh\n", mode=0o700),
        ]
    )
    got = extract(io.BytesIO(data), tmp_path / "out", ArchiveLimits())
    out = tmp_path / "out"
    assert got == Extracted(files=5, dirs=4, bytes=len(SPEC) + len(HANDLER) + 6 + 10)
    assert (out / "handler.py").read_bytes() == HANDLER
    assert (out / "lib" / "util.py").read_text() == "x = 1\n"
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert modes["handler.py"] == 0o755  # executable kept; setuid, setgid, sticky and o+w gone
    assert modes["lib"] == 0o755 and modes["lib/deep"] == 0o755
    assert modes["lib/util.py"] == 0o644 and modes["torpor.yaml"] == 0o644
    assert modes["bin/run"] == 0o755
    assert not any(
        m & (stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH | stat.S_IWGRP) for m in modes.values()
    )


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("gz", [True, False])
def test_long_and_unicode_names_in_every_tar_format(tmp_path: Path, fmt: int, gz: bool) -> None:
    long = "/".join(["p" * 40] * 3) + "/module.py"  # 130 bytes: ustar prefix, pax path or GNU 'L'
    members = [M(long, data=b"ok")]
    if fmt != tarfile.USTAR_FORMAT:
        members.append(M("données/é.txt", data="é".encode()))
    extract(io.BytesIO(tar(members, gz=gz, fmt=fmt)), tmp_path / "out")
    assert (tmp_path / "out" / long).read_bytes() == b"ok"
    if fmt != tarfile.USTAR_FORMAT:
        assert (tmp_path / "out" / "données" / "é.txt").read_text() == "é"


def test_bzip2_and_xz_and_a_path_source(tmp_path: Path) -> None:
    for mode in ("w:bz2", "w:xz"):
        path = tmp_path / f"a.{mode[2:]}"
        with tarfile.open(path, mode) as t:
            info = tarfile.TarInfo("torpor.yaml")
            info.size = len(SPEC)
            t.addfile(info, io.BytesIO(SPEC))
        out = tmp_path / f"out-{mode[2:]}"
        assert extract(path, out).files == 1
        assert (out / "torpor.yaml").read_bytes() == SPEC


def test_the_root_entry_and_repeated_directories_are_fine(tmp_path: Path) -> None:
    data = tar(
        [M(".", kind="dir"), M("./a", kind="dir"), M("a/", kind="dir"), M("./a/f", data=b"1")]
    )
    assert extract(io.BytesIO(data), tmp_path / "out").files == 1
    assert (tmp_path / "out" / "a" / "f").read_text() == "1"


def test_dest_must_be_empty(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        extract(io.BytesIO(function()), tmp_path / "out")


def test_names_are_normalised_and_checked() -> None:
    assert clean_name("./a//b/./c/", SMALL) == ("a", "b", "c")
    assert clean_name(".", SMALL) == ()
    for bad in ("../x", "a/../../x", "/etc/passwd", "a\\..\\b", "a\x00b", "a\nb", "x/" + "n" * 256):
        with pytest.raises(ArchiveError) as err:
            clean_name(bad, SMALL)
        assert err.value.status == 400


def test_human_size() -> None:
    assert human_size(256 << 20) == "256 MiB"
    assert human_size(3 << 29) == "1.5 GiB"
    assert human_size(100) == "100 bytes"


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_members"):
        ArchiveLimits(max_members=0)


# -- attacks --------------------------------------------------------------------------------
@pytest.mark.security
def test_cve_2025_4517_link_chain_is_refused(tmp_path: Path, attack) -> None:
    """Upload the CVE-2025-4517 symlink chain that makes tarfile's data filter write outside."""
    err = refused(tmp_path, cve_2025_4517(str(tmp_path / "out")), ArchiveLimits())
    assert err.status == 400 and "symbolic link" in err.reason
    assert not (tmp_path / "newfile").exists()
    attack.ended(f"{err.status} {err.reason}")


@pytest.mark.security
@pytest.mark.parametrize("link", ["handler.py", "/etc/passwd", "../../../etc/passwd"])
def test_a_symlink_is_refused(tmp_path: Path, attack, link: str) -> None:
    """Upload a tar with a symlink member (in-tree, absolute, or climbing out)."""
    err = refused(tmp_path, function(M("leak.txt", kind="symlink", link=link)))
    assert err.status == 400 and "'leak.txt' is a symbolic link" in err.reason
    assert err.member == "leak.txt"
    attack.ended(f"{err.status} {err.reason}")


@pytest.mark.security
@pytest.mark.parametrize("link", ["handler.py", "/etc/passwd", "../../x"])
def test_a_hardlink_is_refused(tmp_path: Path, attack, link: str) -> None:
    """Upload a tar with a hard link member (to a file in or beyond the upload)."""
    err = refused(tmp_path, function(M("copy.py", kind="hardlink", link=link)))
    assert err.status == 400 and "'copy.py' is a hard link" in err.reason
    attack.ended(f"{err.status} {err.reason}")


@pytest.mark.security
@pytest.mark.parametrize(
    "kind,what", [("chr", "character device"), ("blk", "block device"), ("fifo", "FIFO")]
)
def test_devices_and_fifos_are_refused(tmp_path: Path, attack, kind: str, what: str) -> None:
    """Upload a tar with a device or FIFO member."""
    err = refused(tmp_path, function(M("dev", kind=kind)))
    assert err.status == 400 and f"'dev' is a {what}" in err.reason
    attack.ended(f"{err.status} {err.reason}")


@pytest.mark.security
@pytest.mark.parametrize("name", ["../evil.py", "lib/../../evil.py", "./../evil.py"])
def test_dot_dot_names_are_refused(tmp_path: Path, attack, name: str) -> None:
    """Upload a tar whose member is ../evil.py."""
    err = refused(tmp_path, function(M(name, data=b"x")))
    assert err.status == 400 and "'..' component" in err.reason and name in err.reason
    assert not (tmp_path / "evil.py").exists()
    attack.ended(f"{err.status} {err.reason}")


@pytest.mark.security
def test_absolute_names_are_refused(tmp_path: Path, attack) -> None:
    """Upload a tar whose member has an absolute name (/tmp/.../evil)."""
    target = tmp_path / "evil"
    err = refused(tmp_path, function(M(str(target), data=b"x")))
    assert err.status == 400 and "absolute name" in err.reason
    assert not target.exists()
    attack.ended(f"{err.status} {err.reason}")


@pytest.mark.security
@pytest.mark.parametrize(
    "members,why",
    [
        ([M("a", kind="dir"), M("a", data=b"x")], "would replace a directory"),
        ([M("a", data=b"x"), M("a", kind="dir")], "would replace a file"),
        ([M("a", data=b"x"), M("a", data=b"y")], "appears twice"),
        ([M("a", data=b"x"), M("a/b", data=b"y")], "which is a file"),
    ],
    ids=["file-over-dir", "dir-over-file", "file-twice", "file-under-file"],
)
def test_members_that_overwrite_each_other_are_refused(
    tmp_path: Path, attack, members: list[M], why: str
) -> None:
    """Upload a tar whose members overwrite each other (a file over a directory...)."""
    err = refused(tmp_path, function(*members))
    assert err.status == 400 and why in err.reason
    attack.ended(f"{err.status} {err.reason}")


@pytest.mark.security
def test_a_gzip_bomb_is_stopped_before_it_expands(tmp_path: Path, attack) -> None:
    """Upload a 64 KiB gzip that expands to 64 MiB (the cap is 1 MiB)."""
    bomb = gzip_bomb(64 << 20)
    assert len(bomb) < 128 << 10
    err = refused(tmp_path, bomb)
    assert (
        err.status == 413
        and "'big.bin' (64 MiB)" in err.reason
        and "cap of 1 MiB unpacked" in err.reason
    )
    assert not (tmp_path / "out" / "big.bin").exists()  # refused from its header, nothing written
    attack.ended(f"{err.status} {err.reason}")


@pytest.mark.security
def test_many_small_members_are_counted_as_they_expand(tmp_path: Path, attack) -> None:
    """Upload a tar of 20 files of 100 KiB each (2 MiB) against a 1 MiB cap."""
    chunk = bytes(100 << 10)
    err = refused(tmp_path, function(*(M(f"f{i:02}", data=chunk) for i in range(20))))
    assert err.status == 413 and "'f10'" in err.reason  # the 11th file is the one past 1 MiB
    written = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written <= SMALL.max_unpacked
    attack.ended(f"{err.status} {err.reason}")


@pytest.mark.security
def test_too_many_members_are_refused(tmp_path: Path, attack) -> None:
    """Upload a tar of 60 empty files (the cap is 50 members)."""
    err = refused(tmp_path, function(*(M(f"f{i}") for i in range(60))))
    assert err.status == 413 and "more than 50 members" in err.reason
    assert len(list((tmp_path / "out").iterdir())) <= 50
    attack.ended(f"{err.status} {err.reason}")


@pytest.mark.security
def test_too_deep_a_path_is_refused(tmp_path: Path, attack) -> None:
    """Upload a tar whose member name has 10 components (the cap is 8)."""
    err = refused(tmp_path, function(M("/".join("d" * 9) + "/f.py", data=b"")))
    assert err.status == 413 and "10 levels deep" in err.reason and "cap of 8" in err.reason
    attack.ended(f"{err.status} {err.reason}")


@pytest.mark.security
def test_the_compressed_size_is_capped_while_reading(tmp_path: Path, attack) -> None:
    """Hand the extractor a 2 MiB archive with a 1 MiB cap on compressed bytes."""
    noise = os.urandom(2 << 20)  # incompressible
    err = refused(
        tmp_path,
        function(M("noise.bin", data=noise)),
        ArchiveLimits(max_upload=1 << 20, max_unpacked=8 << 20),
    )
    assert err.status == 413 and "cap on compressed size" in err.reason
    attack.ended(f"{err.status} {err.reason}")


@pytest.mark.security
def test_a_huge_pax_header_is_refused_before_it_is_read(tmp_path: Path, attack) -> None:
    """Upload a tar whose pax header claims 1 GiB (tarfile would read it into memory)."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = 1 << 30
    data = info.tobuf(tarfile.USTAR_FORMAT) + b"9 path=x\n"
    err = refused(tmp_path, data, ArchiveLimits())
    assert err.status == 400 and "extension header of 1 GiB" in err.reason
    attack.ended(f"{err.status} {err.reason}")


@pytest.mark.security
@pytest.mark.parametrize(
    "data,why",
    [
        (b"this is not a tar archive at all" * 40, "not a tar archive"),
        (b"\x1f\x8b\x08\x00garbage-after-the-gzip-magic" * 10, "not a valid gzip stream"),
        (function(gz=False)[:700], "truncated"),
        (function()[:-12], "not a valid gzip stream"),
    ],
    ids=["not-tar", "bad-gzip", "truncated-tar", "truncated-gzip"],
)
def test_malformed_uploads_are_a_400(tmp_path: Path, attack, data: bytes, why: str) -> None:
    """Upload bytes that are not a (complete) tar.gz."""
    err = refused(tmp_path, data, ArchiveLimits())
    assert err.status == 400 and why in err.reason
    attack.ended(f"{err.status} {err.reason}")

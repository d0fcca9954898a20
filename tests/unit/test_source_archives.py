"""Content-addressed sources (torpor.sources): the normalised pack, the hash checked before
anything is unpacked, the controller's cache, archive tokens, and the archive GC rule."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest

from torpor.archive import ArchiveLimits
from torpor.controller.blobs import referenced, sweep
from torpor.model import Function, Revision, Spec
from torpor.sources import (
    SourceCache,
    SourceError,
    archive_token,
    check_sha,
    pack,
    token_matches,
    unpack,
)
from torpor.store.embedded import EmbeddedStore


def _folder(root: Path, umask: int = 0o022) -> Path:
    old = os.umask(umask)
    try:
        root.mkdir()
        (root / "handler.py").write_text("def handle(request):\n    return 'hi'\n")
        (root / "torpor.yaml").write_text("name: hello\n")
        (root / "lib").mkdir()
        (root / "lib" / "util.py").write_text("X = 1\n")
        (root / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(root / "run.sh", 0o700)
        (root / ("d" * 120)).mkdir()  # a long name: pax header
        (root / ("d" * 120) / "f.txt").write_bytes(b"\x00\xff" * 1000)
    finally:
        os.umask(old)
    return root


def _tree(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = (
            ("d", stat.S_IMODE(p.stat().st_mode))
            if p.is_dir()
            else (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
        )
    return out


def test_the_pack_is_deterministic_and_normalised(tmp_path: Path) -> None:
    a = _folder(tmp_path / "a")
    b = _folder(tmp_path / "b", umask=0o077)  # other modes on disk, other mtimes
    os.utime(b / "handler.py", (1, 1))
    os.chmod(b / "run.sh", 0o751)
    pa, pb = pack(a), pack(b)
    assert pa.sha256 == pb.sha256 == hashlib.sha256(pa.data).hexdigest()
    assert pa.data == pb.data
    assert pack(a).data == pa.data  # and again
    raw = gzip.decompress(pa.data)
    assert pa.data[4:8] == b"\0\0\0\0"  # gzip mtime 0
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names, key=lambda n: n.split("/"))
    assert names.index("lib") < names.index("lib/util.py")
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
        assert m.isdir() or m.isfile()
        assert m.mode == (0o755 if m.isdir() or m.name == "run.sh" else 0o644), m.name
    (b / "handler.py").write_text("def handle(request):\n    return 'changed'\n")
    assert pack(b).sha256 != pa.sha256


def test_pack_then_unpack_gives_the_folder_back(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src")
    p = pack(src)
    unpack(p.data, p.sha256, tmp_path / "out")
    got, want = _tree(tmp_path / "out"), _tree(src)
    assert set(got) == set(want)
    for name, (content, mode) in got.items():
        if content != "d":
            assert content == want[name][0]
            assert mode == (0o755 if name == "run.sh" else 0o644)


def test_pack_refuses_a_link(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src")
    (src / "link").symlink_to("/etc/passwd")
    with pytest.raises(SourceError, match="neither a regular file nor a folder"):
        pack(src)


@pytest.mark.security
def test_a_blob_that_does_not_match_its_hash_is_never_unpacked(tmp_path: Path, attack: Any) -> None:
    """Swap a function's source archive in the store for other code"""
    good = pack(_folder(tmp_path / "src"))
    evil_dir = _folder(tmp_path / "evil")
    (evil_dir / "handler.py").write_text("import os\ndef handle(request):\n    return os.environ\n")
    evil = pack(evil_dir)
    dest = tmp_path / "out"
    with pytest.raises(SourceError, match="does not match its hash"):
        unpack(evil.data, good.sha256, dest)
    assert not dest.exists()  # checked before a single byte was written
    with pytest.raises(ValueError, match="sha256"):
        unpack(good.data, "../" + good.sha256[3:], dest)
    attack.ended("SourceError: the archive does not match its hash; nothing unpacked")


@pytest.mark.security
def test_a_hostile_archive_with_a_matching_hash_is_still_refused(
    tmp_path: Path, attack: Any
) -> None:
    """Plant a symlink archive in the store under its own (correct) hash"""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        link = tarfile.TarInfo("handler.py")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tar.addfile(link)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(SourceError, match="symbolic link"):
        unpack(data, sha, tmp_path / "out")
    cache = SourceCache(tmp_path / "cache")
    with pytest.raises(SourceError):
        cache.install(sha, data)
    assert not cache.has(sha) and cache.shas() == []
    attack.ended("SourceError from the hardened extractor: a symbolic link is refused")


def test_unpack_applies_the_caps(tmp_path: Path) -> None:
    p = pack(_folder(tmp_path / "src"))
    with pytest.raises(SourceError, match="more than 3 members"):
        unpack(p.data, p.sha256, tmp_path / "a", ArchiveLimits(max_members=3))
    with pytest.raises(SourceError, match="unpacked"):
        unpack(p.data, p.sha256, tmp_path / "b", ArchiveLimits(max_unpacked=100))
    # the compressed cap never refuses the blob itself (its hash is checked, it is in memory)
    unpack(p.data, p.sha256, tmp_path / "c", ArchiveLimits(max_upload=10))


def test_the_cache_installs_atomically_and_once(tmp_path: Path) -> None:
    p = pack(_folder(tmp_path / "src"))
    cache = SourceCache(tmp_path / "cache")
    path = cache.install(p.sha256, p.data)
    assert path == tmp_path / "cache" / p.sha256 and (path / "handler.py").is_file()
    assert cache.install(p.sha256, b"not even read") == path  # already there
    assert cache.shas() == [p.sha256]
    with pytest.raises(SourceError):
        cache.install("0" * 64, p.data)
    assert sorted(x.name for x in (tmp_path / "cache").iterdir()) == [p.sha256]  # no temp left
    (tmp_path / "cache" / ".abandoned-x").mkdir()
    cache.clean_temps()
    cache.remove(p.sha256)
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.security
def test_archive_tokens_are_per_archive_and_per_key(attack: Any) -> None:
    """Use one archive's download token for another archive"""
    key, other_key = b"k" * 32, b"j" * 32
    a, b = "a" * 64, "b" * 64
    tok = archive_token(key, a)
    assert tok.startswith("tpa1.") and tok == archive_token(key, a)
    assert token_matches(key, a, tok)
    assert not token_matches(key, b, tok)
    assert not token_matches(other_key, a, tok)
    assert (
        not token_matches(key, a, tok[:-1])
        and not token_matches(key, a, "")
        and not token_matches(key, a, "é")
    )
    for bad in ("", "A" * 64, "a" * 63, "../" + "a" * 61, None, 5):
        with pytest.raises(ValueError):
            check_sha(bad)
    attack.ended("refused: the token is an HMAC of that one hash under the installation's key")


def _rev(fn: str, n: int, sha: str | None) -> Revision:
    return Revision(
        name=f"{fn}-{n:05d}", function=fn, number=n, spec=Spec(name=fn), source_sha256=sha
    )


async def test_the_sweep_removes_unreferenced_archives_after_the_grace() -> None:
    store = EmbeddedStore(None)
    blobs = {}
    for text in (b"kept", b"orphan-old", b"orphan-new", b"gone-with-its-revision"):
        sha = hashlib.sha256(text).hexdigest()
        await store.put_blob(sha, text)
        blobs[text] = sha
    await store.update_function(
        "hello",
        lambda cur: Function(
            name="hello", revisions=[_rev("hello", 1, blobs[b"kept"]), _rev("hello", 2, None)]
        ),
    )
    assert referenced(await store.list_functions()) == {blobs[b"kept"]}
    times = await store.list_blobs()
    # at the time of the puts: everything is within the grace, nothing goes
    nothing = await sweep(store, grace=60, now=max(times.values()))
    unnamed = [t for sha, t in times.items() if sha != blobs[b"kept"]]
    assert nothing.gone == [] and nothing.due == min(unnamed) + 60  # when to look again
    store._blobs[blobs[b"orphan-new"]] = (b"orphan-new", max(times.values()) + 100)  # put later
    gone = (await sweep(store, grace=60, now=max(times.values()) + 120)).gone
    assert sorted(gone) == sorted([blobs[b"orphan-old"], blobs[b"gone-with-its-revision"]])
    assert sorted(await store.list_blobs()) == sorted([blobs[b"kept"], blobs[b"orphan-new"]])
    await store.delete_function("hello")
    assert sorted((await sweep(store, grace=60, now=max(times.values()) + 1000)).gone) == sorted(
        [blobs[b"kept"], blobs[b"orphan-new"]]
    )
    assert await store.list_blobs() == {}
    await store.close()

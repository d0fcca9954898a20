"""Content-addressed function sources: a function folder as one archive named by its sha256.

The API unpacks and checks a deploy's upload, then ``pack``s the folder it extracted into
a *normalised* archive and puts it in the store under its hash (``Revision.source_sha256``).
Any component on any host then fetches it by that hash: the controller into its own cache
(``SourceCache``), a Pod on a cluster through ``GET /v1/archives/SHA``. Nothing depends on a
disk shared between the API and a controller.

The pack is deterministic: members sorted by name, directories before what they hold,
every mtime 0, uid/gid 0 with empty owner names, modes 0755 (directories and executable
files) or 0644, pax format (long names), gzip with mtime 0 and no file name. The same
folder gives the same bytes, so the same hash.

``unpack`` checks the hash *before* it unpacks anything, then extracts with the hardened
extractor of :mod:`torpor.archive` and its caps.

Archive tokens: ``archive_token(key, sha)`` is an HMAC-SHA256 of the hash under the
installation's archive key (kept in the store, created once). It lets one holder (a Pod)
download one archive and nothing else, and needs no secret beyond what the API and the
controller already share.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import hmac
import io
import os
import re
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from torpor.archive import ArchiveError, ArchiveLimits, extract

SHA256 = re.compile(r"[0-9a-f]{64}")
TOKEN_PREFIX = "tpa1."  # marks an archive token (never confused with the API's admin token)


class SourceError(Exception):
    """An archive could not be fetched, did not match its hash, or was refused."""


def check_sha(sha: object) -> str:
    """``sha`` if it is 64 lowercase hex digits, else ValueError (never a path, never a glob)."""
    if not isinstance(sha, str) or not SHA256.fullmatch(sha):
        shown = sha[:80] if isinstance(sha, str) else type(sha).__name__
        raise ValueError(f"not a sha256 (64 lowercase hex digits): {shown!r}")
    return sha


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Packed:
    data: bytes
    sha256: str


def _members(folder: Path) -> list[tuple[str, Path, bool]]:
    """(name, path, is_dir) of every regular file and directory below ``folder``, sorted by
    name. Anything else (a link, a FIFO) is an error: the extractor never writes one."""
    out: list[tuple[str, Path, bool]] = []

    def walk(d: Path, prefix: str) -> None:
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            name = f"{prefix}{e.name}"
            st = e.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                out.append((name, Path(e.path), True))
                walk(Path(e.path), name + "/")
            elif stat.S_ISREG(st.st_mode):
                out.append((name, Path(e.path), False))
            else:
                raise SourceError(f"{name!r} is neither a regular file nor a folder")

    walk(folder, "")
    return out


def pack(folder: Path) -> Packed:
    """The normalised archive of ``folder`` (see the module docstring). Blocking."""
    out = io.BytesIO()
    # tar straight into gzip: the uncompressed tar is never held in memory whole
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name, path, is_dir in _members(folder):
            info = tarfile.TarInfo(name)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if is_dir:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
                continue
            st = path.stat()
            info.type = tarfile.REGTYPE
            info.mode = 0o755 if st.st_mode & 0o111 else 0o644
            info.size = st.st_size
            with path.open("rb") as f:
                tar.addfile(info, f)
    data = out.getvalue()
    return Packed(data=data, sha256=sha256_of(data))


def unpack(blob: bytes, expected_sha: str, dest: Path, limits: ArchiveLimits | None = None) -> None:
    """Check that ``blob`` hashes to ``expected_sha``, then extract it into ``dest`` (created;
    must not exist or be empty) with :func:`torpor.archive.extract` and ``limits``.

    The compressed-size cap is the blob's own size (it is in memory and its hash is
    checked); the caps on unpacked bytes, members and depth apply as given. Raises
    SourceError. Blocking."""
    check_sha(expected_sha)
    actual = sha256_of(blob)
    if not hmac.compare_digest(actual, expected_sha):
        raise SourceError(
            f"archive {expected_sha[:12]} does not match its hash (got {actual[:12]}): refused"
        )
    limits = limits or ArchiveLimits()
    limits = replace(limits, max_upload=max(limits.max_upload, len(blob), 1))
    try:
        extract(io.BytesIO(blob), dest, limits)
    except ArchiveError as e:
        raise SourceError(f"archive {expected_sha[:12]} refused: {e.reason}") from e


def archive_token(key: bytes, sha: str) -> str:
    """The read-only download token of archive ``sha``: ``tpa1.`` + hex HMAC-SHA256(key, sha)."""
    check_sha(sha)
    return TOKEN_PREFIX + hmac.new(key, sha.encode("ascii"), hashlib.sha256).hexdigest()


def token_matches(key: bytes, sha: str, token: str) -> bool:
    """Constant-time check of ``token`` against archive ``sha``'s token."""
    return hmac.compare_digest(archive_token(key, sha).encode(), token.encode("utf-8", "replace"))


class SourceCache:
    """A component's own copies of unpacked archives: ``root/SHA`` (one per hash).

    ``ensure(sha, fetch)`` returns the folder, fetching the blob (``fetch(sha)``) and
    unpacking it into a private temp folder first, renamed into place only once the hash
    matched and the extraction passed; a half-done copy is never seen under ``root/SHA``.
    Blocking; the controller runs it in a thread per hash (serialised per hash by its
    caller).
    """

    def __init__(self, root: Path, limits: ArchiveLimits | None = None) -> None:
        self.root = root
        self.limits = limits or ArchiveLimits()

    def path(self, sha: str) -> Path:
        return self.root / check_sha(sha)

    def has(self, sha: str) -> bool:
        return self.path(sha).is_dir()

    def install(self, sha: str, blob: bytes) -> Path:
        """Unpack ``blob`` (checked against ``sha``) as ``root/SHA``; returns the folder."""
        dest = self.path(sha)
        if dest.is_dir():
            return dest
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}-", dir=self.root))
        try:
            unpack(blob, sha, tmp / "fn", self.limits)
            os.chmod(tmp / "fn", 0o755)
            try:
                os.rename(tmp / "fn", dest)
            except OSError:
                if not dest.is_dir():  # not "someone else put it there first"
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def remove(self, sha: str) -> None:
        with contextlib.suppress(ValueError):
            shutil.rmtree(self.path(sha), ignore_errors=True)

    def shas(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if SHA256.fullmatch(p.name))

    def clean_temps(self) -> None:
        """Remove temp folders an interrupted ``install`` left."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith("."):
                    shutil.rmtree(p, ignore_errors=True)

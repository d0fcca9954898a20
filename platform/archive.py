"""Unpack an uploaded function folder: a tar archive, plain or gzip/bzip2/xz-compressed.

``extract(source, dest, limits)`` reads the archive as a stream (one pass, nothing
seeked, at most one 64 KiB chunk or one bounded extension header in memory) and
writes it under ``dest`` itself; it does not use :mod:`tarfile`, so none of
tarfile's extraction filters or link handling (CVE-2025-4517) is involved.

What is accepted:

- regular files and directories only: symbolic and hard links, devices, FIFOs,
  sparse files and every other member type are refused;
- names that are relative, UTF-8, free of NUL and control characters and
  backslashes, and stay inside ``dest`` after normalisation (``./a//b`` is ``a/b``;
  any ``..`` component or a leading ``/`` is refused);
- no member may replace another: a second file of the same name, a directory over
  a file, a file over a directory or a file under a file are refused (repeated
  directory entries are fine);
- files are written ``0644`` (``0755`` if the archive marks them executable) and
  directories ``0755``: no setuid/setgid/sticky bit, nothing group- or
  world-writable, owned by whoever runs the extraction.

Limits (``ArchiveLimits``) are checked while reading, so a bomb stops as it expands:
compressed bytes read from ``source``; unpacked bytes (file data plus extension
headers), checked against each member's declared size *before* its data is
written; member count; path depth.

Errors are ``ArchiveError(status, reason)``: 400 for a malformed archive or a bad
member, 413 for a limit, the reason naming the member and the limit. On an error
``dest`` may hold part of the archive: the caller extracts into a directory of its
own and removes it (the API does). This module imports nothing of the API, so the
cluster mode can unpack content-addressed archives fetched from the store with it.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import IO, BinaryIO

KiB, MiB, GiB = 1024, 1024**2, 1024**3
BLOCK = 512
CHUNK = 64 * KiB
MAX_EXTENSION_HEADER = 64 * KiB  # one pax or GNU long-name header's payload
MAX_EXTENSIONS_PER_MEMBER = 4  # pax/GNU headers in a row before a real member
NAME_MAX = 255  # bytes per path component (Linux)
PATH_MAX = 4095  # bytes per name

_FILE_TYPES = {b"0", b"\0", b"7"}  # regular file (and "contiguous", read as regular)
_DIR_TYPE = b"5"
_PAX_TYPES = {b"x", b"X"}  # per-member pax header (X: Solaris)
_PAX_GLOBAL = b"g"
_GNU_LONGNAME, _GNU_LONGLINK = b"L", b"K"
_REFUSED_TYPES = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"6": "a FIFO",
    b"S": "a sparse file",
    b"D": "a GNU directory dump",
    b"M": "a multi-volume continuation",
    b"V": "a volume label",
}

# Names left out of every function folder that is packed or copied: the CLI's upload
# (``torpor deploy``, ``deploy FILE``) and the Docker build context. Tool caches and local
# environments never belong in a function, and shipping them would only waste bytes.
SKIP_NAMES: frozenset[str] = frozenset(
    {
        ".git",
        "__pycache__",
        ".deps",
        ".venv",
        "venv",
        "node_modules",
        ".mypy_cache",
        ".pytest_cache",
    }
)


def skipped(name: str) -> bool:
    """True if a file or folder called ``name`` is left out when a function folder is
    packed or copied: a name in ``SKIP_NAMES`` or compiled bytecode (``*.pyc``)."""
    return name in SKIP_NAMES or name.endswith(".pyc")


def skipped_path(rel: PurePath) -> bool:
    """True if any component of the relative path ``rel`` is :func:`skipped` (a file
    inside ``node_modules/`` is left out with its folder)."""
    return any(skipped(part) for part in rel.parts)


def ignore_skipped(_directory: str, names: list[str]) -> list[str]:
    """The :func:`skipped` ones of ``names``: an ``ignore`` for :func:`shutil.copytree`."""
    return [n for n in names if skipped(n)]


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps for one archive. Sized for source folders (dependencies come from
    requirements.txt, not the upload): real ones are a few MiB at most, so each
    default leaves a wide margin while keeping a worst case well under 1 GiB of disk.

    - ``max_upload``: compressed bytes (the request body), default 64 MiB;
    - ``max_unpacked``: bytes once unpacked, default 256 MiB (4x the upload cap:
      source compresses about 3-5x; a higher ratio is the mark of a bomb);
    - ``max_members``: files and directories, default 10,000 (a large Django
      project with its static files has a few thousand);
    - ``max_depth``: path components of a name, default 32 (real trees stay under
      about 15; this keeps names far from PATH_MAX).
    """

    max_upload: int = 64 * MiB
    max_unpacked: int = 256 * MiB
    max_members: int = 10_000
    max_depth: int = 32

    def __post_init__(self) -> None:
        for name in ("max_upload", "max_unpacked", "max_members", "max_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")


class ArchiveError(Exception):
    """The archive is refused: ``status`` 400 (malformed, bad member) or 413 (over a
    limit); ``reason`` names the member and the limit."""

    def __init__(self, status: int, reason: str, member: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.member = member


@dataclass(frozen=True)
class Extracted:
    """What ``extract`` wrote: regular files, directories (explicit or implied) and
    bytes of file data."""

    files: int
    dirs: int
    bytes: int


def human_size(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``; whole units without a decimal (``"256 MiB"``)."""
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= factor:
            value = n / factor
            return f"{value:.0f} {unit}" if n % factor == 0 else f"{value:.1f} {unit}"
    return f"{n} bytes"


def _show(name: str) -> str:
    """A member name for a message: quoted, control characters escaped, truncated."""
    text = name if len(name) <= 120 else name[:117] + "..."
    return repr(text)


class _Counting:
    """Reads from ``raw``; 413 once more than ``cap`` bytes come out of it."""

    def __init__(self, raw: IO[bytes], cap: int) -> None:
        self.raw, self.cap, self.count = raw, cap, 0
        self.head = b""

    def read(self, size: int = -1) -> bytes:
        if self.head:
            out, self.head = (
                (self.head, b"")
                if size < 0 or size >= len(self.head)
                else (self.head[:size], self.head[size:])
            )
            return out
        data = self.raw.read(size if size >= 0 else CHUNK)
        self.count += len(data)
        if self.count > self.cap:
            raise ArchiveError(
                413, f"the upload is over the {human_size(self.cap)} cap on compressed size"
            )
        return data

    def peek(self, n: int) -> bytes:
        while len(self.head) < n:
            data = self.raw.read(n - len(self.head))
            if not data:
                break
            self.count += len(data)
            self.head += data
        return self.head[:n]


_DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


class _Reader:
    """The decompressed tar stream, read exactly; decompression errors become 400."""

    def __init__(self, source: _Counting) -> None:
        magic = source.peek(6)
        stream: IO[bytes] | _Counting
        if magic[:2] == b"\x1f\x8b":
            self.kind = "gzip"
            stream = gzip.GzipFile(fileobj=source, mode="rb")  # type: ignore[call-overload]
        elif magic[:3] == b"BZh":
            self.kind = "bzip2"
            stream = bz2.BZ2File(source, mode="rb")  # type: ignore[call-overload]
        elif magic == b"\xfd7zXZ\x00":
            self.kind = "xz"
            stream = lzma.LZMAFile(source, mode="rb")  # type: ignore[arg-type]
        else:
            self.kind = "tar"
            stream = source
        self.stream = stream
        self.offset = 0  # bytes of tar stream consumed

    def read(self, n: int, member: str | None) -> bytes:
        """Exactly ``n`` bytes, or 400 naming where the archive ended."""
        parts: list[bytes] = []
        got = 0
        while got < n:
            try:
                data = self.stream.read(min(n - got, CHUNK))
            except ArchiveError:
                raise
            except _DECOMPRESS_ERRORS as e:
                raise ArchiveError(
                    400, f"the upload is not a valid {self.kind} stream: {e}"
                ) from None
            if not data:
                where = f" in member {_show(member)}" if member else ""
                raise ArchiveError(
                    400, f"the archive is truncated{where} (at byte {self.offset + got})", member
                )
            parts.append(data)
            got += len(data)
        self.offset += n
        return b"".join(parts)

    def read_some(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" at the end of the stream."""
        try:
            data = self.stream.read(n)
        except ArchiveError:
            raise
        except _DECOMPRESS_ERRORS as e:
            raise ArchiveError(400, f"the upload is not a valid {self.kind} stream: {e}") from None
        self.offset += len(data)
        return data

    def read_block_or_eof(self) -> bytes | None:
        """The next 512-byte header block; None at a clean end of the stream."""
        try:
            first = self.stream.read(BLOCK)
        except ArchiveError:
            raise
        except _DECOMPRESS_ERRORS as e:
            raise ArchiveError(400, f"the upload is not a valid {self.kind} stream: {e}") from None
        if not first:
            return None
        self.offset += len(first)
        if len(first) < BLOCK:
            first += self.read(BLOCK - len(first), None)
        return first


def _number(field: bytes, what: str, offset: int) -> int:
    if field and field[0] & 0x80:  # GNU base-256
        if field[0] == 0xFF:
            raise ArchiveError(400, f"negative {what} in the tar header at byte {offset}")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" \0")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise ArchiveError(
            400, f"bad {what} {text[:20]!r} in the tar header at byte {offset}"
        ) from None


def _text(field: bytes, what: str, offset: int) -> str:
    raw = field.split(b"\0", 1)[0]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ArchiveError(
            400, f"{what} {raw[:60]!r} (tar header at byte {offset}) is not UTF-8"
        ) from None


@dataclass
class _Header:
    name: str
    mode: int
    size: int
    type: bytes
    offset: int


def _parse_header(block: bytes, offset: int) -> _Header | None:
    """One ustar/GNU/pax header block; None for an all-zero block (end of archive)."""
    if block.count(0) == BLOCK:
        return None
    try:
        stored = _number(block[148:156], "checksum", offset)
    except ArchiveError:
        stored = -1
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b & 0x80)
    if stored not in (unsigned, signed):
        what = "the upload is not a tar archive" if offset == 0 else "corrupt tar header"
        raise ArchiveError(400, f"{what} (bad header checksum at byte {offset})")
    name = _text(block[0:100], "member name", offset)
    if block[257:263] == b"ustar\0":  # POSIX: a prefix field extends the name
        prefix = _text(block[345:500], "member name prefix", offset)
        if prefix:
            name = f"{prefix}/{name}"
    return _Header(
        name=name,
        mode=_number(block[100:108], "mode", offset),
        size=_number(block[124:136], "size", offset),
        type=block[156:157],
        offset=offset,
    )


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    """``"LEN key=value\\n"`` records of a pax header."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos:].strip(b"\0") == b"":
            break
        space = data.find(b" ", pos, pos + 20)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1 : end] != b"\n":
            raise ArchiveError(400, f"malformed pax header at byte {offset}")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise ArchiveError(400, f"malformed pax record in the header at byte {offset}")
        try:
            out[key.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ArchiveError(
                400, f"pax record in the header at byte {offset} is not UTF-8"
            ) from None
        pos = end
    return out


def clean_name(name: str, limits: ArchiveLimits) -> tuple[str, ...]:
    """The components of a member name, normalised (``./a//b/`` -> ``("a", "b")``);
    400 for what could leave the destination or is not a plain relative name, 413 past
    ``limits.max_depth``. ``()`` is the archive's root (``.`` or ``./``)."""
    shown = _show(name)
    if "\0" in name:
        raise ArchiveError(400, f"member name {shown} contains a NUL byte", name)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise ArchiveError(400, f"member name {shown} contains a control character", name)
    if name.startswith("/"):
        raise ArchiveError(
            400, f"member {shown} has an absolute name: names must be relative", name
        )
    if "\\" in name:
        raise ArchiveError(
            400, f"member name {shown} contains a backslash: separate folders with /", name
        )
    if len(name.encode()) > PATH_MAX:
        raise ArchiveError(400, f"member name {shown} is longer than {PATH_MAX} bytes", name)
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(
            400, f"member {shown} has a '..' component: it would escape the folder", name
        )
    for p in parts:
        if len(p.encode()) > NAME_MAX:
            raise ArchiveError(
                400, f"member name {shown} has a component longer than {NAME_MAX} bytes", name
            )
    if len(parts) > limits.max_depth:
        raise ArchiveError(
            413,
            f"member {shown} is {len(parts)} levels deep, over the cap of "
            f"{limits.max_depth} levels",
            name,
        )
    return parts


def _safe_file_mode(mode: int) -> int:
    return 0o755 if mode & 0o111 else 0o644


class _Writer:
    """Creates directories and files under ``dest``, refusing any overlap."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.kinds: dict[tuple[str, ...], str] = {(): "d"}
        self.files = 0
        self.dirs = 0

    def _os_path(self, parts: tuple[str, ...]) -> str:
        return os.path.join(self.dest, *parts)

    def _check_parents(self, parts: tuple[str, ...], name: str) -> None:
        for i in range(1, len(parts)):
            if self.kinds.get(parts[:i]) == "f":
                raise ArchiveError(
                    400,
                    f"member {_show(name)} is inside {_show('/'.join(parts[:i]))}, which is a file",
                    name,
                )

    def _make_dirs(self, parts: tuple[str, ...]) -> None:
        for i in range(1, len(parts) + 1):
            if parts[:i] not in self.kinds:
                os.mkdir(self._os_path(parts[:i]), 0o755)
                os.chmod(self._os_path(parts[:i]), 0o755)  # whatever the umask
                self.kinds[parts[:i]] = "d"
                self.dirs += 1

    def directory(self, parts: tuple[str, ...], name: str) -> None:
        self._check_parents(parts, name)
        if self.kinds.get(parts) == "f":
            raise ArchiveError(
                400, f"directory member {_show(name)} would replace a file of that name", name
            )
        self._make_dirs(parts)

    def open_file(self, parts: tuple[str, ...], name: str, mode: int) -> int:
        if not parts:
            raise ArchiveError(400, f"file member {_show(name)} has an empty name", name)
        self._check_parents(parts, name)
        kind = self.kinds.get(parts)
        if kind == "d":
            raise ArchiveError(
                400, f"file member {_show(name)} would replace a directory of that name", name
            )
        if kind == "f":
            raise ArchiveError(400, f"member {_show(name)} appears twice in the archive", name)
        self._make_dirs(parts[:-1])
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self._os_path(parts), flags, 0o600)
        os.fchmod(fd, _safe_file_mode(mode))
        self.kinds[parts] = "f"
        self.files += 1
        return fd


def extract(
    source: str | os.PathLike[str] | BinaryIO,
    dest: str | os.PathLike[str],
    limits: ArchiveLimits | None = None,
) -> Extracted:
    """Unpack the tar archive ``source`` (a path or a binary file object read from its
    current position) into ``dest`` (created if missing; must be empty). Returns what
    was written; raises :class:`ArchiveError` (see the module docstring). Blocking: run
    it in a worker thread from async code."""
    limits = limits or ArchiveLimits()
    dest_path = Path(dest)
    dest_path.mkdir(mode=0o700, exist_ok=True)
    if any(dest_path.iterdir()):
        raise ValueError(f"extract: {dest_path} is not empty")
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            return _extract(f, dest_path, limits)
    return _extract(source, dest_path, limits)


def _extract(raw: IO[bytes], dest: Path, limits: ArchiveLimits) -> Extracted:
    return _Extraction(raw, dest, limits).run()


_EXTENSION_TYPES = _PAX_TYPES | {_PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK}


class _Extraction:
    """One pass over one archive: the reader, the writer and the running counts.

    ``run`` reads header after header; an extension header (pax, GNU long name) is
    checked, counted against the unpacked budget and kept for the member that follows;
    a member is counted, its type checked, its name cleaned, then written. The order of
    the checks is part of the contract (the error a hostile archive gets names the first
    rule it breaks)."""

    def __init__(self, raw: IO[bytes], dest: Path, limits: ArchiveLimits) -> None:
        self.reader = _Reader(_Counting(raw, limits.max_upload))
        self.writer = _Writer(dest)
        self.limits = limits
        self.unpacked = 0  # file data + extension headers
        self.data_bytes = 0
        self.members = 0
        self.pax: dict[str, str] = {}
        self.long_name: str | None = None
        self.extensions = 0

    def run(self) -> Extracted:
        while True:
            offset = self.reader.offset
            block = self.reader.read_block_or_eof()
            if block is None:
                break
            header = _parse_header(block, offset)
            if header is None:  # end-of-archive marker
                break
            if header.type in _EXTENSION_TYPES:
                self._extension(header, offset)
            else:
                self._member(header)
        self._drain()
        w = self.writer
        return Extracted(files=w.files, dirs=w.dirs, bytes=self.data_bytes)

    def _budget(self, n: int, what: str, name: str | None) -> None:
        """Count ``n`` more unpacked bytes, refusing (413) what would pass the cap."""
        if self.unpacked + n > self.limits.max_unpacked:
            raise ArchiveError(
                413,
                f"{what} ({human_size(n)}) takes the archive over the cap of "
                f"{human_size(self.limits.max_unpacked)} unpacked (after "
                f"{human_size(self.unpacked)})",
                name,
            )
        self.unpacked += n

    def _extension(self, header: _Header, offset: int) -> None:
        """Read a pax or GNU extension header and keep what it says for the next member."""
        self.extensions += 1
        if self.extensions > MAX_EXTENSIONS_PER_MEMBER:
            raise ArchiveError(
                400,
                f"more than {MAX_EXTENSIONS_PER_MEMBER} extension headers in a row "
                f"at byte {offset}",
            )
        if header.size > MAX_EXTENSION_HEADER:
            raise ArchiveError(
                400,
                f"extension header of {human_size(header.size)} at byte {offset} "
                f"(at most {human_size(MAX_EXTENSION_HEADER)})",
            )
        self._budget(header.size, "an extension header", None)
        data = self.reader.read(header.size, None)
        self.reader.read(-header.size % BLOCK, None)
        if header.type == _PAX_GLOBAL:
            return  # e.g. git archive's commit id; applies to no name we use
        if header.type == _GNU_LONGNAME:
            self.long_name = _text(data, "long member name", offset)
        elif header.type in _PAX_TYPES:
            records = _pax_records(data, offset)
            if any(k.startswith("GNU.sparse.") for k in records):
                raise ArchiveError(
                    400,
                    f"sparse file at byte {offset}: only regular files and "
                    "directories are accepted",
                )
            self.pax.update(records)

    def _name_and_size(self, header: _Header) -> tuple[str, int]:
        """The member's name and data size, the extension headers before it applied
        (then forgotten: they describe one member only)."""
        pax = self.pax
        name = pax.get("path", self.long_name if self.long_name is not None else header.name)
        size = header.size
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                size = -1
            if size < 0:
                raise ArchiveError(
                    400, f"bad pax size {pax['size'][:20]!r} for member {_show(name)}", name
                )
        self.pax, self.long_name, self.extensions = {}, None, 0
        return name, size

    def _check_member(self, header: _Header, name: str) -> None:
        """Count the member against the cap (413), then refuse any type but a regular
        file or a directory (400)."""
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveError(
                413,
                f"more than {self.limits.max_members} members: the cap was reached at "
                f"{_show(name)}",
                name,
            )
        if header.type in _REFUSED_TYPES:
            raise ArchiveError(
                400,
                f"member {_show(name)} is {_REFUSED_TYPES[header.type]}: only regular "
                "files and directories are accepted",
                name,
            )
        if header.type != _DIR_TYPE and header.type not in _FILE_TYPES:
            raise ArchiveError(
                400,
                f"member {_show(name)} has the unknown type {header.type!r}: only "
                "regular files and directories are accepted",
                name,
            )

    def _member(self, header: _Header) -> None:
        """Check and write one directory or regular file member."""
        name, size = self._name_and_size(header)
        self._check_member(header, name)
        parts = clean_name(name, self.limits)
        if header.type == _DIR_TYPE:
            if size:
                raise ArchiveError(400, f"directory member {_show(name)} carries data", name)
            self.writer.directory(parts, name)
            return
        self._budget(size, f"member {_show(name)}", name)
        self._write(self.writer.open_file(parts, name, header.mode), size, name)
        self.reader.read(-size % BLOCK, name)

    def _write(self, fd: int, size: int, name: str) -> None:
        """Copy ``size`` bytes of member data from the archive to ``fd``, then close it."""
        try:
            left = size
            while left:
                chunk = self.reader.read(min(CHUNK, left), name)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                left -= len(chunk)
                self.data_bytes += len(chunk)
        finally:
            os.close(fd)

    def _drain(self) -> None:
        """Read on to the end of the stream, so the gzip/bzip2/xz checksum is verified;
        what follows the end-of-archive blocks (tar pads to 10 KiB records) counts as
        unpacked."""
        while chunk := self.reader.read_some(CHUNK):
            self._budget(len(chunk), "data after the end of the archive", None)

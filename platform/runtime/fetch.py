"""Torpor's archive fetcher: the entry point of the generic runtime image on a cluster.

Standalone on purpose, like ``server.py`` beside it: standard library only, nothing of
Torpor. A Pod of a source function runs the one generic runtime image (``torpor images
build-runtime``) instead of an image built per function (the Fission fetcher idea): this
downloads the function's archive by its content hash, checks the hash, extracts it into
``TORPOR_FETCH_DIR`` and then execs the runtime (``server.py``) on it.

The extractor here is minimal and self-contained on purpose (the runtime cannot import the
API's): a gzip (or bz2, xz, plain) tar whose members are regular files and directories
only, with relative names that stay inside the target; links, devices, fifos, sparse
files, absolute names, ``..`` and duplicates refuse the whole archive, as do more members
or more bytes (counted as decompressed, headers included) than the caps. Files are
written with ``O_EXCL|O_NOFOLLOW`` and end up read-only (0444/0555), owned by the Pod's
user; nothing of the archive's owners or modes but the executable bit is kept.

Environment
  TORPOR_ARCHIVE_URL          where to GET the archive (http or https; required)
  TORPOR_ARCHIVE_SHA256       its sha256, 64 hex digits (required); any other content is refused
  TORPOR_ARCHIVE_TOKEN        bearer token for the download (optional); removed from the
                              environment the function sees, and never sent after a redirect
                              (redirects are refused)
  TORPOR_FETCH_DIR            where the function goes (default /tmp/fn); absent or empty
  TORPOR_ARCHIVE_MAX_DOWNLOAD largest archive, bytes or 64Mi-style (default 64Mi)
  TORPOR_ARCHIVE_MAX_SIZE     largest total of the extracted files (default 256Mi)
  TORPOR_ARCHIVE_MAX_MEMBERS  most members, files and directories (default 10000)
  TORPOR_FETCH_TIMEOUT        seconds for the download, retries included (default 60)

Exit codes (the runtime's own 0-5 apply once it runs)
  2 bad configuration   6 download failed   7 hash mismatch   8 archive refused
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import os
import re
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
from typing import IO, Any

EXIT_CONFIG = 2
EXIT_DOWNLOAD = 6
EXIT_MISMATCH = 7
EXIT_REFUSED = 8

DEFAULT_DIR = "/tmp/fn"
DEFAULT_MAX_DOWNLOAD = 64 * 1024 * 1024
DEFAULT_MAX_SIZE = 256 * 1024 * 1024
DEFAULT_MAX_MEMBERS = 10_000
DEFAULT_TIMEOUT = 60.0
_CHUNK = 64 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


class FetchError(Exception):
    """The download failed (exit 6)."""


class Refused(Exception):
    """The archive is not one this extractor accepts (exit 8)."""


def _size(name: str, raw: str) -> int:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "K": 1000, "M": 1000**2, "G": 1000**3}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|K|M|G)?", raw.strip())
    if m is None or int(m.group(1)) <= 0:
        raise ValueError(f"{name}={raw!r}: expected a positive size such as 1048576 or 64Mi")
    return int(m.group(1)) * units.get(m.group(2) or "", 1)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> None:
        raise FetchError(
            f"the archive server redirected to {newurl[:200]!r} (HTTP {code}): refused"
        )


def download(url: str, token: str | None, out: IO[bytes], max_bytes: int, timeout: float) -> str:
    """GET ``url`` into ``out``; returns the sha256 of what was written.

    Retries connection errors, 429 and 5xx with a backoff until ``timeout``; any other
    status fails at once. Never uses a proxy from the environment, never follows a redirect.
    """
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"TORPOR_ARCHIVE_URL={url[:200]!r}: expected an http:// or https:// URL")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    headers = {"User-Agent": "torpor-fetch", "Accept": "application/octet-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        out.seek(0)
        out.truncate()
        try:
            return _get(
                opener, urllib.request.Request(url, headers=headers), out, max_bytes, deadline
            )
        except urllib.error.HTTPError as e:
            retry = e.code == 429 or e.code >= 500
            why = f"HTTP {e.code} {e.reason}"
            try:
                detail = e.read(300).decode("utf-8", "replace").strip()
            except OSError:
                detail = ""
            if detail:
                why += f": {detail}"
        except (urllib.error.URLError, OSError) as e:
            retry = True
            why = str(getattr(e, "reason", e))
        if not retry or time.monotonic() + delay > deadline:
            raise FetchError(f"GET {url}: {why}")
        print(
            f"torpor-fetch: GET {url}: {why}; retrying in {delay:.1f}s", file=sys.stderr, flush=True
        )
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _get(
    opener: Any, req: urllib.request.Request, out: IO[bytes], max_bytes: int, deadline: float
) -> str:
    remaining = max(0.5, deadline - time.monotonic())
    with opener.open(req, timeout=min(remaining, 15.0)) as resp:
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise Refused(
                f"the archive is {int(length)} bytes, over the {max_bytes}-byte cap (TORPOR_ARCHIVE_MAX_DOWNLOAD)"
            )
        digest = hashlib.sha256()
        total = 0
        while True:
            if time.monotonic() > deadline:
                raise FetchError(
                    f"GET {req.full_url}: not complete within the timeout ({total} bytes)"
                )
            chunk = resp.read(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise Refused(
                    f"the archive is over the {max_bytes}-byte cap (TORPOR_ARCHIVE_MAX_DOWNLOAD)"
                )
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        return digest.hexdigest()


class _Capped:
    """A read-only stream that refuses to yield more than ``cap`` bytes in all."""

    def __init__(self, inner: Any, cap: int) -> None:
        self.inner = inner
        self.left = cap

    def read(self, n: int = -1) -> bytes:
        want = self.left + 1 if n is None or n < 0 or n > self.left + 1 else n
        data: bytes = self.inner.read(want)
        self.left -= len(data)
        if self.left < 0:
            raise Refused("the archive expands beyond the size cap (TORPOR_ARCHIVE_MAX_SIZE)")
        return data


def _decompressed(f: IO[bytes]) -> Any:
    magic = f.read(6)
    f.seek(0)
    if magic[:2] == b"\x1f\x8b":
        import gzip

        return gzip.GzipFile(fileobj=f, mode="rb")
    if magic[:3] == b"BZh":
        import bz2

        return bz2.BZ2File(f, "rb")
    if magic == b"\xfd7zXZ\x00":
        import lzma

        return lzma.LZMAFile(f, "rb")
    return f


def _parts(name: str) -> list[str]:
    if name.startswith("/"):
        raise Refused(f"member {name[:200]!r} has an absolute name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Refused(f"member {name[:200]!r} leaves the target folder ('..')")
    return parts


def extract(archive: IO[bytes], target: str, max_size: int, max_members: int) -> tuple[int, int]:
    """Extract the tar ``archive`` into the existing, empty folder ``target``.

    Returns (files, bytes). Raises ``Refused`` naming the member at fault; what was
    written before is left for the caller to remove.
    """
    overhead = 1024 * 1024 + 3 * 512 * max_members  # headers, padding, long names
    stream = _Capped(_decompressed(archive), max_size + overhead)
    root = os.path.realpath(target)
    files = dirs = size = 0
    executable: set[str] = set()
    try:
        tar = tarfile.open(fileobj=stream, mode="r|")  # type: ignore[call-overload]
    except tarfile.TarError as e:
        raise Refused(f"not a tar archive: {e}") from e
    with tar:
        try:
            for m in tar:
                if files + dirs >= max_members:
                    raise Refused(f"more than {max_members} members (TORPOR_ARCHIVE_MAX_MEMBERS)")
                parts = _parts(m.name)
                kind = "a directory" if m.isdir() else "a file"
                if m.issparse() or not (m.isreg() or m.isdir()):
                    what = (
                        "a symlink"
                        if m.issym()
                        else "a hard link"
                        if m.islnk()
                        else "a device"
                        if m.isdev()
                        else "a sparse file"
                        if m.issparse()
                        else "a special file"
                    )
                    raise Refused(
                        f"member {m.name[:200]!r} is {what}: only regular files and directories are accepted"
                    )
                if not parts:
                    if m.isdir():
                        continue  # the archive's root entry
                    raise Refused(f"member {m.name[:200]!r} has an empty name")
                path = os.path.join(root, *parts)
                if os.path.commonpath([root, os.path.realpath(path)]) != root:
                    raise Refused(f"member {m.name[:200]!r} leaves the target folder")
                try:
                    if m.isdir():
                        dirs += 1
                        if not os.path.isdir(path):
                            os.makedirs(path, mode=0o700)
                        continue
                    files += 1
                    size += m.size
                    if size > max_size:
                        raise Refused(
                            f"the files add up to more than {max_size} bytes (TORPOR_ARCHIVE_MAX_SIZE) "
                            f"at {m.name[:200]!r}"
                        )
                    parent = os.path.dirname(path)
                    if not os.path.isdir(parent):
                        os.makedirs(parent, mode=0o700)
                    src = tar.extractfile(m)
                    assert src is not None
                    fd = os.open(
                        path,
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o600,
                    )
                    with os.fdopen(fd, "wb") as dst:
                        shutil.copyfileobj(src, dst, _CHUNK)
                    if m.mode & 0o111:
                        executable.add(path)
                except FileExistsError:
                    raise Refused(f"member {m.name[:200]!r} appears twice") from None
                except (NotADirectoryError, IsADirectoryError):
                    raise Refused(
                        f"member {m.name[:200]!r} ({kind}) clashes with an earlier member"
                    ) from None
        except (tarfile.TarError, EOFError) as e:
            raise Refused(f"broken tar archive: {e}") from e
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            os.chmod(p, 0o555 if p in executable else 0o444, follow_symlinks=False)
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o555, follow_symlinks=False)
    return files, size


def _caps(env: dict[str, str]) -> tuple[int, int, int]:
    """(largest download, largest extracted total, most members) from ``env`` or the
    defaults; ValueError names the variable that is not a size."""
    return (
        _size(
            "TORPOR_ARCHIVE_MAX_DOWNLOAD",
            env.get("TORPOR_ARCHIVE_MAX_DOWNLOAD") or str(DEFAULT_MAX_DOWNLOAD),
        ),
        _size(
            "TORPOR_ARCHIVE_MAX_SIZE", env.get("TORPOR_ARCHIVE_MAX_SIZE") or str(DEFAULT_MAX_SIZE)
        ),
        _size(
            "TORPOR_ARCHIVE_MAX_MEMBERS",
            env.get("TORPOR_ARCHIVE_MAX_MEMBERS") or str(DEFAULT_MAX_MEMBERS),
        ),
    )


def _fail(code: int, msg: str) -> int:
    print(f"torpor-fetch: {msg}", file=sys.stderr, flush=True)
    return code


RUNTIME_NAME = "torpor_runtime"  # the runtime's one import name in a replica: handlers import it


def load_runtime(path: str) -> Any:
    """Import the runtime file at ``path`` (``server.py``) under its one name,
    ``torpor_runtime``, in this process (from its cached bytecode when there is one)."""
    spec = importlib.util.spec_from_file_location(RUNTIME_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no runtime at {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[RUNTIME_NAME] = module
    spec.loader.exec_module(module)
    return module


def launch_code(path: str) -> str:
    """``python3 -c`` code that runs the runtime file at ``path`` as ``torpor_runtime``, as
    ``load_runtime`` does: the one way a replica starts it (image CMD, plain spawn, the
    fetcher's exec), so a handler's ``import torpor_runtime`` is the module that serves it."""
    return (
        "import importlib.util as u, sys; "
        f"s = u.spec_from_file_location({RUNTIME_NAME!r}, {path!r}); "
        f"m = u.module_from_spec(s); sys.modules[{RUNTIME_NAME!r}] = m; "
        "s.loader.exec_module(m); sys.exit(m.main())"
    )


def _runtime_argv() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return [sys.executable, "-c", launch_code(os.path.join(here, "server.py"))]


def main(env: dict[str, str] | None = None, exec_runtime: bool = True) -> int:
    """Fetch, check, extract, then exec the runtime (never returns on success)."""
    env = dict(os.environ if env is None else env)
    t0 = time.perf_counter()
    url = env.get("TORPOR_ARCHIVE_URL", "")
    want = env.get("TORPOR_ARCHIVE_SHA256", "").strip().lower()
    token = env.pop("TORPOR_ARCHIVE_TOKEN", "") or None
    target = os.path.abspath(env.get("TORPOR_FETCH_DIR") or DEFAULT_DIR)
    try:
        if not url:
            raise ValueError("TORPOR_ARCHIVE_URL is not set")
        if _SHA256.fullmatch(want) is None:
            raise ValueError(f"TORPOR_ARCHIVE_SHA256={want[:80]!r}: expected 64 hex digits")
        max_download, max_size, max_members = _caps(env)
        timeout = float(env.get("TORPOR_FETCH_TIMEOUT") or DEFAULT_TIMEOUT)
        if os.path.lexists(target) and (
            not os.path.isdir(target) or os.path.islink(target) or os.listdir(target)
        ):
            raise ValueError(f"TORPOR_FETCH_DIR={target!r} exists and is not an empty folder")
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
    except (ValueError, OSError) as e:
        return _fail(EXIT_CONFIG, str(e))
    partial = f"{target}.partial-{os.getpid()}"
    spool = f"{target}.archive-{os.getpid()}"
    try:
        with open(spool, "w+b") as f:
            try:
                got = download(url, token, f, max_download, timeout)
            except FetchError as e:
                return _fail(EXIT_DOWNLOAD, str(e))
            except Refused as e:
                return _fail(EXIT_REFUSED, f"GET {url}: {e}")
            except ValueError as e:
                return _fail(EXIT_CONFIG, str(e))
            if not hmac.compare_digest(got, want):
                return _fail(
                    EXIT_MISMATCH,
                    f"sha256 mismatch for {url}: expected {want}, got {got}; refusing to run it",
                )
            f.seek(0)
            os.mkdir(partial, 0o700)
            try:
                files, size = extract(f, partial, max_size, max_members)
            except Refused as e:
                return _fail(EXIT_REFUSED, f"archive {want[:12]} refused: {e}")
        if os.path.isdir(target):
            os.rmdir(target)  # empty, checked above
        os.chmod(partial, 0o555)
        os.rename(partial, target)
    except OSError as e:
        return _fail(EXIT_REFUSED, f"extracting archive {want[:12]} into {target}: {e}")
    finally:
        try:
            os.unlink(spool)
        except OSError:
            pass
        if os.path.isdir(partial):
            for dirpath, dirnames, _ in os.walk(partial):
                for name in dirnames:
                    os.chmod(os.path.join(dirpath, name), 0o700)
            os.chmod(partial, 0o700)
            shutil.rmtree(partial, ignore_errors=True)
    ms = (time.perf_counter() - t0) * 1000
    print(
        f"torpor-fetch: sha256:{want[:12]} ok, {files} files, {size} bytes in {target} ({ms:.0f} ms)",
        flush=True,
    )
    env["TORPOR_DIR"] = target
    if not exec_runtime:
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    argv = _runtime_argv()
    os.execve(argv[0], argv, env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())


# -- a pooled container: wait for one specialise request, then become the function ------
#
# A container of the Docker driver's warm pool (``torpor.drivers.dockerpool``) runs
# ``pooled_main``: it is created and started hardened like a replica, with no function in
# it, and listens on PORT (``GET /_torpor/pool`` answers 204 while it waits: nothing else
# does) for exactly one request ``POST /_torpor/specialise`` carrying
# the pool token it was created with (``TORPOR_POOL_TOKEN``, removed from the environment
# before anything of the function runs). Any other request is closed without a byte of
# answer (so a readiness probe never mistakes a waiting container for a replica), as is a
# specialise request with a wrong token. The first request with the right token closes the
# listener (once only, whatever follows), and its body is a JSON line (``sha256``, ``env``)
# and then the archive: the archive must hash to ``sha256`` (else 422, exit 7), is
# extracted by ``extract`` above into ``TORPOR_FETCH_DIR`` (else 422, exit 8), and the
# runtime (``server.main``) then serves the function on the same port with exactly the
# given env. The token alone decides who may specialise; nothing in the container (there
# is no function code yet) or on the function's network (none: the pool's own network has
# inter-container traffic off) can choose the archive.

SPECIALISE_PATH = "/_torpor/specialise"
WAITING_PATH = "/_torpor/pool"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_HEAD = 16 * 1024
_MAX_META = 1024 * 1024


def _reply(conn: Any, status: int, reason: str, body: bytes) -> None:
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        conn.sendall(head + body)
    except OSError:
        pass


def _read_head(conn: Any) -> tuple[str, str, dict[str, str], bytes] | None:
    """(method, path, lower-cased headers, bytes after the head), or None if not HTTP."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            return None
        buf += chunk
        if len(buf) > _MAX_HEAD:
            return None
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            return None
        headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], headers, rest


def parse_specialise(meta: bytes) -> tuple[str, dict[str, str]]:
    """The (sha256, env) of a specialise request's JSON line. Raises ValueError."""
    import json

    doc = json.loads(meta.decode("utf-8"))
    if not isinstance(doc, dict):
        raise ValueError("expected a JSON object")
    want = doc.get("sha256")
    if not isinstance(want, str) or _SHA256.fullmatch(want) is None:
        raise ValueError("sha256: expected 64 lower-case hex digits")
    env = doc.get("env")
    if not isinstance(env, dict):
        raise ValueError("env: expected an object")
    for k, v in env.items():
        if not isinstance(v, str) or _ENV_NAME.fullmatch(k) is None or "\x00" in v:
            raise ValueError(f"env: bad entry {str(k)[:60]!r}")
    return want, dict(env)


def _specialise(conn: Any, rest: bytes, length: int, env: dict[str, str]) -> tuple[int, str]:
    """Read the body, check, extract; -> (exit code, message): 0 means the function is in place."""
    target = os.path.abspath(env.get("TORPOR_FETCH_DIR") or DEFAULT_DIR)
    max_download, max_size, max_members = _caps(env)
    if length > max_download + _MAX_META:
        return EXIT_REFUSED, f"the request is {length} bytes, over the cap"
    body = bytearray(rest[:length])
    while len(body) < length:
        chunk = conn.recv(min(_CHUNK, length - len(body)))
        if not chunk:
            return EXIT_DOWNLOAD, "the request body ended early"
        body += chunk
    meta, sep, archive = bytes(body).partition(b"\n")
    if not sep or len(meta) > _MAX_META:
        return EXIT_CONFIG, "expected a JSON line, then the archive"
    try:
        want, fn_env = parse_specialise(meta)
    except ValueError as e:
        return EXIT_CONFIG, f"bad specialise request: {e}"
    got = hashlib.sha256(archive).hexdigest()
    if not hmac.compare_digest(got, want):
        return EXIT_MISMATCH, f"sha256 mismatch: expected {want}, got {got}; refusing to run it"
    if os.path.lexists(target):
        return EXIT_CONFIG, f"TORPOR_FETCH_DIR={target!r} exists"
    import io

    partial = f"{target}.partial-{os.getpid()}"
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.mkdir(partial, 0o700)
    try:
        files, size = extract(io.BytesIO(archive), partial, max_size, max_members)
        os.chmod(partial, 0o555)
        os.rename(partial, target)
    except Refused as e:
        return EXIT_REFUSED, f"archive {want[:12]} refused: {e}"
    except OSError as e:
        return EXIT_REFUSED, f"extracting archive {want[:12]} into {target}: {e}"
    finally:
        if os.path.isdir(partial):
            for dirpath, dirnames, _ in os.walk(partial):
                for name in dirnames:
                    os.chmod(os.path.join(dirpath, name), 0o700)
            os.chmod(partial, 0o700)
            shutil.rmtree(partial, ignore_errors=True)
    kept = {k: os.environ[k] for k in ("HOME", "HOSTNAME") if k in os.environ}  # Docker's own
    os.environ.clear()  # exactly the function's env from here on: nothing of the pool's
    os.environ.update({**kept, **fn_env})
    os.environ["TORPOR_DIR"] = target
    return 0, f"sha256:{want[:12]} ok, {files} files, {size} bytes in {target}"


def pooled_main(env: dict[str, str] | None = None) -> int:
    """Wait for the one specialise request (see above), then run the runtime on it."""
    import json
    import socket

    env = dict(os.environ if env is None else env)
    token = env.pop("TORPOR_POOL_TOKEN", "")
    os.environ.pop("TORPOR_POOL_TOKEN", None)
    if len(token) < 32:
        return _fail(EXIT_CONFIG, "TORPOR_POOL_TOKEN is not set (at least 32 characters)")
    try:
        port = int(env.get("PORT") or "8080")
        listener = socket.create_server(
            (env.get("TORPOR_HOST") or "0.0.0.0", port), backlog=64, reuse_port=False
        )
    except (ValueError, OSError) as e:
        return _fail(EXIT_CONFIG, f"cannot listen: {e}")
    # warm: the runtime imported before it is needed, under its one name
    server = load_runtime(os.path.join(os.path.dirname(os.path.abspath(__file__)), "server.py"))

    print(f"torpor-pool: waiting on :{port}", flush=True)
    expected = f"Bearer {token}".encode()
    t0 = time.perf_counter()
    while True:
        conn, _ = listener.accept()
        conn.settimeout(10.0)
        try:
            t0 = time.perf_counter()
            got = _read_head(conn)
            if got is None:
                continue
            method, path, headers, rest = got
            if method == "GET" and path == WAITING_PATH:
                _reply(conn, 204, "No Content", b"")  # the driver's check that it waits
                continue
            auth = headers.get("authorization", "").encode("utf-8", "replace")
            if (
                method != "POST"
                or path != SPECIALISE_PATH
                or not hmac.compare_digest(auth, expected)
            ):
                continue  # closed without an answer: not ready, not a replica
            listener.close()  # once only, whatever the outcome
            length = headers.get("content-length", "")
            if not (length.isascii() and length.isdigit()):
                _reply(conn, 411, "Length Required", b'{"error": "Content-Length required"}')
                return _fail(EXIT_CONFIG, "specialise request without a Content-Length")
            try:
                code, msg = _specialise(conn, rest, int(length), env)
            except (OSError, ValueError) as e:
                code, msg = EXIT_DOWNLOAD, f"reading the specialise request: {e}"
            body = json.dumps({"code": code, "detail": msg}).encode()
            if code:
                _reply(conn, 422, "Unprocessable Entity", body)
                return _fail(code, msg)
            _reply(conn, 200, "OK", body)
            ms = (time.perf_counter() - t0) * 1000
            print(f"torpor-pool: {msg} ({ms:.0f} ms)", flush=True)
            break
        except OSError:
            continue
        finally:
            conn.close()
    result: int = server.main(t0)
    return result

"""A loopback HTTP server of content-addressed function archives, for the fetcher's tests.

Serves ``GET /v1/archives/SHA256`` (the shape of the API's archive endpoint) from memory,
on 127.0.0.1 and a free port, in a thread. Optional: a bearer token it requires, or a
``key`` under which it requires each archive's own token (``torpor.sources.archive_token``,
as the API does), a number of 503s before it answers, a redirect instead of an answer.
Records each request's path and Authorization header.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path
from typing import Any


def pack_folder(folder: Path) -> bytes:
    """A tar.gz of ``folder`` as ``torpor deploy`` packs it."""
    from torpor.cli.main import pack

    return pack(folder)


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], gzip: bool = True) -> bytes:
    """A tar (gz) made member by member: hostile ones included."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gzip else "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


class ArchiveServer:
    def __init__(self, token: str | None = None, key: bytes | None = None) -> None:
        self.token = token
        self.key = key
        self.archives: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Authorization)
        self.fail_first = 0  # answer this many requests with 503 first
        self.redirect_to: str | None = None
        self._httpd: http.server.ThreadingHTTPServer | None = None

    def add(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.archives[sha] = data
        return sha

    def add_folder(self, folder: Path) -> str:
        return self.add(pack_folder(folder))

    @property
    def base(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1/archives"

    def url(self, sha: str) -> str:
        return f"{self.base}/{sha}"

    def start(self) -> ArchiveServer:
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _reply(
                self,
                code: int,
                body: bytes,
                ctype: str = "text/plain",
                extra: dict[str, str] | None = None,
            ) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                srv.requests.append((self.path, self.headers.get("Authorization")))
                if srv.fail_first > 0:
                    srv.fail_first -= 1
                    self._reply(503, b"busy")
                    return
                if (
                    srv.token is not None
                    and self.headers.get("Authorization") != f"Bearer {srv.token}"
                ):
                    self._reply(401, b'{"error":"unauthorized"}', "application/json")
                    return
                sha = self.path.rsplit("/", 1)[-1]
                if srv.key is not None:
                    from torpor.sources import SHA256, archive_token

                    given = self.headers.get("Authorization")
                    if (
                        not SHA256.fullmatch(sha)
                        or given != f"Bearer {archive_token(srv.key, sha)}"
                    ):
                        self._reply(401, b'{"error":"unauthorized"}', "application/json")
                        return
                if srv.redirect_to is not None:
                    self._reply(302, b"", extra={"Location": srv.redirect_to})
                    return
                data = srv.archives.get(sha) if self.path.startswith("/v1/archives/") else None
                if data is None:
                    self._reply(404, b'{"error":"archive not found"}', "application/json")
                    return
                self._reply(200, data, "application/gzip")

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(
            target=self._httpd.serve_forever, name="archive-server", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

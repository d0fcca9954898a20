"""Run a real ``torpor up`` in a subprocess on free loopback ports, for end-to-end tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml
from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ROOT / "functions"
DOMAIN = "torpor.localhost"


def function_copy(tmp: Path, fn: str, **overrides: Any) -> Path:
    """Copy functions/NAME to tmp and merge ``overrides`` into its torpor.yaml
    (nested dicts merge: scale={"idle": "2s"})."""
    dest = tmp / f"{fn}-{os.urandom(3).hex()}"
    shutil.copytree(FUNCTIONS / fn, dest, ignore=shutil.ignore_patterns("__pycache__"))
    spec_path = dest / "torpor.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(spec.get(k), dict):
            spec[k].update(v)
        else:
            spec[k] = v
    spec_path.write_text(yaml.safe_dump(spec))
    return dest


class Torpor:
    """A running ``torpor up`` plus helpers to drive it through the CLI and HTTP."""

    def __init__(
        self,
        state_dir: Path,
        *,
        driver: str = "process",
        redis: str | None = None,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
        api_host: str = "127.0.0.1",
        state_dir_flag: bool = True,
    ) -> None:
        self.state_dir = state_dir
        self.state_dir_flag = state_dir_flag  # False: `up` finds it through TORPOR_STATE_DIR alone
        self.port = free_port()
        self.api_port = free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.gateway = f"http://127.0.0.1:{self.port}"
        self.driver = driver
        self.redis = redis
        self.extra = extra or []
        self.api_host = api_host
        # TORPOR_STATE_DIR: CLI calls find the token `torpor up` wrote to STATE_DIR/token
        self.env = {
            **os.environ,
            "TORPOR_API": self.api,
            "TORPOR_GATEWAY": self.gateway,
            "TORPOR_STATE_DIR": str(state_dir),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state_dir.parent / f"torpor-up-{self.port}.log"

    def start(self, wait: float = 30.0) -> Torpor:
        cmd = [
            sys.executable,
            "-m",
            "torpor.cli.main",
            "up",
            "--driver",
            self.driver,
            *(["--state-dir", str(self.state_dir)] if self.state_dir_flag else []),
            "--port",
            str(self.port),
            "--api-port",
            str(self.api_port),
            "--api-host",
            self.api_host,
            "--log-level",
            "warning",
            *self.extra,
        ]
        if self.redis:
            cmd += ["--redis", self.redis]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"torpor up exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.api}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"torpor up not ready in {wait}s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    # -- driving it ----------------------------------------------------------------------
    def cli(
        self, *args: str, check: bool = True, timeout: float = 180.0
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [sys.executable, "-m", "torpor.cli.main", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"torpor {' '.join(args)} exited {r.returncode}:\n{r.stderr}\n{r.stdout}"
            )
        return r

    def deploy(self, folder: Path, *args: str) -> str:
        r = self.cli("deploy", str(folder), *args)
        return r.stdout.strip()

    def request(
        self,
        name: str,
        path: str = "/",
        method: str = "GET",
        *,
        tag: str | None = None,
        timeout: float = 60.0,
        **kw: Any,
    ) -> httpx.Response:
        host = f"{tag}-{name}.{DOMAIN}" if tag else f"{name}.{DOMAIN}"
        headers = {"Host": host, **kw.pop("headers", {})}
        return httpx.request(method, self.gateway + path, headers=headers, timeout=timeout, **kw)

    @property
    def api_headers(self) -> dict[str, str]:
        """Headers for a direct call to this platform's API: the bearer token from
        ``TORPOR_TOKEN`` in this platform's env, else the one ``torpor up`` wrote to
        ``STATE_DIR/token``; none if neither exists. Use on every direct API call."""
        token = self.env.get("TORPOR_TOKEN")
        path = self.state_dir / "token"
        if not token and path.is_file():
            token = path.read_text().strip()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def api_call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """``method`` on ``API + path`` with :attr:`api_headers` (plus any ``headers=``)."""
        headers = {**self.api_headers, **kw.pop("headers", {})}
        kw.setdefault("timeout", 10)
        return httpx.request(method, self.api + path, headers=headers, **kw)

    def function(self, name: str) -> dict[str, Any]:
        r = self.api_call("GET", f"/v1/functions/{name}")
        r.raise_for_status()
        return dict(r.json())

    def ready_replicas(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.function(name)["replicas"] if r["state"] == "ready"]

    def wait_for(self, predicate: Any, timeout: float, what: str, every: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@contextmanager
def torpor_up(state_dir: Path, **kw: Any) -> Iterator[Torpor]:
    t = Torpor(state_dir, **kw).start()
    try:
        yield t
    finally:
        t.stop()

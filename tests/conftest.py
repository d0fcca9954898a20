"""Fixtures shared by every test: a real redis-server on a free loopback port."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

# Make tests/helpers.py importable as `helpers` whatever pytest's import mode.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from helpers import free_port  # noqa: E402

REDIS_SERVER = "/usr/bin/redis-server"
REDIS_START_TIMEOUT = 10.0  # seconds until PING must answer


def _redis_server_binary() -> str:
    if Path(REDIS_SERVER).is_file():
        return REDIS_SERVER
    found = shutil.which("redis-server")
    if found:
        return found
    pytest.fail(
        "redis-server is not installed: these tests need a real Redis server. "
        "Install it (Debian/Ubuntu: `apt-get install -y redis-server`) and run again.",
        pytrace=False,
    )


def _start_redis(binary: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start redis-server on a free port; retry on a new port if the bind races."""
    last_log = ""
    for attempt in range(3):
        port = free_port()
        log_path = workdir / f"redis-{port}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [
                    binary,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(workdir),
                    "--daemonize",
                    "no",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        client = redis.Redis(
            host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=1
        )
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if client.ping():
                        return proc, port
                except redis.exceptions.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        _stop(proc)
        last_log = log_path.read_text(errors="replace")[-2000:]
        if attempt == 2:
            break
    pytest.fail(
        f"redis-server did not answer PING within {REDIS_START_TIMEOUT}s; "
        f"its log ends with:\n{last_log}",
        pytrace=False,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server for the whole session; yields ``redis://127.0.0.1:PORT/0``."""
    binary = _redis_server_binary()
    proc, port = _start_redis(binary, tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's Redis URL, emptied (FLUSHALL) before the test."""
    client = redis.Redis.from_url(redis_server, socket_timeout=5)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server


# -- the security suite (`pytest -m security`) --------------------------------------------
# Every regression test of an attack is marked ``@pytest.mark.security``; the first line of
# its docstring names the attack, and ``attack.ended("...")`` records how it ended (the
# status and reason the platform answered). The run closes with a table of both.


class AttackRecord:
    def __init__(self, item: pytest.Item) -> None:
        self._item = item

    def ended(self, how: str) -> None:
        """Record how the attack ended, e.g. ``"400 invalid upload: ../x escapes"``."""
        self._item.user_properties.append(("attack_ended", str(how)[:160]))


@pytest.fixture
def attack(request: pytest.FixtureRequest) -> AttackRecord:
    return AttackRecord(request.node)


_security_rows: list[tuple[str, str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "security" not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        ended = "; ".join(str(v) for k, v in report.user_properties if k == "attack_ended")
        _security_rows.append((report.nodeid, report.outcome, ended))


def pytest_terminal_summary(
    terminalreporter: object, exitstatus: int, config: pytest.Config
) -> None:
    if not _security_rows:
        return
    write = terminalreporter.write_line  # type: ignore[attr-defined]
    write("")
    write("attacks tried (pytest -m security)")
    write(f"{'result':<7} {'attack':<70} how it ended")
    for nodeid, outcome, ended in _security_rows:
        attack_name = _attack_names.get(nodeid, nodeid.rsplit("::", 1)[-1])
        write(f"{outcome:<7} {attack_name[:70]:<70} {ended or '-'}")


_attack_names: dict[str, str] = {}


@pytest.hookimpl(trylast=True)
def pytest_itemcollected(item: pytest.Item) -> None:
    if item.get_closest_marker("security") is None:
        return
    fn = getattr(item, "function", None)
    doc = (getattr(fn, "__doc__", None) or "").strip().splitlines()
    _attack_names[item.nodeid] = doc[0].strip() if doc else item.name

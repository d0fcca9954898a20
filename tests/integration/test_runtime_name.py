"""The in-replica runtime has one import name, ``torpor_runtime``: however a replica is
started (``fetch.launch_code``: the image CMD, the process driver's plain spawn, the
fetcher; ``load_runtime``: the zygote), the module serving is the one a handler imports,
and neither ``server`` nor ``__main__`` is the runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from helpers import free_port

from torpor.drivers.process import RUNTIME
from torpor.runtime.fetch import launch_code

HANDLER = """import sys
import torpor_runtime


def handle(request):
    main = sys.modules["__main__"]
    return {
        "imported_serves": torpor_runtime.main.__module__ == "torpor_runtime",
        "name": torpor_runtime.__name__,
        "server": "server" in sys.modules,
        "main_is_runtime": hasattr(main, "load_handler"),
    }
"""


def _get(port: int, deadline: float) -> dict[str, object]:
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                return dict(json.loads(r.read()))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_a_started_runtime_is_torpor_runtime_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "handler.py").write_text(HANDLER)
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PORT": str(port),
        "TORPOR_DIR": str(tmp_path),
        "TORPOR_HANDLER": "handler:handle",
    }
    proc = subprocess.Popen(
        [sys.executable, "-s", "-c", launch_code(str(RUNTIME))],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        got = _get(port, time.monotonic() + 20)
    finally:
        proc.terminate()
        proc.wait(10)
    assert got == {
        "imported_serves": True,
        "name": "torpor_runtime",
        "server": False,
        "main_is_runtime": False,
    }

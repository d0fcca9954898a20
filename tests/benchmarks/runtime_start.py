"""Cold start of the function runtime: spawn -> first 200, against bare baselines.

    python tests/benchmarks/runtime_start.py [--runs 20] [--python /usr/bin/python3]

Prints, for each contender, the median and p90 over --runs spawns of the time from
``Popen`` to the first complete 200 response (polling connect every 0.5 ms):

- runtime (hello)     python3 server.py serving functions/hello, first GET /?name=...
- runtime (health)    the same, first GET /_torpor/health (what a readiness probe sees)
- runtime (.pyc)      the runtime imported from a compiled module instead of run as a
                      script (``python3 -c "import server; server.main()"``): what
                      precompiling the image would save
- runtime (fork)      fork() of a process that already imported the runtime and the
                      handler, the child calling server.main(): a pre-warmed "zygote"
- http.server         ``python3 -m http.server`` (stdlib baseline), first GET /
- floors              ``python3 -c pass`` and ``python3 -c "import asyncio"`` to exit

then ``-X importtime`` of one runtime start: the top imports by cumulative time and the
sum of all self times. Uses Debian's /usr/bin/python3 when present (what images run).
Not a test: figures vary with the machine; compare the ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import free_port, poll_200

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "platform" / "runtime" / "server.py"
HELLO = ROOT / "functions" / "hello"
DEADLINE = 10.0  # s for one start to answer


def first_200(port: int, path: str, proc: Any, t0: float) -> float:
    """Poll until GET path answers 200; -> seconds since t0. ``proc`` has ``poll()``."""
    return poll_200(port, path, t0, alive=lambda: proc.poll() is None, limit=DEADLINE)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def spawn_to_200(
    argv_for_port: Callable[[int], list[str]],
    path: str,
    env: dict[str, str],
    cwd: str | None = None,
) -> float:
    port = free_port()
    argv = argv_for_port(port)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        env={**env, "PORT": str(port)},
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        return first_200(port, path, proc, t0)
    finally:
        stop(proc)


class _Forked:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def fork_to_200(server: Any, env: dict[str, str]) -> float:
    """fork() a process that already imported the runtime and the handler -> first 200
    (what a pre-warmed parent, a "zygote", would give the process driver)."""
    port = free_port()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.environ.update({**env, "PORT": str(port)})
            code = server.main(t0=time.perf_counter())
        finally:
            os._exit(code)
    child = _Forked(pid)
    try:
        return first_200(port, "/?name=bench", child, t0)
    finally:
        if child.poll() is None:
            os.kill(pid, signal.SIGTERM)
            _, status = os.waitpid(pid, 0)


def load_warm_runtime(env: dict[str, str]) -> Any:
    """Import server.py and the hello handler into this process (the zygote's state)."""
    spec = importlib.util.spec_from_file_location("torpor_runtime_bench", SERVER)
    assert spec is not None and spec.loader is not None
    server = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = server
    spec.loader.exec_module(server)
    sys.modules["torpor_runtime"] = server
    sys.path.insert(0, env["TORPOR_DIR"])
    server.load_handler("handler:handle")
    return server


def run_to_exit(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


def summary(samples: list[float]) -> tuple[float, float]:
    ms = sorted(s * 1000 for s in samples)
    p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
    return statistics.median(ms), p90


def importtime(python: str, env: dict[str, str]) -> list[tuple[str, int, int, int]]:
    """-> [(module, self us, cumulative us, depth)] for one runtime start."""
    port = free_port()
    proc = subprocess.Popen(
        [python, "-X", "importtime", str(SERVER)],
        env={**env, "PORT": str(port)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        first_200(port, "/?name=x", proc, time.perf_counter())  # includes first-request imports
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    rows = []
    for line in err.decode().splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append((m.group(4), int(m.group(1)), int(m.group(2)), len(m.group(3)) // 2))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    default_python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    ap.add_argument("--python", default=default_python)
    args = ap.parse_args()
    py = args.python
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    rt_env = {**base_env, "TORPOR_HOST": "127.0.0.1", "TORPOR_DIR": str(HELLO), "GREETING": "hello"}

    with tempfile.TemporaryDirectory() as tmp:
        # the runtime as an importable, precompiled module (what `compileall` in an image gives)
        shutil.copy(SERVER, Path(tmp) / "server.py")
        subprocess.run([py, "-m", "compileall", "-q", tmp], check=True)
        # bytecode for hello too, so that no contender pays the handler's compile
        subprocess.run([py, "-m", "compileall", "-q", str(HELLO)], check=True)
        static = Path(tmp) / "static"
        static.mkdir()
        (static / "index.html").write_text("hello\n")

        warm = load_warm_runtime(rt_env)
        contenders: dict[str, Callable[[], float]] = {
            "runtime (hello, GET /)": lambda: spawn_to_200(
                lambda p: [py, str(SERVER)], "/?name=bench", rt_env
            ),
            "runtime (health probe)": lambda: spawn_to_200(
                lambda p: [py, str(SERVER)], "/_torpor/health", rt_env
            ),
            "runtime (.pyc, GET /)": lambda: spawn_to_200(
                lambda p: [py, "-c", "import sys, server; sys.exit(server.main())"],
                "/?name=bench",
                {**rt_env, "PYTHONPATH": tmp},
            ),
            "python3 -m http.server": lambda: spawn_to_200(
                lambda p: [
                    py,
                    "-m",
                    "http.server",
                    str(p),
                    "--bind",
                    "127.0.0.1",
                    "--directory",
                    str(static),
                ],
                "/",
                base_env,
            ),
            "runtime (fork of a warm parent)*": lambda: fork_to_200(warm, rt_env),
            "python3 -c pass (exit)": lambda: run_to_exit([py, "-c", "pass"]),
            "python3 -c 'import asyncio' (exit)": lambda: run_to_exit([py, "-c", "import asyncio"]),
        }
        for fn in contenders.values():  # warm the page cache
            fn()
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.runs):  # interleaved, so that drift hits every contender alike
            for name, fn in contenders.items():
                samples[name].append(fn())

        src = SERVER.read_text()
        t0 = time.perf_counter()
        for _ in range(20):
            compile(src, str(SERVER), "exec")
        compile_ms = (time.perf_counter() - t0) / 20 * 1000

    version = subprocess.run([py, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"spawn -> first 200, {args.runs} runs each, {version} ({py}), {os.cpu_count()} cpus")
    print(f"{'':38} {'median ms':>10} {'p90 ms':>8}")
    results = {name: summary(s) for name, s in samples.items()}
    for name, (med, p90) in results.items():
        print(f"{name:38} {med:10.1f} {p90:8.1f}")
    rt = results["runtime (hello, GET /)"][0]
    base = results["python3 -m http.server"][0]
    print(f"runtime / http.server (median): {rt / base:.2f}x")
    print(f"* forked from this benchmark's own interpreter ({sys.executable})")
    print(f"compiling server.py (paid by `python3 server.py` each start): {compile_ms:.1f} ms")

    rows = importtime(py, rt_env)
    total_self = sum(r[1] for r in rows)
    print(
        f"\n-X importtime, one runtime start + first request: {len(rows)} modules, "
        f"sum of self times {total_self / 1000:.1f} ms"
    )
    top = sorted((r for r in rows if r[3] == 0), key=lambda r: -r[2])[:12]
    print(f"{'top-level import':30} {'cumulative ms':>14}")
    for name, _self, cum, _depth in top:
        print(f"{name:30} {cum / 1000:14.1f}")
    print(f"{'(sum of the above)':30} {sum(r[2] for r in top) / 1000:14.1f}")
    biggest = sorted(rows, key=lambda r: -r[1])[:8]
    print("largest self times: " + ", ".join(f"{n} {s / 1000:.1f}" for n, s, _c, _d in biggest))


if __name__ == "__main__":
    main()

"""Run a platform component as if on its own host: in its own mount namespace, with a
private tmpfs over its state dir, so no other component can read what it keeps there.

``unshare -m --propagation private`` gives the process a mount namespace of its own (a
copy of the host's, mounts no longer shared back); ``mount -t tmpfs`` then covers its
state dir with an empty file system that exists in that namespace only. Every other
process, the other components and the test included, still sees the (empty) directory of
the host underneath. Needs root (CAP_SYS_ADMIN), as in CI; ``available()`` says whether
this machine allows it, so tests can skip with a reason.

Used by the distributed drills (tests/integration/test_sources.py, the fail-over drills).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

# $1: the state dir; the rest: the command. The tmpfs is 0700 like a state dir of `up`.
_SCRIPT = (
    'set -e; dir="$1"; shift; mount -t tmpfs -o mode=0700,size=1g torpor-state "$dir"; exec "$@"'
)


def available() -> str | None:
    """None if components can be isolated here, else why not."""
    if os.geteuid() != 0:
        return "needs root to mount a private tmpfs in a new mount namespace"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = tempfile.mkdtemp(prefix="torpor-isolation-probe-")
    try:
        r = subprocess.run(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"mount -t tmpfs torpor-probe {probe} 2>&1",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare failed: {e}"
    finally:
        os.rmdir(probe)
    if r.returncode != 0:
        return (
            f"cannot mount a tmpfs in a new mount namespace: {(r.stdout + r.stderr).strip()[:200]}"
        )
    return None


def isolated_command(state_dir: Path, argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped to run in its own mount namespace over a private ``state_dir``."""
    return [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        _SCRIPT,
        "torpor-isolated",
        str(state_dir),
        *argv,
    ]


def spawn(
    state_dir: Path, torpor_args: Sequence[str], log: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``python -m torpor.cli.main TORPOR_ARGS`` isolated over ``state_dir`` (created
    on the host, empty, as the mount point), output appended to ``log``. The process is the
    component itself (``unshare`` and ``sh`` exec into it), so signals reach it directly.
    ``--state-dir STATE_DIR`` is added to the arguments."""
    state_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "torpor.cli.main", *torpor_args, "--state-dir", str(state_dir)]
    with open(log, "ab") as f:
        return subprocess.Popen(
            isolated_command(state_dir, argv),
            stdout=f,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode

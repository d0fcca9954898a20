"""A function's ``requirements.txt``: validated, then installed by pip from the package
index as binary wheels only. Shared by both drivers (and the API checks uploads with
``parse_requirements`` at deploy time).

pip runs on the host, as the platform's user, so nothing from the upload may reach it:

- every line is a PEP 508 requirement from the index: a name with optional extras,
  version specifiers and markers (``requests[socks]>=2.31; python_version >= "3.10"``),
  nothing else. File names (``p-1.0.tar.gz``), paths, URLs, direct references
  (``name @ URL``), pip options (``-e``, ``-r``, ``--index-url``, ``--hash``...) and
  ``${VAR}`` are refused with :class:`RequirementsError`, naming the line;
- pip never sees the file: the requirements are re-serialised from the parsed form
  and passed as arguments after ``--``;
- pip runs ``python -I -m pip install --isolated --only-binary=:all:`` from an empty
  directory of its own, with a scrubbed environment: no pip configuration, no
  ``PIP_*``/``PYTHON*`` variables, the upload's folder is neither its working
  directory nor on ``sys.path``, and no sdist is ever built.

Operator settings (the platform's environment, never the upload's): ``TORPOR_PIP_INDEX_URL``
(another index, e.g. a mirror) and the proxy/CA variables in ``PASSED_ENV``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from torpor.drivers.base import BuildError

FILE = "requirements.txt"
MAX_FILE = 128 * 1024  # bytes of requirements.txt
MAX_LINE = 1000  # characters of one logical line (after joining continuations)
TIMEOUT = 900.0  # seconds for one pip install
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Operator settings pip may still see: how to reach the index, never what to install.
PASSED_ENV = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)
EXPECTED = (
    "a package name with optional [extras], version and ; markers (PEP 508), "
    'e.g. requests[socks]>=2.31; python_version >= "3.10"'
)
# File names pip would open instead of asking the index (pip's ARCHIVE_EXTENSIONS, .egg).
_ARCHIVE_SUFFIXES = (
    ".whl",
    ".zip",
    ".tar",
    ".tar.gz",
    ".tgz",
    ".tar.bz2",
    ".tbz",
    ".tbz2",
    ".tar.xz",
    ".txz",
    ".tlz",
    ".tar.lz",
    ".tar.lzma",
    ".egg",
)
_COMMENT = re.compile(r"(^|\s+)#.*$")
_OPTION = re.compile(r"(^|\s)(--?[A-Za-z][\w-]*)")


class RequirementsError(BuildError):
    """A line of requirements.txt is refused; ``line`` is its 1-based number."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"{FILE}:{line}: {message}")
        self.line = line
        self.field = f"{FILE}:{line}"


@dataclass(frozen=True)
class Line:
    number: int  # first physical line
    text: str  # joined, comment stripped, whitespace trimmed


def logical_lines(text: str) -> list[Line]:
    """Physical lines joined at a trailing backslash (as pip does), comments removed,
    blank lines dropped; each carries the number of its first physical line."""
    out: list[Line] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        if not buf:
            start = n
        if raw.endswith("\\"):
            buf.append(raw[:-1])
            continue
        buf.append(raw)
        joined = _COMMENT.sub("", " ".join(buf)).strip()
        buf = []
        if joined:
            out.append(Line(start, joined))
    if buf:
        joined = _COMMENT.sub("", " ".join(buf)).strip()
        if joined:
            out.append(Line(start, joined))
    return out


def _shown(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def parse_line(line: Line) -> str:
    """The requirement of one logical line, re-serialised by ``packaging`` (what pip
    gets); raises :class:`RequirementsError` naming the line and what was expected."""
    text = line.text

    def refuse(why: str) -> RequirementsError:
        return RequirementsError(line.number, f"{_shown(text)}: {why}; expected {EXPECTED}")

    if len(text) > MAX_LINE:
        raise RequirementsError(line.number, f"line longer than {MAX_LINE} characters")
    if "${" in text:
        raise refuse("environment variables (${...}) are not expanded")
    if opt := _OPTION.search(text):
        raise refuse(f"pip options are not accepted ({opt.group(2)}), --hash included")
    name_part = text.split(";", 1)[0]
    if "://" in text:
        raise refuse("URLs are not accepted: name a package from the index")
    if name_part.startswith((".", "/", "~")) or "/" in name_part or "\\" in name_part:
        raise refuse("paths are not accepted: files in the upload are never installed")
    try:
        req = Requirement(text)
    except InvalidRequirement as e:
        first = str(e).splitlines()[0] if str(e) else "not a valid requirement"
        raise refuse(f"not a valid requirement ({first})") from None
    if req.url:
        raise refuse(
            "direct references (name @ URL) are not accepted: name a package from the index"
        )
    if req.name.lower().endswith(_ARCHIVE_SUFFIXES):
        raise refuse("a file name, not a package name: files in the upload are never installed")
    return str(req)


def parse_requirements(text: str) -> list[str]:
    """Every requirement of a requirements.txt, validated (see the module docstring)."""
    return [parse_line(line) for line in logical_lines(text)]


def read_requirements(folder: str | os.PathLike[str]) -> list[str] | None:
    """The validated requirements of ``folder/requirements.txt``; None if there is no
    such file (or it names nothing). Refuses a file that is not a regular one, over
    ``MAX_FILE`` bytes, or not UTF-8."""
    path = Path(folder) / FILE
    if not os.path.lexists(path):
        return None
    if path.is_symlink() or not path.is_file():
        raise RequirementsError(1, "not a regular file (links are not followed)")
    with open(path, "rb") as f:
        data = f.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise RequirementsError(1, f"the file is over {MAX_FILE // 1024} KiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RequirementsError(line, "not UTF-8 text") from None
    return parse_requirements(text) or None


def pip_command(
    requirements: Sequence[str],
    target: Path,
    *,
    python: str = sys.executable,
    python_version: str | None = None,
    cache_dir: Path | None = None,
) -> list[str]:
    """The pip command line: wheels only, no configuration read, requirements after ``--``."""
    cmd = [
        python,
        "-I",
        "-m",
        "pip",
        "install",
        "--isolated",
        "--no-input",
        "--disable-pip-version-check",
        "--no-warn-script-location",
        "--progress-bar",
        "off",
        "--only-binary=:all:",
        "--target",
        str(target),
    ]
    cmd += ["--cache-dir", str(cache_dir)] if cache_dir is not None else ["--no-cache-dir"]
    if python_version:
        cmd += ["--python-version", python_version]  # wheels for the image's interpreter
    index = os.environ.get("TORPOR_PIP_INDEX_URL")
    if index:
        cmd += ["--index-url", index]
    for req in requirements:  # the output of parse_line; checked again for safety
        if not req or req.startswith("-"):
            raise BuildError(f"refusing to pass {req!r} to pip")
    return [*cmd, "--", *requirements]


def pip_env(home: Path) -> dict[str, str]:
    """The scrubbed environment pip runs in."""
    env = {
        "PATH": PATH,
        "HOME": str(home),
        "TMPDIR": str(home),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }
    env.update({k: os.environ[k] for k in PASSED_ENV if k in os.environ})
    return env


def _tail(lines: Sequence[str], n: int = 8) -> str:
    kept = [line for line in lines if line.strip()]
    return "\n".join(kept[-n:])


def install(
    requirements: Sequence[str],
    target: Path,
    *,
    python: str = sys.executable,
    python_version: str | None = None,
    cache_dir: Path | None = None,
    say: Callable[[str], None] | None = None,
    timeout: float = TIMEOUT,
) -> None:
    """``pip install --target target`` of already validated ``requirements`` (from
    :func:`parse_requirements`); each output line goes to ``say``. Blocking (run it in
    a worker thread). Raises BuildError with pip's last lines on failure."""
    if not requirements:
        return
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise BuildError(f"{target.name} must be a folder of the function, not a link or a file")
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="torpor-pip-") as work:
        home, cwd = Path(work) / "home", Path(work) / "empty"
        home.mkdir()
        cwd.mkdir()
        cmd = pip_command(
            requirements, target, python=python, python_version=python_version, cache_dir=cache_dir
        )
        lines: list[str] = []
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=pip_env(home),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
            )
        except OSError as e:
            raise BuildError(f"cannot run pip ({python}): {e}") from e
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip()
                lines.append(line)
                del lines[:-200]
                if say is not None:
                    say(line)
            code = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if code != 0:
            why = f"timed out after {timeout:g}s" if timed_out.is_set() else f"exit {code}"
            raise BuildError(f"pip install -r requirements.txt failed ({why}):\n{_tail(lines)}")

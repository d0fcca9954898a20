"""The control API's bearer token: where it lives, generating it, reading it.

Standard library only: both ``torpor up`` and the CLI import it.

- The state directory is ``--state-dir``, else ``$TORPOR_STATE_DIR``, else
  ``$XDG_DATA_HOME/torpor`` (``~/.local/share/torpor``): :func:`default_state_dir`.
- The server's token is ``$TORPOR_TOKEN``, else the contents of ``--token-file``, else
  ``STATE_DIR/token``, generated at first start (:func:`load_or_create`): 32 random bytes
  (``secrets.token_urlsafe``), the file created ``0600`` with ``O_EXCL`` and linked into
  place, so it is never readable by another user, not even for an instant, and a reader
  never sees it half-written. The directory is created ``0700`` if missing.
- The CLI sends ``$TORPOR_TOKEN``, else ``STATE_DIR/token`` (:func:`client_token`).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

TOKEN_FILE = "token"
MIN_LENGTH = 16


class TokenError(Exception):
    """A token that cannot be used (one line for the user)."""


def default_state_dir() -> Path:
    """``$TORPOR_STATE_DIR``, else ``$XDG_DATA_HOME/torpor``, else ``~/.local/share/torpor``."""
    env = os.environ.get("TORPOR_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "torpor"


def token_path(state_dir: Path) -> Path:
    return state_dir / TOKEN_FILE


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # for messages: "TORPOR_TOKEN", "--token-file F", or the path of STATE_DIR/token
    generated: bool = False

    def __repr__(self) -> str:  # never show the value
        return f"Token(source={self.source!r}, generated={self.generated})"


def _check(value: str, where: str) -> str:
    value = value.strip()
    if not value:
        raise TokenError(f"{where} is empty")
    if len(value) < MIN_LENGTH:
        raise TokenError(f"the API token ({where}) must be at least {MIN_LENGTH} characters")
    return value


def given_token(token_file: str | None) -> Token | None:
    """The token the operator gave: ``$TORPOR_TOKEN`` (it overrides), else ``--token-file``."""
    env = os.environ.get("TORPOR_TOKEN")
    if env:
        return Token(_check(env, "TORPOR_TOKEN"), "TORPOR_TOKEN")
    if token_file:
        try:
            text = Path(token_file).read_text()
        except OSError as e:
            raise TokenError(f"--token-file {token_file}: {e.strerror}") from e
        return Token(_check(text, f"--token-file {token_file}"), f"--token-file {token_file}")
    return None


def _read_own(path: Path) -> str:
    """The token in ``path``, which must be a regular file of this user's that no one else can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise TokenError(f"{path} is a symlink; expected a regular file") from e
        raise TokenError(f"{path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TokenError(f"{path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise TokenError(
                f"{path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()})"
            )
        if st.st_mode & 0o077:
            raise TokenError(
                f"{path} is readable by other users (mode {stat.S_IMODE(st.st_mode):04o}): "
                f"chmod 600 {path}, or delete it to get a new token"
            )
        with os.fdopen(fd, "r", closefd=False) as f:
            text = f.read()
    finally:
        os.close(fd)
    return _check(text, str(path))


def load_or_create(state_dir: Path) -> Token:
    """``STATE_DIR/token``, created with a fresh random token if it does not exist.

    Safe against a concurrent first start in the same directory: the loser of the race
    reads the winner's token. Raises :class:`TokenError` for a file another user could
    read, or one that is not ours.
    """
    path = token_path(state_dir)
    if not state_dir.exists():
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        return Token(_read_own(path), str(path))
    except TokenError:
        if os.path.lexists(path):
            raise
    value = secrets.token_urlsafe(32)
    tmp = state_dir / f".{TOKEN_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask, and never wider
        os.write(fd, (value + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and fails if another process got there first
    except FileExistsError:
        return Token(_read_own(path), str(path))
    finally:
        os.unlink(tmp)
    return Token(value, str(path), generated=True)


def client_token(state_dir: Path) -> str | None:
    """What the CLI sends: ``$TORPOR_TOKEN``, else ``STATE_DIR/token`` if this user can read it."""
    env = os.environ.get("TORPOR_TOKEN")
    if env:
        return env.strip()
    try:
        return token_path(state_dir).read_text().strip() or None
    except OSError:
        return None

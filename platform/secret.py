"""Secrets: named values that reach a function's replicas as env, and nothing else.

A spec maps env names to secret names (``secrets: {DB_PASSWORD: db-password}``); the
values live in the store apart from the function documents (``Store.put_secret``).
The controller resolves them right before a replica starts (:func:`resolve`) and
hands them to the driver; no record, event, message, log line or error of Torpor
ever holds a value. A changed value takes effect for replicas started afterwards:
running replicas keep the env they started with (as with Kubernetes env from a
Secret).

Values are UTF-8 text without NUL characters (an environment variable cannot hold
other bytes portably, and the Docker API carries env as JSON strings), 1 byte to
``MAX_VALUE`` bytes. Every message here names secrets and env variables, never a
value.

Imports nothing of Torpor but the model and the Store protocol.
"""

from __future__ import annotations

from collections.abc import Iterable

from torpor.model import Function, Spec
from torpor.store.base import Store

__all__ = [
    "MAX_VALUE",
    "MissingSecret",
    "SecretValueError",
    "check_value",
    "redact",
    "resolve",
    "users",
]

MAX_VALUE = 64 * 1024  # bytes
MIN_REDACTED = (
    4  # values shorter than this are not searched for in text (they would match everywhere)
)


class SecretValueError(ValueError):
    """A value that cannot be a secret; the message says why without quoting it."""


class MissingSecret(Exception):
    """A spec names a secret that does not exist (the message names both names)."""

    def __init__(self, env: str, name: str) -> None:
        self.env, self.name = env, name
        super().__init__(
            f"secret {name!r} (for {env}) does not exist; set it with `torpor secret set {name}`"
        )


def check_value(value: bytes) -> str:
    """The value as text, or SecretValueError naming the problem (never the value)."""
    if not value:
        raise SecretValueError("value: empty; a secret needs at least one byte")
    if len(value) > MAX_VALUE:
        raise SecretValueError(f"value: {len(value)} bytes, over the {MAX_VALUE // 1024} KiB cap")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SecretValueError(f"value: not valid UTF-8 (at byte {e.start})") from None
    nul = text.find("\x00")
    if nul >= 0:
        raise SecretValueError(
            f"value: holds a NUL character (at character {nul}), "
            "which an environment variable cannot carry"
        )
    return text


async def resolve(store: Store, spec: Spec) -> dict[str, str]:
    """The env a replica of ``spec`` gets from its secrets: ``{ENV_NAME: value}``.

    Raises MissingSecret for the first (in env-name order) secret that does not
    exist, SecretValueError (naming the secret) for a stored value that is not text.
    """
    env: dict[str, str] = {}
    for env_name in sorted(spec.secrets):
        name = spec.secrets[env_name]
        value = await store.get_secret(name)
        if value is None:
            raise MissingSecret(env_name, name)
        try:
            env[env_name] = check_value(value)
        except SecretValueError as e:
            raise SecretValueError(f"secret {name!r} (for {env_name}): {e}") from None
    return env


def users(functions: Iterable[Function]) -> dict[str, list[str]]:
    """Secret name -> sorted names of the functions that use it: those whose newest
    revision, or a revision in their traffic table (a percent or a tag), names it."""
    out: dict[str, set[str]] = {}
    for fn in functions:
        routed = set(fn.routed())
        latest = fn.latest()
        for rev in fn.revisions:
            if rev is latest or rev.name in routed:
                for name in rev.spec.secrets.values():
                    out.setdefault(name, set()).add(fn.name)
    return {name: sorted(fns) for name, fns in out.items()}


def redact(text: str, values: Iterable[str]) -> str:
    """``text`` with every occurrence of each value (of at least ``MIN_REDACTED``
    characters) replaced by ``***``: for text Torpor shows that may quote a replica's
    output or a driver's error."""
    for value in sorted(set(values), key=len, reverse=True):
        if len(value) >= MIN_REDACTED:
            text = text.replace(value, "***")
    return text

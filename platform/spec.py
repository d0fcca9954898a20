"""Parse and validate a function's ``torpor.yaml`` into a :class:`torpor.model.Spec`.

Every refusal is a :class:`SpecError` naming the field's path (``scale.max``,
``env.GREETING``, ``rollout.steps[2]``) and what was expected, so that ``torpor deploy``
can print one precise line. Values echoed back in messages are truncated.

Conventions:

- A key whose value is null (``port:`` with nothing after it) is treated as absent and
  takes its default; a null *section* (``scale:`` with every line commented out) is an
  empty section. ``name`` is still required.
- Integers must be real integers: booleans are refused, floats only when whole (``8.0``).
- Durations are numbers of seconds or strings such as ``500ms``, ``30s``, ``2m``,
  ``1h``, ``1m30s``, ``1.5s`` (units h, m, s, ms, largest first, each at most once).
- Sizes are numbers of bytes or strings with a binary (``Ki Mi Gi Ti``) or decimal
  (``k M G T``) suffix: ``256Mi``, ``1G``, ``100k``.
- Every number is finite and bounded. NaN, infinities (YAML ``.nan``, ``.inf``), floats
  that overflow, integers with hundreds of digits and booleans where a number is expected
  are refused with the field's path, like any value out of range.

The bounds (the constants below; the control API applies the same ones):

=========================  ===================================================
field                      accepted
=========================  ===================================================
``port``                   integer 1..65535
``timeout``                duration, 0 < t <= 600s (``MAX_TIMEOUT``); for a
                           streamed response: the time to its first byte
``stream_idle``            duration, 0 < t <= 1h (``MAX_STREAM_IDLE``; default
                           60s): silence between chunks of a streamed response
``max_connection``         duration, 0 < t <= 24h (``MAX_CONNECTION``; default
                           1h): how long one WebSocket may stay open
``websocket``              ``module:function``, with ``handler`` only (not
                           ``image``): the WebSocket handler of a source build
``scale.min``              integer 0..1000 (``MAX_SCALE``), <= ``scale.max``
``scale.max``              integer 1..1000, >= ``scale.min``; and at most the
                           platform's cap (``torpor up --max-replicas``) when
                           the deploy names one: above it is refused, an
                           omitted ``max`` takes min(20, cap)
``scale.target``           number, 0 < target <= 10000 (``MAX_TARGET``)
``scale.concurrency``      integer 0..10000 (``MAX_CONCURRENCY``; 0 = no limit)
``scale.idle``             duration 0..24h (``MAX_IDLE``)
``scale.window``           duration 6s..1h (``MIN_WINDOW``, ``MAX_WINDOW``)
``scale.panic_window``     percent of scale.window, 1..100 (default 10)
``scale.panic_threshold``  percent of ready replicas, 110..1000 (default 200)
``resources.cpu``          1m..64 CPUs (``MIN_CPU``, ``MAX_CPU``) in whole
                           millicores: 0.5, 2, "250m" (not 0.0005)
``resources.memory``       size 16Mi..64Gi (``MIN_MEMORY``, ``MAX_MEMORY``)
``rollout.steps``          1..100 percents, strictly increasing, ending at 100
``rollout.interval``       duration, 0 < interval <= 24h (``MAX_INTERVAL``)
``rollout.max_error_ratio`` number 0..1
``rollout.max_p95_ratio``  number 1..1000 (``MAX_P95_RATIO``)
``rollout.min_requests``   integer 0..1000000 (``MAX_MIN_REQUESTS``)
``handler_style``          ``torpor`` (default) or ``openfaas``; source functions only
``command`` / ``args``     lists of at most 256 strings of at most 4096
                           characters; ``image:`` functions only
``labels``                 at most 64 Kubernetes-style labels (key
                           ``[prefix/]name``, value <= 63 characters); no
                           ``torpor.`` keys
``async.concurrency``      integer 1..1000 (``MAX_ASYNC_CONCURRENCY``; default 10)
``async.max_attempts``     integer 1..20 (``MAX_ASYNC_ATTEMPTS``; default 3)
=========================  ===================================================

Imports nothing of Torpor except :mod:`torpor.model`.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import keyword
import math
import re
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import yaml

from torpor.model import AsyncPolicy, Resources, RolloutPolicy, Scale, Spec

__all__ = [
    "SpecError",
    "format_duration",
    "format_size",
    "load_spec",
    "parse_duration",
    "parse_size",
    "parse_spec",
    "spec_to_yaml_dict",
    "validate_name",
    "validate_secret_name",
    "validate_tag",
]

SPEC_FILES = ("torpor.yaml", "torpor.yml")
MAX_SPEC_BYTES = 1024 * 1024  # a torpor.yaml larger than this is refused unread

# -- bounds: the one table of every number a spec (and the API) accepts; see the docstring
MAX_TIMEOUT = 600.0  # timeout: (0, 600s]
MAX_SCALE = 1000  # scale.min / scale.max: 0..1000
MAX_TARGET = 10_000.0  # scale.target: (0, 10000]
MAX_CONCURRENCY = 10_000  # scale.concurrency: 0..10000
MAX_IDLE = 86_400.0  # scale.idle: 0..24h
MIN_WINDOW = 6.0  # scale.window: 6s..1h
MAX_WINDOW = 3600.0
MIN_CPU = 0.001  # resources.cpu: 1m..64, whole millicores
MAX_CPU = 64.0
MIN_MEMORY = 16 * 1024 * 1024  # resources.memory: 16Mi..64Gi
MAX_MEMORY = 64 * 1024**3
MAX_INTERVAL = 86_400.0  # rollout.interval: (0, 24h]
MAX_P95_RATIO = 1000.0  # rollout.max_p95_ratio: 1..1000
MAX_MIN_REQUESTS = 1_000_000  # rollout.min_requests: 0..10^6
RESERVED_ENV = frozenset({"PORT"})  # set by Torpor from `port`
CONTRACT_ENV = frozenset(
    {"K_SERVICE", "K_CONFIGURATION", "K_REVISION"}
)  # set by Torpor in every replica

MAX_ASYNC_CONCURRENCY = 1000  # async.concurrency: 1..1000 calls running at once
MAX_ASYNC_ATTEMPTS = 20  # async.max_attempts: 1..20
MAX_BODY = 1024**3  # `max_body` is at most 1Gi (larger bodies stream through the gateway)
MAX_STREAM_IDLE = 3600.0  # stream_idle: (0, 1h]
MAX_CONNECTION = 86_400.0  # max_connection: (0, 24h]

TOP_KEYS = (
    "name",
    "handler",
    "image",
    "env",
    "port",
    "timeout",
    "max_body",
    "scale",
    "resources",
    "rollout",
    "secrets",
    "handler_style",
    "command",
    "args",
    "labels",
    "stream_idle",
    "max_connection",
    "websocket",
    "async",
)
SCALE_KEYS = (
    "min",
    "max",
    "target",
    "concurrency",
    "idle",
    "window",
    "panic_window",
    "panic_threshold",
)
HANDLER_STYLES = (
    "torpor",
    "openfaas",
)  # handle(request) / OpenFaaS python3-http handle(event, context)
MAX_ARGV = 256  # command: / args: items
MAX_ARG_CHARS = 4096  # characters per item
MAX_LABELS = 64
RESOURCES_KEYS = ("cpu", "memory")
ASYNC_KEYS = ("concurrency", "max_attempts")
ROLLOUT_KEYS = ("steps", "interval", "max_error_ratio", "max_p95_ratio", "min_requests")

_MAX_SHOWN = 60
_MISSING: Any = object()
_N = TypeVar("_N", int, float)


class SpecError(ValueError):
    """A refused spec. ``path`` names the field ("" for the whole document), ``expected``
    says in words what would have been accepted.

    ``str(err)`` is ``"<path>: expected <expected>, got <value>"`` (or
    ``"<path>: <problem>; expected <expected>"``); for path "" the prefix is ``source``
    (the file name) when known. ``source`` and ``line`` are set where they are known.
    """

    def __init__(
        self,
        path: str,
        expected: str,
        got: Any = _MISSING,
        *,
        problem: str | None = None,
        source: str | None = None,
        line: int | None = None,
    ) -> None:
        self.path = path
        self.expected = expected
        self.got: str | None = None if got is _MISSING else describe(got)
        self.problem = problem
        self.source = source
        self.line = line
        super().__init__(self._message())

    def _message(self) -> str:
        if self.problem is not None:
            body = f"{self.problem}; expected {self.expected}"
        elif self.got is not None:
            body = f"expected {self.expected}, got {self.got}"
        else:
            body = f"expected {self.expected}"
        prefix = self.path or self.source
        return f"{prefix}: {body}" if prefix else body


def _truncate(text: str, limit: int = _MAX_SHOWN) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: Any) -> str:
    """A short, YAML-flavoured description of a user value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if value.bit_length() > 190:  # ~57 digits; also avoids int->str digit limits
            return "a very large integer"
        return str(value)
    if isinstance(value, float):
        return _truncate(repr(value))
    if isinstance(value, str):
        return _truncate(repr(value))
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, _dt.datetime):
        return "a timestamp"
    if isinstance(value, _dt.date):
        return "a date"
    return f"a {type(value).__name__}"


def _key_text(key: Any) -> str:
    """A key as it appears in a path: plain when simple, quoted (and short) otherwise."""
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return _truncate(key)
    if isinstance(key, str):
        return _truncate(repr(key))
    return describe(key)


def _join(path: str, key: Any) -> str:
    return f"{path}.{_key_text(key)}" if path else _key_text(key)


# --- numbers ----------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_int(value: Any, path: str, expected: str) -> int:
    if isinstance(value, bool):
        raise SpecError(path, expected, value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise SpecError(path, expected, value)


def _as_float(value: Any, path: str, expected: str) -> float:
    if not _is_number(value):
        raise SpecError(path, expected, value)
    try:
        result = float(value)
    except OverflowError:  # an int too large for a float
        raise SpecError(path, expected, value) from None
    if not math.isfinite(result):
        raise SpecError(path, expected, value)
    return result


def _within(
    number: _N, value: Any, path: str, words: str, low: float, high: float, *, above: bool = False
) -> _N:
    """``number`` (read from the user's ``value``) if ``low <= number <= high`` (``low <
    number`` with ``above``); else SpecError naming ``path``, the bound in ``words`` and the
    value. NaN is outside every bound."""
    inside_low = low < number if above else low <= number
    if not (inside_low and number <= high):
        raise SpecError(path, words, value)
    return number


@overload
def _bounded(
    value: Any,
    path: str,
    words: str,
    low: float,
    high: float,
    *,
    integer: Literal[True],
    above: bool = False,
) -> int: ...
@overload
def _bounded(
    value: Any,
    path: str,
    words: str,
    low: float,
    high: float,
    *,
    integer: Literal[False] = False,
    above: bool = False,
) -> float: ...
def _bounded(
    value: Any,
    path: str,
    words: str,
    low: float,
    high: float,
    *,
    integer: bool = False,
    above: bool = False,
) -> float:
    """A number from the hostile ``value``, bounded: an integer (a whole float such as
    ``2.0`` counts) with ``integer``, else a finite number; then :func:`_within` the
    bounds. Booleans, strings, NaN, infinity and out-of-range values are refused with the
    same ``words``, which say the bound."""
    number = _as_int(value, path, words) if integer else _as_float(value, path, words)
    return _within(number, value, path, words, low, high, above=above)


# --- durations --------------------------------------------------------------------------

_NUM = r"(\d+(?:\.\d+)?)"
_DURATION_RE = re.compile(
    rf"(?:{_NUM}h)?(?:{_NUM}m(?!s))?(?:{_NUM}s)?(?:{_NUM}ms)?",
    re.ASCII,
)
_DURATION_WORDS = (
    'a duration such as "30s", "500ms", "2m", "1h" or "1m30s" (or a number of seconds)'
)


def parse_duration(value: Any, path: str) -> float:
    """Seconds from a number of seconds or a string like "500ms", "1m30s", "1.5s".

    Refuses booleans, negatives, NaN/infinity, empty strings and anything else.
    """
    expected = "a non-negative " + _DURATION_WORDS.removeprefix("a ")
    if _is_number(value):
        seconds = _as_float(value, path, expected)
        if seconds < 0:
            raise SpecError(path, expected, value)
        return seconds
    if not isinstance(value, str):
        raise SpecError(path, expected, value)
    text = value.strip()
    match = _DURATION_RE.fullmatch(text) if len(text) <= 100 else None
    if not text or match is None or not any(match.groups()):
        raise SpecError(path, expected, value)
    h, m, s, ms = (float(g) if g else 0.0 for g in match.groups())
    seconds = h * 3600 + m * 60 + s + ms / 1000
    if not math.isfinite(seconds):
        raise SpecError(path, expected, value)
    return seconds


def format_duration(seconds: float) -> str | float:
    """A duration string ("30s", "1m30s", "500ms") that parses back to exactly ``seconds``;
    the number itself when no such short string exists."""
    candidates: list[str] = []
    if float(seconds).is_integer() and seconds >= 0:
        whole = int(seconds)
        h, rest = divmod(whole, 3600)
        m, s = divmod(rest, 60)
        text = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s or not whole else "")
        candidates.append(text)
    elif 0 < seconds < 1 and float(seconds * 1000).is_integer():
        candidates.append(f"{int(seconds * 1000)}ms")
    if math.isfinite(seconds) and seconds >= 0:
        candidates.append(f"{seconds!r}s")
    for text in candidates:
        try:
            if parse_duration(text, "") == seconds:
                return text
        except SpecError:
            continue
    return seconds


# --- sizes ------------------------------------------------------------------------------

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|K|M|G|T)?", re.ASCII)
_SIZE_WORDS = 'a size such as "256Mi", "1Gi", "512Ki", "128M" or "100k" (or a number of bytes)'


def parse_size(value: Any, path: str) -> int:
    """Bytes from a whole number of bytes or a string like "256Mi", "1G", "100k"."""
    expected = "a non-negative " + _SIZE_WORDS.removeprefix("a ")
    if _is_number(value):
        size = _as_int(value, path, expected)
        if size < 0:
            raise SpecError(path, expected, value)
        return size
    if not isinstance(value, str):
        raise SpecError(path, expected, value)
    text = value.strip()
    match = _SIZE_RE.fullmatch(text) if len(text) <= 100 else None
    if match is None:
        raise SpecError(path, expected, value)
    number, unit = match.group(1), match.group(2) or ""
    exact = Fraction(number) * _SIZE_UNITS[unit]
    if exact.denominator != 1:
        raise SpecError(path, "a whole number of bytes", value)
    return int(exact)


def format_size(size: int) -> str | int:
    """The largest binary unit that divides ``size`` exactly ("256Mi"); bytes otherwise."""
    if size > 0:
        for unit in ("Ti", "Gi", "Mi", "Ki"):
            factor = _SIZE_UNITS[unit]
            if size % factor == 0:
                return f"{size // factor}{unit}"
    return size


def _parse_cpu(value: Any, path: str) -> float:
    expected = (
        "a number of CPUs from 0.001 to 64 in whole millicores, such as 0.5 or 2, "
        'or millicores such as "500m"'
    )
    if isinstance(value, str):
        text = value.strip()
        if m := re.fullmatch(r"(\d{1,9})m", text, re.ASCII):
            cpu = int(m.group(1)) / 1000
        elif re.fullmatch(r"\d{1,9}(?:\.\d{1,9})?", text, re.ASCII):
            cpu = float(text)
        else:
            raise SpecError(path, expected, value)
    else:
        cpu = _as_float(value, path, expected)
    # Docker gets nano-CPUs (cpu * 1e9): a value below 1m or above the machine sizes any
    # engine accepts would be refused there, or overflow, on every start
    if not MIN_CPU <= cpu <= MAX_CPU or abs(cpu * 1000 - round(cpu * 1000)) > 1e-6:
        raise SpecError(path, expected, value)
    return cpu


# --- names ------------------------------------------------------------------------------

_LABEL_RE = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
_LABEL_WORDS = (
    "a DNS label: lowercase letters, digits and '-', 1-63 characters, "
    "starting with a letter and not ending with '-'"
)


def _label(value: Any, path: str, pattern: re.Pattern[str], words: str) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise SpecError(path, words, value)
    return value


def validate_name(value: Any, path: str = "name") -> str:
    """A function name: a DNS label (``hello``, ``resize-images``)."""
    return _label(value, path, _LABEL_RE, _LABEL_WORDS)


def validate_tag(value: Any, path: str = "tag") -> str:
    """A traffic tag: same rules as a name, as it appears in ``TAG-NAME.domain``."""
    return validate_name(value, path)


_SECRET_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
_SECRET_WORDS = (
    "a secret name: lowercase letters, digits and '-', 1-63 characters, "
    "starting and ending with a letter or digit"
)


def validate_secret_name(value: Any, path: str = "name") -> str:
    """A secret name: an RFC 1123 DNS label (``db-password``, ``2fa-seed``)."""
    return _label(value, path, _SECRET_RE, _SECRET_WORDS)


_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_HANDLER_RE = re.compile(rf"({_IDENT}(?:\.{_IDENT})*):({_IDENT})", re.ASCII)
_HANDLER_WORDS = 'module:function, such as "handler:handle" or "app.main:handle"'


def _parse_handler(value: Any, path: str) -> str:
    m = _HANDLER_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None or any(keyword.iskeyword(part) for part in (*m.group(1).split("."), m.group(2))):
        raise SpecError(path, _HANDLER_WORDS, value)
    return value


# Docker's reference grammar (distribution/reference), ASCII only.
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_RE = re.compile(
    rf"(?:{_DOMAIN}/)?{_PATH_PART}(?:/{_PATH_PART})*"
    r"(?::[\w][\w.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?",
    re.ASCII,
)
_IMAGE_WORDS = 'an image reference such as "myorg/app:1.2" or "registry:5000/app@sha256:..."'


def _parse_image(value: Any, path: str) -> str:
    if not isinstance(value, str) or len(value) > 255 or _IMAGE_RE.fullmatch(value) is None:
        raise SpecError(path, _IMAGE_WORDS, value)
    return value


_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


def _parse_env(value: Any, path: str) -> dict[str, str]:
    section = _section(value, path, None)
    env: dict[str, str] = {}
    for key, raw in section.items():
        if not isinstance(key, str):
            raise SpecError(
                path,
                "variable names as strings (YAML reads unquoted yes/no/on/off as booleans "
                "and digits as numbers; quote the name)",
                key,
                problem=f"key {describe(key)} is not a string",
            )
        key_path = _join(path, key)
        if _ENV_NAME_RE.fullmatch(key) is None:
            raise SpecError(
                key_path, "a variable name: letters, digits and '_', not starting with a digit", key
            )
        if key in RESERVED_ENV:
            raise SpecError(
                key_path, "the `port:` key instead", problem=f"{key} is set by Torpor from `port`"
            )
        if key in CONTRACT_ENV:
            raise SpecError(
                key_path,
                "a variable name Torpor does not set",
                problem=f"{key} is set by Torpor (the Knative runtime contract)",
            )
        if key.startswith("TORPOR_"):
            raise SpecError(
                key_path,
                "a name without the TORPOR_ prefix",
                problem="TORPOR_* variables configure the runtime and are set by Torpor",
            )
        env[key] = _env_value(raw, key_path)
    return env


def _parse_secrets(value: Any, path: str, env: Mapping[str, str]) -> dict[str, str]:
    """``secrets:`` maps env names to secret names; it never holds a value. The names
    follow the ``env:`` rules, may not repeat an ``env:`` key, and may not be reserved
    (``PORT``, ``TORPOR_*``, ``K_*``)."""
    section = _section(value, path, None)
    out: dict[str, str] = {}
    for key, raw in section.items():
        if not isinstance(key, str):
            raise SpecError(
                path,
                "variable names as strings",
                key,
                problem=f"key {describe(key)} is not a string",
            )
        key_path = _join(path, key)
        if _ENV_NAME_RE.fullmatch(key) is None:
            raise SpecError(
                key_path, "a variable name: letters, digits and '_', not starting with a digit", key
            )
        if key in RESERVED_ENV or key.startswith(("TORPOR_", "K_")):
            raise SpecError(
                key_path,
                "a variable name Torpor does not set",
                problem=f"{key} is reserved (PORT, TORPOR_* and K_* are set by Torpor)",
            )
        if key in env:
            raise SpecError(
                key_path,
                "a variable set either in `env:` or in `secrets:`",
                problem=f"{key} is also set in env",
            )
        if not isinstance(raw, str) or _SECRET_RE.fullmatch(raw) is None:
            # not echoed: a value pasted here by mistake must not be printed back
            raise SpecError(
                key_path,
                _SECRET_WORDS,
                problem="not a secret name (secrets: maps to names, never to values)",
            )
        out[key] = raw
    return out


def _env_value(raw: Any, path: str) -> str:
    expected = 'a string, number or boolean (quote other values: "...")'
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, int):
        if raw.bit_length() > 10000:
            raise SpecError(path, expected, raw)
        return str(raw)
    if isinstance(raw, float | str):
        text = str(raw)
        if "\x00" in text:
            raise SpecError(path, "a string without NUL characters", raw)
        return text
    if isinstance(raw, _dt.date) and not isinstance(raw, _dt.datetime):
        return raw.isoformat()
    raise SpecError(path, expected, raw)


# --- sections ---------------------------------------------------------------------------


def _section(value: Any, path: str, keys: tuple[str, ...] | None) -> Mapping[Any, Any]:
    """A mapping (null = empty). With ``keys``, unknown keys are refused by path."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        what = f"a mapping of {', '.join(keys)}" if keys else "a mapping"
        raise SpecError(path, what, value)
    if keys is not None:
        for key in value:
            if key not in keys:
                hint = ""
                if isinstance(key, str):
                    close = difflib.get_close_matches(key, keys, n=1)
                    hint = f" (did you mean {close[0]}?)" if close else ""
                raise SpecError(
                    _join(path, key), f"one of {', '.join(keys)}{hint}", problem="unknown key"
                )
    return value


def _get(section: Mapping[Any, Any], key: str) -> Any:
    """The value of ``key``; null counts as absent."""
    value = section.get(key)
    return _MISSING if value is None else value


def _parse_scale(value: Any, cap: int = MAX_SCALE) -> Scale:
    """The ``scale:`` section; ``cap`` is the platform's replica cap (at most MAX_SCALE)."""
    sec = _section(value, "scale", SCALE_KEYS)
    cap = max(1, min(cap, MAX_SCALE))
    capped = cap < MAX_SCALE
    cap_words = f"the platform's cap of {cap} replicas (torpor up --max-replicas)"
    d = Scale()
    out = Scale()
    if (v := _get(sec, "min")) is not _MISSING:
        out.min = _as_int(v, "scale.min", f"an integer from 0 to {cap}")
        if not 0 <= out.min <= MAX_SCALE:
            raise SpecError("scale.min", f"an integer from 0 to {MAX_SCALE}", v)
        if out.min > cap:
            raise SpecError(
                "scale.min", f"an integer <= {cap}", problem=f"{describe(v)} is above {cap_words}"
            )
    if (v := _get(sec, "max")) is not _MISSING:
        low = max(1, out.min)
        expected = f"an integer >= scale.min ({out.min})" if out.min >= 1 else "an integer >= 1"
        out.max = _as_int(v, "scale.max", f"an integer from {low} to {cap}")
        if out.max < low:
            raise SpecError("scale.max", expected, v)
        if out.max > MAX_SCALE:
            raise SpecError("scale.max", f"an integer <= {MAX_SCALE}", v)
        if out.max > cap:
            raise SpecError(
                "scale.max",
                f"an integer from {low} to {cap}",
                problem=f"{describe(v)} is above {cap_words}",
            )
    else:
        out.max = min(d.max, cap)  # an omitted max is the default, within the cap
        if out.min > out.max:
            where = (
                f"{cap_words}; lower scale.min"
                if capped and d.max > cap
                else f"{d.max}, the default; raise scale.max"
            )
            raise SpecError("scale.min", f"an integer <= scale.max ({where})", out.min)
    if (v := _get(sec, "target")) is not _MISSING:
        words = f"a number > 0 and <= {MAX_TARGET:g} (in-flight requests per replica)"
        out.target = _bounded(v, "scale.target", words, 0, MAX_TARGET, above=True)
    if (v := _get(sec, "concurrency")) is not _MISSING:
        words = f"an integer from 0 to {MAX_CONCURRENCY} (0 = no limit)"
        out.concurrency = _bounded(v, "scale.concurrency", words, 0, MAX_CONCURRENCY, integer=True)
    if (v := _get(sec, "idle")) is not _MISSING:
        idle = parse_duration(v, "scale.idle")
        out.idle = _within(idle, v, "scale.idle", "a duration from 0 to 24h", 0, MAX_IDLE)
    if (v := _get(sec, "window")) is not _MISSING:
        window = parse_duration(v, "scale.window")
        words = "a duration from 6s to 1h"
        out.window = _within(window, v, "scale.window", words, MIN_WINDOW, MAX_WINDOW)
    if (v := _get(sec, "panic_window")) is not _MISSING:
        words = "a percent of scale.window from 1 to 100"
        out.panic_window = _bounded(v, "scale.panic_window", words, 1, 100)
    if (v := _get(sec, "panic_threshold")) is not _MISSING:
        words = "a percent of the ready replicas from 110 to 1000"
        out.panic_threshold = _bounded(v, "scale.panic_threshold", words, 110, 1000)
    return out


def _parse_resources(value: Any) -> Resources:
    sec = _section(value, "resources", RESOURCES_KEYS)
    out = Resources()
    if (v := _get(sec, "cpu")) is not _MISSING:
        out.cpu = _parse_cpu(v, "resources.cpu")
    if (v := _get(sec, "memory")) is not _MISSING:
        memory = parse_size(v, "resources.memory")
        words = 'a size from "16Mi" to "64Gi"'
        out.memory = _within(memory, v, "resources.memory", words, MIN_MEMORY, MAX_MEMORY)
    return out


def _parse_rollout(value: Any) -> RolloutPolicy:
    sec = _section(value, "rollout", ROLLOUT_KEYS)
    out = RolloutPolicy()
    if (v := _get(sec, "steps")) is not _MISSING:
        out.steps = _parse_steps(v, "rollout.steps")
    if (v := _get(sec, "interval")) is not _MISSING:
        interval = parse_duration(v, "rollout.interval")
        words = "a duration > 0 and <= 24h"
        out.interval = _within(interval, v, "rollout.interval", words, 0, MAX_INTERVAL, above=True)
    if (v := _get(sec, "max_error_ratio")) is not _MISSING:
        words = "a number from 0 to 1 (share of canary requests that may fail)"
        out.max_error_ratio = _bounded(v, "rollout.max_error_ratio", words, 0, 1)
    if (v := _get(sec, "max_p95_ratio")) is not _MISSING:
        words = f"a number from 1 to {MAX_P95_RATIO:g} (canary p95 / stable p95)"
        out.max_p95_ratio = _bounded(v, "rollout.max_p95_ratio", words, 1, MAX_P95_RATIO)
    if (v := _get(sec, "min_requests")) is not _MISSING:
        words = f"an integer from 0 to {MAX_MIN_REQUESTS}"
        out.min_requests = _bounded(
            v, "rollout.min_requests", words, 0, MAX_MIN_REQUESTS, integer=True
        )
    return out


def _parse_async(value: Any) -> AsyncPolicy:
    sec = _section(value, "async", ASYNC_KEYS)
    out = AsyncPolicy()
    if (v := _get(sec, "concurrency")) is not _MISSING:
        words = f"an integer from 1 to {MAX_ASYNC_CONCURRENCY} (calls running at once)"
        out.concurrency = _bounded(
            v, "async.concurrency", words, 1, MAX_ASYNC_CONCURRENCY, integer=True
        )
    if (v := _get(sec, "max_attempts")) is not _MISSING:
        words = f"an integer from 1 to {MAX_ASYNC_ATTEMPTS}"
        out.max_attempts = _bounded(
            v, "async.max_attempts", words, 1, MAX_ASYNC_ATTEMPTS, integer=True
        )
    return out


def _parse_steps(value: Any, path: str) -> list[int]:
    words = "a list of percents from 1 to 100, strictly increasing, ending with 100"
    if not isinstance(value, list) or not value:
        raise SpecError(path, words, value)
    steps: list[int] = []
    for i, raw in enumerate(value):
        item_path = f"{path}[{i}]"
        step = _bounded(raw, item_path, "an integer percent from 1 to 100", 1, 100, integer=True)
        if steps and step <= steps[-1]:
            raise SpecError(item_path, f"a percent > {steps[-1]} (steps strictly increase)", raw)
        steps.append(step)
    if steps[-1] != 100:
        raise SpecError(path, "a last step of 100", steps[-1])
    return steps


# --- the document -----------------------------------------------------------------------


def parse_spec(data: Any, *, source: str = "torpor.yaml", max_replicas: int | None = None) -> Spec:
    """Validate a parsed ``torpor.yaml`` mapping into a :class:`Spec`.

    ``source`` names the document in messages about the document as a whole.
    ``max_replicas`` is the platform's cap (``torpor up --max-replicas``): a ``scale.min``
    or ``scale.max`` above it is refused, an omitted ``scale.max`` becomes min(20, cap).
    """
    try:
        return _parse_spec(data, MAX_SCALE if max_replicas is None else max_replicas)
    except SpecError as err:
        if err.source is None:
            err.source = source
            err.args = (err._message(),)
        raise


def _parse_spec(data: Any, cap: int) -> Spec:
    if not isinstance(data, Mapping):
        expected = "a mapping with at least `name:` at the top level"
        if data is None:
            raise SpecError("", expected, problem="the document is empty")
        raise SpecError("", expected, data)
    top = _section(data, "", TOP_KEYS)
    if (raw_name := _get(top, "name")) is _MISSING:
        raise SpecError("name", _LABEL_WORDS, problem="required")
    spec = Spec(name=validate_name(raw_name, "name"))

    handler = _get(top, "handler")
    image = _get(top, "image")
    if handler is not _MISSING and image is not _MISSING:
        raise SpecError(
            "image",
            "either `handler:` (a source build) or `image:`, not both",
            problem="handler and image are mutually exclusive",
        )
    if image is not _MISSING:
        spec.image = _parse_image(image, "image")
        spec.handler = None
    elif handler is not _MISSING:
        spec.handler = _parse_handler(handler, "handler")

    if "env" in top:
        spec.env = _parse_env(top["env"], "env")
    if (v := _get(top, "port")) is not _MISSING:
        spec.port = _bounded(v, "port", "an integer from 1 to 65535", 1, 65535, integer=True)
    if (v := _get(top, "timeout")) is not _MISSING:
        timeout = parse_duration(v, "timeout")
        words = "a duration > 0 and <= 600s"
        spec.timeout = _within(timeout, v, "timeout", words, 0, MAX_TIMEOUT, above=True)
    if (v := _get(top, "max_body")) is not _MISSING:
        max_body = parse_size(v, "max_body")
        spec.max_body = _within(max_body, v, "max_body", 'a size from 1 byte to "1Gi"', 1, MAX_BODY)
    if (v := _get(top, "stream_idle")) is not _MISSING:
        idle = parse_duration(v, "stream_idle")
        words = "a duration > 0 and <= 1h"
        spec.stream_idle = _within(idle, v, "stream_idle", words, 0, MAX_STREAM_IDLE, above=True)
    if (v := _get(top, "max_connection")) is not _MISSING:
        most = parse_duration(v, "max_connection")
        words = "a duration > 0 and <= 24h"
        spec.max_connection = _within(
            most, v, "max_connection", words, 0, MAX_CONNECTION, above=True
        )
    if (v := _get(top, "websocket")) is not _MISSING:
        if spec.image is not None:
            raise SpecError(
                "websocket",
                "`websocket:` with `handler:` (a source build); an `image:` serves "
                "WebSockets on its own",
                problem="websocket does not apply to an image",
            )
        spec.websocket = _parse_handler(v, "websocket")
    spec.scale = _parse_scale(top.get("scale"), cap)
    spec.resources = _parse_resources(top.get("resources"))
    spec.rollout = _parse_rollout(top.get("rollout"))
    spec.async_calls = _parse_async(top.get("async"))
    if "secrets" in top:
        spec.secrets = _parse_secrets(top["secrets"], "secrets", spec.env)
    if (v := _get(top, "handler_style")) is not _MISSING:
        if v not in HANDLER_STYLES:
            raise SpecError(
                "handler_style", "torpor (handle(request)) or openfaas (handle(event, context))", v
            )
        if spec.image and v != "torpor":
            raise SpecError(
                "handler_style",
                "no handler_style with `image:` (the image serves HTTP itself)",
                problem="an image function has no handler",
            )
        spec.handler_style = v
    for key in ("command", "args"):
        if (v := _get(top, key)) is not _MISSING:
            if not spec.image:
                raise SpecError(
                    key,
                    f"`{key}:` only with `image:`",
                    problem="a source function runs the Torpor runtime, not a command",
                )
            setattr(spec, key, _parse_argv(v, key))
    if "labels" in top:
        spec.labels = _parse_labels(top["labels"], "labels")
    return spec


def _parse_argv(value: Any, path: str) -> list[str]:
    words = f"a list of at most {MAX_ARGV} strings of at most {MAX_ARG_CHARS} characters"
    if not isinstance(value, list) or len(value) > MAX_ARGV:
        raise SpecError(path, words, value)
    out: list[str] = []
    for i, item in enumerate(value):
        item_path = f"{path}[{i}]"
        if _is_number(item) and not isinstance(item, float):
            item = str(item)
        if not isinstance(item, str) or len(item) > MAX_ARG_CHARS:
            raise SpecError(
                item_path, f"a string of at most {MAX_ARG_CHARS} characters (quote numbers)", item
            )
        if "\x00" in item:
            raise SpecError(item_path, "a string without NUL characters", item)
        out.append(item)
    return out


_LABEL_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?", re.ASCII)
_LABEL_PREFIX_RE = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?", re.ASCII)


def _parse_labels(value: Any, path: str) -> dict[str, str]:
    section = _section(value, path, None)
    if len(section) > MAX_LABELS:
        raise SpecError(path, f"at most {MAX_LABELS} labels", problem=f"{len(section)} labels")
    out: dict[str, str] = {}
    for key, raw in section.items():
        key_words = "a label key: [prefix/]name, name of 1-63 letters, digits, '-', '_', '.'"
        if not isinstance(key, str):
            raise SpecError(path, key_words, key, problem=f"key {describe(key)} is not a string")
        key_path = _join(path, key)
        prefix, _, name = key.rpartition("/")
        if _LABEL_NAME_RE.fullmatch(name) is None or (
            prefix and _LABEL_PREFIX_RE.fullmatch(prefix) is None
        ):
            raise SpecError(key_path, key_words, key)
        if key.startswith(("torpor.", "torpor/")):
            raise SpecError(
                key_path,
                "a key without the torpor. prefix",
                problem="torpor.* labels are set by Torpor",
            )
        text = _env_value(raw, key_path)
        if text and _LABEL_NAME_RE.fullmatch(text) is None:
            raise SpecError(
                key_path, "a label value: at most 63 letters, digits, '-', '_', '.'", raw
            )
        out[key] = text
    return out


def load_spec(
    folder: str | Path, *, source: str | None = None, max_replicas: int | None = None
) -> Spec:
    """Read and validate ``torpor.yaml`` (or ``torpor.yml``) in ``folder``.

    Messages name the file by its path, or by ``source`` when given (a server that
    unpacked an upload into a temporary folder passes e.g. "torpor.yaml").
    ``max_replicas``: the platform's replica cap, as in :func:`parse_spec`.
    """
    base = Path(folder)
    shown = source if source is not None else str(base)
    if not base.is_dir():
        raise SpecError(
            "", "a function folder holding torpor.yaml", problem=f"{shown} is not a folder"
        )
    found = [base / name for name in SPEC_FILES if (base / name).is_file()]
    if not found:
        missing = source if source is not None else str(base / SPEC_FILES[0])
        raise SpecError(
            "",
            "a torpor.yaml (or torpor.yml) in the function folder",
            problem=f"{missing} not found",
        )
    if len(found) > 1:
        raise SpecError(
            "",
            "a single spec file; remove one of them",
            problem=f"both torpor.yaml and torpor.yml exist in {shown}",
        )
    path = found[0]
    source = str(path) if source is None else source
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError(
            "", "a readable file", problem=f"cannot read: {exc.strerror}", source=source
        ) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError("", "a spec of at most 1 MiB", problem="file too large", source=source)
    try:
        data = yaml.safe_load(raw)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "syntax error"
        raise SpecError(
            "",
            "valid YAML",
            problem=f"invalid YAML{where}: {what}",
            source=source,
            line=mark.line + 1 if mark else None,
        ) from None
    except yaml.YAMLError as exc:
        raise SpecError(
            "",
            "valid UTF-8 YAML",
            problem=f"invalid YAML: {_truncate(str(exc).splitlines()[0])}",
            source=source,
        ) from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer with thousands of digits
        raise SpecError(
            "",
            "a spec PyYAML can load",
            problem=f"invalid YAML: {_truncate(str(exc))}",
            source=source,
        ) from None
    return parse_spec(data, source=source, max_replicas=max_replicas)


# --- back to YAML -----------------------------------------------------------------------


def spec_to_yaml_dict(spec: Spec) -> dict[str, Any]:
    """A plain mapping (safe for ``yaml.safe_dump``/JSON) that :func:`parse_spec` turns
    back into an equal :class:`Spec`."""
    out: dict[str, Any] = {"name": spec.name}
    if spec.image:
        out["image"] = spec.image
    elif spec.handler:
        out["handler"] = spec.handler
    out["env"] = dict(spec.env)
    out["secrets"] = dict(spec.secrets)
    out["port"] = spec.port
    out["timeout"] = format_duration(spec.timeout)
    out["max_body"] = format_size(spec.max_body)
    out["stream_idle"] = format_duration(spec.stream_idle)
    out["max_connection"] = format_duration(spec.max_connection)
    if spec.websocket:
        out["websocket"] = spec.websocket
    s = spec.scale
    out["scale"] = {
        "min": s.min,
        "max": s.max,
        "target": s.target,
        "concurrency": s.concurrency,
        "idle": format_duration(s.idle),
        "window": format_duration(s.window),
    }
    out["scale"]["panic_window"] = s.panic_window
    out["scale"]["panic_threshold"] = s.panic_threshold
    out["resources"] = {"cpu": spec.resources.cpu, "memory": format_size(spec.resources.memory)}
    r = spec.rollout
    out["rollout"] = {
        "steps": list(r.steps),
        "interval": format_duration(r.interval),
        "max_error_ratio": r.max_error_ratio,
        "max_p95_ratio": r.max_p95_ratio,
        "min_requests": r.min_requests,
    }
    if not spec.image:
        out["handler_style"] = spec.handler_style
    if spec.command is not None:
        out["command"] = list(spec.command)
    if spec.args is not None:
        out["args"] = list(spec.args)
    out["labels"] = dict(spec.labels)
    out["async"] = {
        "concurrency": spec.async_calls.concurrency,
        "max_attempts": spec.async_calls.max_attempts,
    }
    return out

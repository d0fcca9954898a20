"""The payloads that cross the store's bus between gateways and the control plane,
defined once: the gateway builds them (``torpor.gateway.stats``, ``app``, ``calls``),
the autoscaler, the rollouts and the controller read them through ``parse_stats`` and
``parse_poke``.

- ``STATS`` (once a second from each gateway): ``StatsReport``, one ``RevisionReport``
  per revision that had replicas, a queue or traffic since the last report.
- ``POKES`` ("requests wait for a replica of R now"): ``Poke``, from a gateway's
  activator or, with ``gateway`` = ``async-queue``, from the call workers' backlog.

A payload comes off the bus and is hostile until parsed: a parser never raises. A
payload that is not an object, or whose top-level fields have the wrong type, is
dropped whole (``None``) with one log line; in a stats report each revision's entry
stands alone: a malformed one is dropped (one log line) and the others are kept.
Numbers must be from 0 to ``MAX_COUNT`` (NaN, infinities, negatives and booleans are
refused); counts must be whole numbers. Optional fields missing
from an entry take their zero. A parsed payload is a new object holding only the
fields below, so parsing one again gives an equal one.

Imports only ``torpor.model`` (for ``LATENCY_BUCKETS``); the gateway may import this
module, this module never imports the gateway.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TypedDict

from torpor.model import LATENCY_BUCKETS

__all__ = [
    "LATENCY_SLOTS",
    "MAX_COUNT",
    "NAME_MAX",
    "Poke",
    "RevisionReport",
    "StatsReport",
    "parse_poke",
    "parse_stats",
]

log = logging.getLogger("torpor.messages")

MAX_COUNT = 2**53  # largest count taken (exact as a float)
NAME_MAX = 253  # longest function, revision or gateway name taken
LATENCY_SLOTS = len(LATENCY_BUCKETS) + 1  # one count per bucket, then the overflow


class RevisionReport(TypedDict):
    """One revision's entry of a gateway's stats report (``Sampler.collect``)."""

    function: str
    concurrency: float  # average in flight plus queued over the report's period
    requests: int  # requests answered in the period
    errors: int  # of them 5xx (the gateway's own 503/504 included)
    latency: list[int]  # LATENCY_SLOTS counts: one per LATENCY_BUCKETS bound, then overflow
    ready: int  # replicas the gateway routes to
    queued: int  # requests waiting in the activator now


class StatsReport(TypedDict):
    """A gateway's report of the last second: ``revisions`` maps a revision's name to
    its entry."""

    gateway: str
    time: float  # wall clock (time.time()) at the gateway when it was sent
    revisions: dict[str, RevisionReport]


class Poke(TypedDict):
    """``queued`` requests wait at ``gateway`` (a gateway's id, or ``async-queue``) for a
    replica of ``revision`` of ``function``."""

    function: str
    revision: str
    queued: int
    gateway: str


class _Bad(ValueError):
    """A field that fails its rule; the message says which and why."""


def _clip(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: object, field: str) -> float:
    """A finite number from 0 to MAX_COUNT (an int is compared before any conversion)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(f"{field} is not a number: {_clip(value)}")
    if not (0 <= value <= MAX_COUNT):  # NaN fails it too
        raise _Bad(f"{field} is not a number from 0 to {MAX_COUNT}: {_clip(value)}")
    return float(value)


def _count(value: object, field: str) -> int:
    n = _number(value, field)
    if not n.is_integer():
        raise _Bad(f"{field} is not a whole number: {_clip(value)}")
    return int(n)


def _name(value: object, field: str, required: bool = True) -> str:
    if not isinstance(value, str) or len(value) > NAME_MAX or (required and not value):
        raise _Bad(f"{field} is not a name: {_clip(value)}")
    return value


def _entry(raw: object) -> RevisionReport:
    if not isinstance(raw, Mapping):
        raise _Bad(f"the entry is not an object: {_clip(raw)}")
    latency = raw.get("latency")
    if latency is None:
        latency = []
    elif not isinstance(latency, list | tuple):
        raise _Bad(f"latency is not a list: {_clip(latency)}")
    # a gateway with more buckets than this controller knows: the extra ones are ignored
    counts = [_count(n, "latency") for n in latency[:LATENCY_SLOTS]]
    counts += [0] * (LATENCY_SLOTS - len(counts))
    return RevisionReport(
        function=_name(raw.get("function", ""), "function", required=False),
        concurrency=_number(raw.get("concurrency"), "concurrency"),
        requests=_count(raw.get("requests"), "requests"),
        errors=_count(raw.get("errors", 0), "errors"),
        latency=counts,
        ready=_count(raw.get("ready", 0), "ready"),
        queued=_count(raw.get("queued", 0), "queued"),
    )


def parse_stats(payload: object) -> StatsReport | None:
    """The ``StatsReport`` in ``payload``, without its malformed entries; ``None`` (and
    one log line) when the payload itself is malformed. Required in an entry:
    ``concurrency`` and ``requests``; never raises."""
    try:
        if not isinstance(payload, Mapping):
            raise _Bad(f"not an object: {_clip(payload)}")
        gateway = _name(payload.get("gateway", ""), "gateway", required=False)
        sent = _number(payload.get("time", 0.0), "time")
        raw = payload.get("revisions", {})
        if not isinstance(raw, Mapping):
            raise _Bad(f"revisions is not an object: {_clip(raw)}")
    except _Bad as e:
        log.warning("dropping a malformed stats report: %s", e)
        return None
    revisions: dict[str, RevisionReport] = {}
    for name, entry in raw.items():
        try:
            revisions[_name(name, "revision")] = _entry(entry)
        except _Bad as e:
            log.warning(
                "dropping the entry %s of a stats report from %s: %s",
                _clip(name),
                _clip(gateway),
                e,
            )
    return StatsReport(gateway=gateway, time=sent, revisions=revisions)


def parse_poke(payload: object) -> Poke | None:
    """The ``Poke`` in ``payload``; ``None`` (and one log line) when it is malformed.
    ``queued`` missing or null counts as 0 (a wake without a count); never raises."""
    try:
        if not isinstance(payload, Mapping):
            raise _Bad(f"not an object: {_clip(payload)}")
        queued = payload.get("queued")
        return Poke(
            function=_name(payload.get("function"), "function"),
            revision=_name(payload.get("revision"), "revision"),
            queued=0 if queued is None else _count(queued, "queued"),
            gateway=_name(payload.get("gateway", ""), "gateway", required=False),
        )
    except _Bad as e:
        log.warning("dropping a malformed poke: %s", e)
        return None

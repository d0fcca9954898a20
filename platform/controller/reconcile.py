"""The controller's public names, kept where they always were.

The controller itself is split by concept (see ``torpor.controller.loop``): ``loop.py``
(``Controller``: leadership, the bus, the loop, desired/converge), ``replicas.py`` (the
replica lifecycle), ``adopt.py`` (adoption and the orphan sweep), ``builds.py`` (sources,
builds, garbage collection) and ``state.py`` (what they share). Import from here or from
those modules; the names are the same objects.
"""

from __future__ import annotations

from torpor.controller.loop import Controller
from torpor.controller.replicas import probe_once
from torpor.controller.state import (
    ERROR_EVENT_EVERY,
    HEAD_START,
    HEARTBEAT_EVERY,
    PROBE_PATH,
    SWEEP_EVERY,
    FunctionTable,
    RevisionState,
    Settings,
    Tracked,
)

__all__ = [
    "ERROR_EVENT_EVERY",
    "HEAD_START",
    "HEARTBEAT_EVERY",
    "PROBE_PATH",
    "SWEEP_EVERY",
    "Controller",
    "FunctionTable",
    "RevisionState",
    "Settings",
    "Tracked",
    "probe_once",
]

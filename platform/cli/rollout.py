"""`torpor rollout` and `torpor rollback`. (Stub: filled in by the rollout work.)"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_parsers(sub: Any) -> dict[str, Callable[[Any, argparse.Namespace], int]]:
    """Add subcommands to ``sub``; return {command name: handler(api, args)}."""
    return {}

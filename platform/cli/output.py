"""Machine-readable output and exit codes shared by the CLI's commands.

``-o json|yaml`` (``--output``) on listing commands prints the API's own JSON (as JSON or
YAML) instead of a table; ``--json`` stays as an alias of ``-o json``.

Exit codes (stable; scripts may rely on them):

====  ==========================================================================
0     ok
1     failed (the platform answered with an error, a build or a replica failed)
2     usage (a bad flag or argument; argparse's own code)
3     not found (no such function, revision, secret...: the API answered 404)
4     refused by a rollout judgement (the canary was rolled back)
====  ==========================================================================
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_ROLLED_BACK = 4

FORMATS = ("table", "json", "yaml")


def add_output(p: argparse.ArgumentParser) -> None:
    """``-o/--output table|json|yaml`` and the older ``--json`` alias."""
    p.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default="table",
        help="output format (default table); json and yaml print the API's JSON",
    )
    p.add_argument(
        "--json", dest="output", action="store_const", const="json", help="same as -o json"
    )


def wants_data(args: argparse.Namespace) -> bool:
    return getattr(args, "output", "table") in ("json", "yaml")


def emit(args: argparse.Namespace, data: Any) -> bool:
    """Print ``data`` as JSON or YAML if ``-o`` asked for it; True if it did."""
    fmt = getattr(args, "output", "table")
    if fmt == "json":
        print(json.dumps(data, indent=2))
        return True
    if fmt == "yaml":
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        return True
    return False


EXIT_CODES = """exit codes:
  0  ok
  1  failed
  2  usage (bad flag or argument)
  3  not found (no such function, revision, secret, ...)
  4  refused by a rollout judgement (the canary was rolled back)
"""


def version() -> str:
    """The installed distribution's version (``torpor --version``)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("torpor")
    except PackageNotFoundError:
        return "unknown (not installed)"

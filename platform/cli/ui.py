"""``torpor ui [--no-open]``: print a URL that opens the dashboard signed in, and open it
in a browser where one is available.

The URL carries a one-time code good for 60 seconds (``POST /v1/ui/code``), never the
API token; the page exchanges it for an HttpOnly session cookie (torpor.api.ui).
"""

from __future__ import annotations

import argparse
import os
import sys
import webbrowser
from typing import Any


def _can_open() -> bool:
    """A browser is plausible: a desktop session, or a non-Linux desktop OS."""
    if sys.platform.startswith("linux"):
        return bool(
            os.environ.get("DISPLAY")
            or os.environ.get("WAYLAND_DISPLAY")
            or os.environ.get("BROWSER")
        )
    return True


def cmd_ui(api: Any, args: argparse.Namespace) -> int:
    out = api.call("POST", "/v1/ui/code")
    url = api.url + out["path"]
    print(url)
    if args.no_open or not _can_open():
        print(f"open it within {out['expires_in']:.0f}s; it signs in once", file=sys.stderr)
        return 0
    try:
        opened = webbrowser.open(url)
    except webbrowser.Error:
        opened = False
    print(
        "opened in your browser"
        if opened
        else f"no browser found: open the URL within {out['expires_in']:.0f}s",
        file=sys.stderr,
    )
    return 0


def add_parser(sub: Any) -> dict[str, Any]:
    p = sub.add_parser("ui", help="open the dashboard (prints a one-time sign-in URL)")
    p.add_argument("--no-open", action="store_true", help="only print the URL")
    return {"ui": cmd_ui}

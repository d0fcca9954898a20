"""How a deploy tells its progress: one line per phase.

On a terminal a live spinner shows the phase being waited for (``rich``), and each
finished phase leaves one line; in a pipe the same lines are printed plainly; ``quiet``
prints nothing (the caller prints the URL alone).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Phases:
    def __init__(
        self, quiet: bool = False, stream: TextIO | None = None, live: bool | None = None
    ) -> None:
        self.out = stream or sys.stderr
        self.quiet = quiet
        self.live = (not quiet) and (self.out.isatty() if live is None else live)
        self.started = time.monotonic()
        self._status: Any = None
        self._console: Any = None
        if self.live:
            try:
                from rich.console import Console
            except ImportError:  # rich is a dependency, but a broken install still deploys
                self.live = False
            else:
                self._console = Console(file=self.out, highlight=False)

    def wait(self, text: str) -> None:
        """The phase now waited for (spinner on a terminal, nothing in a pipe)."""
        if not self.live:
            return
        if self._status is None:
            self._status = self._console.status(text, spinner="dots")
            self._status.start()
        else:
            self._status.update(text)

    def done(self, line: str) -> None:
        """A finished phase: one line."""
        if self.quiet:
            return
        if self._console is not None:
            self._console.print(line, markup=False)
        else:
            print(line, file=self.out, flush=True)

    def fail(self, line: str) -> None:
        """Why it failed: shown even when quiet (as ``torpor: deploy: ...``)."""
        if self.quiet:
            print(f"torpor: deploy: {line}", file=self.out, flush=True)
        else:
            self.done(line)

    def raw(self, line: str) -> None:
        """A build log line (``-v``)."""
        if self.quiet:
            return
        if self._console is not None:
            self._console.print(f"  | {line}", markup=False, style="dim")
        else:
            print(f"  | {line}", file=self.out, flush=True)

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

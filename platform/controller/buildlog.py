"""One build's log: kept whole while it runs, told as one event when it ends.

The controller records one ``build`` event when a build starts and one when it ends
(finished, with its duration, image size and whether every layer came from the cache;
or failed, with the last lines of the log). The whole log goes line by line over the
store's bus on ``BUILD_LOG`` (``torpor deploy -v`` follows it through the API) and,
capped, into the closing event's ``data["log"]`` (``torpor logs NAME --build``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

BUILD_LOG = (
    "build-log"  # bus channel; payload {"function", "revision", "line"} or {..., "done": True}
)
MAX_LINES = 400  # lines of a build log kept in its closing event
MAX_LINE = 500  # characters of one line kept
FAIL_TAIL = 8  # lines of a failed build's log shown in its event message


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # unreachable


@dataclass
class BuildLog:
    revision: str
    started: float = field(default_factory=time.monotonic)
    lines: list[str] = field(default_factory=list)
    dropped: int = 0  # lines beyond MAX_LINES, dropped from the head

    def add(self, line: str) -> str:
        line = line[:MAX_LINE]
        self.lines.append(line)
        if len(self.lines) > MAX_LINES:
            del self.lines[0]
            self.dropped += 1
        return line

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def data(self, **extra: Any) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "seconds": round(self.elapsed(), 2),
            "log": list(self.lines),
            "log_dropped": self.dropped,
            **extra,
        }

    def finished_message(self, info: dict[str, Any]) -> str:
        parts = [f"{self.revision}: built in {self.elapsed():.1f}s"]
        if info.get("size"):
            parts.append(f"image {human_bytes(int(info['size']))}")
        if "cached" in info:
            parts.append("cached" if info["cached"] else "not cached")
        warnings = [line for line in self.lines if line.lower().startswith("warning")]
        if warnings:  # a driver's warning stays visible in the one line (e.g. the cluster's)
            parts.append(
                warnings[0][:200] + (f" (+{len(warnings) - 1} more)" if len(warnings) > 1 else "")
            )
        return ", ".join(parts)

    def failed_message(self, reason: str) -> str:
        """First line: what failed; then the failing lines: those the driver put in its
        error, else the last lines of the log (``FAIL_TAIL`` at most)."""
        first, *rest = (reason or "unknown reason").splitlines() or [""]
        detail = [line for line in rest if line.strip()]
        tail = detail or [line for line in self.lines if line.strip()]
        head = f"{self.revision}: build failed after {self.elapsed():.1f}s: {first}"
        return "\n".join([head, *(line[:MAX_LINE] for line in tail[-FAIL_TAIL:])])

"""The ASGI vocabulary of the gateway, defined once: every module of ``torpor.gateway``
that takes or gives ASGI scopes, messages or callables imports its types from here.

Scopes and messages are mutable mappings (the server builds plain dicts; the app may
copy a scope to rewrite its path). ``Headers`` is the ASGI header list: lowercase
``(name, value)`` byte pairs, in order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["ASGIApp", "Headers", "Message", "Receive", "Scope", "Send"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

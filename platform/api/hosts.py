"""The host labels functions claim at the gateway, and clashes between functions.

A function ``NAME`` answers at ``NAME.DOMAIN``; a tag ``TAG`` of it at
``TAG-NAME.DOMAIN``. Both are one label of the same namespace, so tag ``canary`` on
``hello`` and a function named ``canary-hello`` would claim the same host. The API
refuses whichever comes second:

- deploying a *new* function whose name is the tag host of another function (a tag
  already routed, or one a revision still building will get once ready);
- a tag that is new to its function (``deploy --tag``, ``PUT /traffic``, hence rollouts
  started by ``deploy --canary --tag``) whose host is another function's name or tag host.

A function that already holds a host keeps it: redeploying it, or keeping its tag in a
new traffic table, is not refused even if a clash exists from before these checks (the
gateway then prefers the function; see ``torpor.gateway.routes``). The check reads every
function and then writes one, so two racing calls can still both pass; the gateway's
rule decides then too.

Pure functions on the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torpor.model import Function, TrafficTarget

__all__ = ["Clash", "claims", "deploy_clash", "tag_host", "traffic_clash"]


@dataclass(frozen=True)
class Clash:
    field: str  # the request field to blame: "name", "tag", "traffic[1].tag"
    message: str


def tag_host(tag: str, name: str) -> str:
    """The host label of tag ``tag`` of function ``name``."""
    return f"{tag}-{name}"


def claims(fn: Function) -> dict[str, str]:
    """Every host label ``fn`` claims -> what claims it, in words."""
    out = {fn.name: f"function {fn.name}"}
    for t in fn.traffic:
        if t.tag:
            out.setdefault(tag_host(t.tag, fn.name), f"tag {t.tag!r} of function {fn.name}")
    for rev in fn.revisions:
        if rev.tag and rev.status == "building":
            out.setdefault(
                tag_host(rev.tag, fn.name),
                f"tag {rev.tag!r} of function {fn.name} (for {rev.name}, once ready)",
            )
    return out


def _holder(functions: Iterable[Function], label: str, exclude: str) -> str | None:
    """What claims ``label`` among ``functions`` other than ``exclude``, if anything."""
    for f in functions:
        if f.name != exclude and (who := claims(f).get(label)) is not None:
            return who
    return None


def deploy_clash(
    functions: list[Function], name: str, tag: str | None, domain: str
) -> Clash | None:
    """The clash a deploy of ``name`` (with ``--tag tag``) would create, if any."""
    current = next((f for f in functions if f.name == name), None)
    if current is None and (who := _holder(functions, name, name)) is not None:
        return Clash(
            "name",
            f"name: {name}.{domain} is already the host of {who}; "
            "pick another name or move that tag",
        )
    if tag is not None:
        host = tag_host(tag, name)
        if (current is None or host not in claims(current)) and (
            who := _holder(functions, host, name)
        ) is not None:
            return Clash(
                "tag",
                f"tag: {host}.{domain} (tag {tag!r} of {name}) is already the host of {who}; "
                "pick another tag",
            )
    return None


def traffic_clash(
    functions: list[Function], fn: Function, targets: list[TrafficTarget], domain: str
) -> Clash | None:
    """The clash a new traffic table of ``fn`` would create, if any (tags new to ``fn`` only)."""
    mine = claims(fn)
    for i, t in enumerate(targets):
        if not t.tag:
            continue
        host = tag_host(t.tag, fn.name)
        if host not in mine and (who := _holder(functions, host, fn.name)) is not None:
            return Clash(
                f"traffic[{i}].tag",
                f"traffic[{i}].tag: {host}.{domain} (tag {t.tag!r} of {fn.name}) "
                f"is already the host of {who}; pick another tag",
            )
    return None

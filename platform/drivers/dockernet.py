"""Network isolation of Docker replicas: what a container may reach.

- One bridge network per function (``torpor-INSTANCE8-FUNCTION``, bridge interface
  ``torpor`` + 9 hex digits), with inter-container communication off
  (``com.docker.network.bridge.enable_icc=false``): replicas of one function cannot reach
  each other, and Docker's own isolation rules drop traffic between two bridges, so
  replicas of different functions cannot either. Networks carry the ``torpor.managed``,
  ``torpor.instance`` and ``torpor.function`` labels, are created on demand, adopted by
  the next driver on the same state directory, and removed once empty (with the
  function's revisions, and when the driver closes).
- No connection from a container to the host: one rule,
  ``iptables -I INPUT -i torpor+ -m conntrack ! --ctstate ESTABLISHED,RELATED -j DROP``,
  drops what a container opens towards any address of the host (the bridge gateway, the
  host's own IPs), so the API, Redis or anything else the host serves on 0.0.0.0 is out
  of reach. Replies to connections the host opens (the gateway reaching a replica through
  its port published on 127.0.0.1) pass. The rule needs root and ``iptables``; it stays
  installed (it only matches ``torpor*`` interfaces) and is added again when missing.
  ``TORPOR_DOCKER_HOST_ACCESS=1`` leaves it out, for functions that must call a service
  on the host.
- No link-local destinations (169.254.0.0/16: a cloud's instance metadata service, which
  hands out the machine's credentials): one rule in ``DOCKER-USER``, ``-i torpor+ -d
  169.254.0.0/16 -j DROP``, installed with the one above (and also with
  ``TORPOR_DOCKER_HOST_ACCESS=1``).
- Other egress (the internet, other machines) is left as Docker routes it, as Knative
  does by default: calling an external API is a normal thing for a function. A Redis or
  API on *another* machine is therefore reachable unless that machine or a
  ``DOCKER-USER`` rule refuses it. The networks are IPv4 only (Docker disables IPv6
  inside their containers).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import docker
import docker.errors

log = logging.getLogger("torpor")

MANAGED = "torpor.managed"
INSTANCE = "torpor.instance"
BRIDGE_PREFIX = "torpor"
FIREWALL_COMMENT = "torpor: containers may not open connections to the host"
# The INPUT rule (after the chain name): everything a torpor bridge opens towards the host.
FIREWALL_RULE = [
    "-i",
    f"{BRIDGE_PREFIX}+",
    "-m",
    "conntrack",
    "!",
    "--ctstate",
    "ESTABLISHED,RELATED",
    "-m",
    "comment",
    "--comment",
    FIREWALL_COMMENT,
    "-j",
    "DROP",
]
METADATA_COMMENT = "torpor: containers may not reach link-local addresses (instance metadata)"
METADATA_RULE = [
    "-i",
    f"{BRIDGE_PREFIX}+",
    "-d",
    "169.254.0.0/16",
    "-m",
    "comment",
    "--comment",
    METADATA_COMMENT,
    "-j",
    "DROP",
]


def network_name(instance: str, function: str) -> str:
    return f"torpor-{instance[:8]}-{function}"


def bridge_name(instance: str, function: str) -> str:
    """The bridge interface of a function's network: at most 15 characters (IFNAMSIZ)."""
    digest = hashlib.sha256(f"{instance}/{function}".encode()).hexdigest()
    return f"{BRIDGE_PREFIX}{digest[:9]}"


def host_access_allowed() -> bool:
    return os.environ.get("TORPOR_DOCKER_HOST_ACCESS", "").lower() in ("1", "true", "yes")


def _iptables() -> str | None:
    found = shutil.which("iptables")
    if found:
        return found
    return "/usr/sbin/iptables" if os.path.exists("/usr/sbin/iptables") else None


def ensure_rule(chain: str, rule: list[str], iptables: str | None = None) -> str | None:
    """Insert ``rule`` first in ``chain`` unless it is there; ``None`` once it is, else why not."""
    binary = iptables or _iptables()
    if binary is None:
        return "iptables is not installed"
    if os.geteuid() != 0:
        return "the platform does not run as root"
    try:
        check = subprocess.run(
            [binary, "-w", "5", "-C", chain, *rule], capture_output=True, text=True, timeout=15
        )
        if check.returncode == 0:
            return None
        add = subprocess.run(
            [binary, "-w", "5", "-I", chain, "1", *rule], capture_output=True, text=True, timeout=15
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{binary} failed: {e}"
    if add.returncode != 0:
        return f"{binary} -I {chain} failed: {(add.stderr or add.stdout).strip()[:200]}"
    return None


def ensure_host_firewall(iptables: str | None = None) -> str | None:
    """The INPUT rule: containers on torpor bridges open no connection to this host."""
    return ensure_rule("INPUT", FIREWALL_RULE, iptables)


def ensure_metadata_block(iptables: str | None = None) -> str | None:
    """The DOCKER-USER rule (FORWARD if Docker made no DOCKER-USER chain): no link-local."""
    problem = ensure_rule("DOCKER-USER", METADATA_RULE, iptables)
    if problem and "DOCKER-USER" in problem:
        problem = ensure_rule("FORWARD", METADATA_RULE, iptables)
    return problem


class Networks:
    """The per-function networks of one Torpor installation (blocking: call from a thread)."""

    def __init__(self, client: Callable[[], docker.DockerClient], instance: str) -> None:
        self._client = client
        self.instance = instance
        self._known: dict[str, str] = {}  # function -> network name, known to exist
        self._lock = threading.Lock()
        self._firewall_checked = False
        self.firewall_problem: str | None = None  # why the host is reachable, if it is

    @property
    def client(self) -> docker.DockerClient:
        return self._client()

    def labels(self, function: str) -> dict[str, str]:
        return {MANAGED: "true", INSTANCE: self.instance, "torpor.function": function}

    def ensure(self, function: str) -> str:
        """The name of ``function``'s network, created if missing (and the firewall with it)."""
        name = self._known.get(function)
        if name is not None:
            return name
        with self._lock:
            self._firewall()
            name = network_name(self.instance, function)
            try:
                net = self.client.networks.get(name)
            except docker.errors.NotFound:
                net = self._create(name, function)
            if (net.attrs.get("Labels") or {}).get(INSTANCE) != self.instance:
                raise RuntimeError(f"network {name} exists and was not created by this Torpor")
            self._known[function] = name
            return name

    def _create(self, name: str, function: str) -> Any:
        options = {
            "com.docker.network.bridge.enable_icc": "false",
            "com.docker.network.bridge.name": bridge_name(self.instance, function),
        }
        try:
            return self.client.networks.create(
                name,
                driver="bridge",
                labels=self.labels(function),
                options=options,
                check_duplicate=True,
            )
        except docker.errors.APIError as e:
            if e.status_code != 409:  # created meanwhile by another driver: use that one
                raise
            return self.client.networks.get(name)

    def _firewall(self) -> None:
        if self._firewall_checked:
            return
        self._firewall_checked = True
        metadata = ensure_metadata_block()
        if metadata:
            log.warning(
                "docker driver: containers can reach link-local addresses such as a "
                "cloud's metadata service (%s)",
                metadata,
            )
        if host_access_allowed():
            self.firewall_problem = "TORPOR_DOCKER_HOST_ACCESS=1"
            return
        self.firewall_problem = ensure_host_firewall()
        if self.firewall_problem:
            log.warning(
                "docker driver: containers can open connections to this host (%s): "
                "run the platform as root with iptables to block them",
                self.firewall_problem,
            )

    def forget(self, function: str) -> None:
        """Drop the cached name (the network vanished): the next ensure() looks again."""
        self._known.pop(function, None)

    def remove_if_unused(self, function: str) -> bool:
        """Remove ``function``'s network if no container of this installation uses it."""
        with self._lock:
            self._known.pop(function, None)
            name = network_name(self.instance, function)
            filters = {
                "label": [
                    f"{MANAGED}=true",
                    f"{INSTANCE}={self.instance}",
                    f"torpor.function={function}",
                ]
            }
            if self.client.api.containers(all=True, filters=filters):
                return False
            return self._remove(name)

    def prune(self) -> int:
        """Remove every empty network of this installation; -> how many."""
        filters = {"label": [f"{MANAGED}=true", f"{INSTANCE}={self.instance}"]}
        removed = 0
        with self._lock:
            for net in self.client.api.networks(filters=filters):
                fn = (net.get("Labels") or {}).get("torpor.function", "")
                self._known.pop(fn, None)
                cfilters = {"label": [*filters["label"], f"torpor.function={fn}"]}
                if self.client.api.containers(all=True, filters=cfilters):
                    continue  # a stopped or created container still refers to it
                removed += self._remove(net["Name"])
        return removed

    def _remove(self, name: str) -> bool:
        try:
            self.client.api.remove_network(name)
            return True
        except docker.errors.NotFound:
            return False
        except docker.errors.APIError as e:
            if e.status_code in (403, 409):  # in use again meanwhile
                return False
            raise

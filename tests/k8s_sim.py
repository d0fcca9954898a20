"""A simulation of the Kubernetes API subset Torpor's driver uses; not a conformance-tested server.

``SimCluster`` serves, on 127.0.0.1 (a free port, a thread of its own, standard library
only), the core/v1 ``pods`` (with ``log``) and ``configmaps`` of the namespaces it is
given, and enforces what the driver relies on:

- bearer-token authentication (401), namespaces that exist (404), names and labels that
  are valid (422), a created object that validates strictly against the Kubernetes 1.30
  schema (422 for an unknown field or a wrong type, via ``kubernetes-validate``),
  ``AlreadyExists`` (409) on a duplicate create, ``NotFound`` (404);
- a ``resourceVersion`` that grows with every write; ``PUT`` with a stale one is a 409
  ``Conflict``, as are DeleteOptions ``preconditions`` that do not hold;
- list and watch with ``labelSelector`` (``=``, ``==``, ``!=``, ``in``, ``notin``,
  exists, ``!``) and ``fieldSelector`` (``metadata.name``, ``metadata.namespace``,
  ``status.phase``, ``spec.nodeName``); a watch from a ``resourceVersion`` replays what
  followed it, one without starts with ``ADDED`` for what exists; a watch from a version
  older than the kept history gets an ``ERROR`` event with a 410 ``Expired`` status;
  ``timeoutSeconds``; ``BOOKMARK`` events when ``allowWatchBookmarks`` is asked for;
- graceful Pod deletion (``deletionTimestamp``, ``gracePeriodSeconds``, the Pod's
  ``terminationGracePeriodSeconds``), immediate deletion of Pods that never ran or ended;
- the garbage collector: objects none of whose ``ownerReferences`` exists any more are
  deleted (``Background``, the default) or freed (``Orphan``).

Its "kubelet" makes Pods run for real: each Pod gets an address of its own in 127.0.0.0/8
(Linux routes the whole block to ``lo``), so every Pod serves on its spec port at its own
IP, as on a cluster. A container's image is looked up in ``images`` (image -> argv); an
unknown image waits with ``ErrImagePull``. The container is a local process (its own
session, stdout and stderr in its log); emptyDir volumes are folders of their own; the
kubelet runs readiness probes (httpGet, tcpSocket) and reports ``Ready`` (at once for a
container without one); a process that
ends makes the Pod ``Succeeded``/``Failed`` with its exit code (``restartPolicy`` is not
applied: the driver only uses ``Never``); deletion sends SIGTERM, then SIGKILL after the
grace period.

What a process cannot imitate is said here rather than faked: no network namespace (the
kubelet rewrites the env value ``0.0.0.0``, "my own interfaces", to the Pod's IP, and
env values under an emptyDir's mountPath to its folder), no user switch (``runAsUser``,
``readOnlyRootFilesystem``, capabilities, seccomp and resource limits are recorded but
not enforced: the Docker test of the runtime image checks those), no image pulls, no
PATCH, no foreground deletion, no scheduling constraints.
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import re
import secrets as pysecrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

KINDS = {"pods": "Pod", "configmaps": "ConfigMap"}
_PATH = re.compile(
    r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[a-z]+))?)?$"
)
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_FIELDS: dict[str, Callable[[dict[str, Any]], str]] = {
    "metadata.name": lambda o: o["metadata"].get("name", ""),
    "metadata.namespace": lambda o: o["metadata"].get("namespace", ""),
    "status.phase": lambda o: (o.get("status") or {}).get("phase", ""),
    "spec.nodeName": lambda o: (o.get("spec") or {}).get("nodeName", ""),
}


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ApiFailure(Exception):
    """Becomes a ``Status`` response."""

    REASONS = {
        400: "BadRequest",
        401: "Unauthorized",
        404: "NotFound",
        405: "MethodNotAllowed",
        409: "Conflict",
        410: "Expired",
        422: "Invalid",
    }

    def __init__(
        self,
        code: int,
        message: str,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.reason = reason or self.REASONS.get(code, "InternalError")
        self.details = details or {}

    def status(self) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


# -- selectors -----------------------------------------------------------------------------
def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [p.strip() for p in out if p.strip()]


def _holds(op: str, have: str | None, values: set[str]) -> bool:
    if op == "in":
        return have in values
    if op == "notin":
        return have not in values
    if op == "exists":
        return have is not None
    if op == "!exists":
        return have is None
    if op == "!=":
        return have != next(iter(values))
    return have == next(iter(values))


def parse_label_selector(text: str) -> Callable[[dict[str, str]], bool]:
    """A label selector (the set-based grammar) as a predicate over a label dict."""
    reqs: list[tuple[str, str, set[str]]] = []
    for req in _split_top(text or ""):
        m = re.fullmatch(r"([^\s!=,()]+)\s+(in|notin)\s+\(([^()]*)\)", req)
        if m:
            reqs.append(
                (m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()})
            )
            continue
        m = re.fullmatch(r"([^\s!=,()]+)\s*(==|=|!=)\s*([^\s!=,()]*)", req)
        if m:
            reqs.append((m.group(1), "!=" if m.group(2) == "!=" else "=", {m.group(3)}))
            continue
        m = re.fullmatch(r"(!?)([^\s!=,()]+)", req)
        if m:
            reqs.append((m.group(2), "!exists" if m.group(1) else "exists", set()))
            continue
        raise ApiFailure(400, f"unable to parse requirement: {req!r}")
    return lambda labels: all(_holds(op, labels.get(k), vs) for k, op, vs in reqs)


def parse_field_selector(text: str) -> Callable[[dict[str, Any]], bool]:
    reqs: list[tuple[Callable[[dict[str, Any]], str], str, set[str]]] = []
    for req in _split_top(text or ""):
        m = re.fullmatch(r"([a-zA-Z.]+)\s*(==|=|!=)\s*(.*)", req)
        if not m:
            raise ApiFailure(400, f"invalid field selector: {req!r}")
        field, op, val = m.groups()
        get = _FIELDS.get(field)
        if get is None:
            raise ApiFailure(400, f'field label not supported: "{field}"')
        reqs.append((get, "!=" if op == "!=" else "=", {val}))
    return lambda obj: all(_holds(op, get(obj), vs) for get, op, vs in reqs)


def _check_labels(labels: Any, where: str) -> None:
    if labels is None:
        return
    if not isinstance(labels, dict):
        raise ApiFailure(422, f"{where}: must be a map of strings")
    for k, v in labels.items():
        prefix, _, name = k.rpartition("/")
        if (
            (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)))
            or len(name) > 63
            or not _LABEL_NAME.fullmatch(name)
        ):
            raise ApiFailure(
                422,
                f"{where}: Invalid value: {k!r}: name part must consist of alphanumeric "
                "characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            )
        if not isinstance(v, str) or len(v) > 63 or (v and not _LABEL_NAME.fullmatch(v)):
            raise ApiFailure(
                422,
                f"{where}: Invalid value: {v!r}: must be no more than 63 characters "
                "and consist of alphanumerics, '-', '_' or '.'",
            )


# -- the simulated node --------------------------------------------------------------------
class _Container:
    """One Pod's process, run by the kubelet thread."""

    def __init__(self, key: tuple[str, str, str]) -> None:
        self.key = key
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.dir: Path | None = None
        self.started = threading.Event()
        self.exited = threading.Event()
        self.kill_at: float | None = None
        self.term_sent = False


class SimCluster:
    """See the module docstring. ``start()`` it, hand ``kubeconfig()`` to a client,
    ``stop()`` it (kills every Pod process)."""

    def __init__(
        self,
        namespaces: tuple[str, ...] = ("default",),
        *,
        images: dict[str, list[str]] | None = None,
        secrets: dict[tuple[str, str], dict[str, str]] | None = None,
        kubelet: bool = True,
        history: int = 2000,
        bookmark_interval: float = 1.0,
        token: str | None = None,
        ip_delay: float = 0.0,
        schema: str | None = "1.30.0",
    ) -> None:
        self.namespaces = set(namespaces)
        self.schema = (
            schema  # Kubernetes version whose schemas a created object must validate against
        )
        self.ip_delay = ip_delay  # seconds between scheduling a Pod and giving it an IP
        self.images = dict(images or {})
        self.secrets = dict(secrets or {})
        self.kubelet = kubelet
        self.bookmark_interval = bookmark_interval
        self.token = token or pysecrets.token_hex(16)
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.rv = 0
        self.compacted = 0  # watches from a resourceVersion below this get 410 Gone
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, ns, name)
        self.history: deque[tuple[int, str, str, dict[str, Any] | None, dict[str, Any] | None]] = (
            deque(maxlen=history)
        )
        self.containers: dict[str, _Container] = {}  # pod uid -> container
        self.requests: list[
            tuple[str, str, dict[str, str]]
        ] = []  # (method, path, query) as received
        self._cut = 0  # generation: open watches whose generation is older are cut
        self.gc_sweeps = 0  # passes of the garbage collector so far (tests wait for some)
        self._closing = False
        self._root = Path(tempfile.mkdtemp(prefix="k8s-sim-"))
        self._net = (pysecrets.randbelow(150) + 100, pysecrets.randbelow(250) + 1)
        self._next_ip = 2
        self._server: http.server.ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    # -- life ----------------------------------------------------------------------------
    def start(self) -> SimCluster:
        sim = self

        class Handler(_Handler):
            cluster = sim

        self._server = _Server(("127.0.0.1", 0), Handler)
        t = threading.Thread(target=self._server.serve_forever, name="k8s-sim-api", daemon=True)
        t.start()
        gc = threading.Thread(target=self._gc_loop, name="k8s-sim-gc", daemon=True)
        gc.start()
        self._threads += [t, gc]
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def kubeconfig(self, namespace: str | None = None) -> dict[str, Any]:
        """A kubeconfig (as a dict) that points at this simulation."""
        ctx: dict[str, Any] = {"cluster": "sim", "user": "sim"}
        if namespace:
            ctx["namespace"] = namespace
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "sim",
            "clusters": [{"name": "sim", "cluster": {"server": self.url}}],
            "users": [{"name": "sim", "user": {"token": self.token}}],
            "contexts": [{"name": "sim", "context": ctx}],
        }

    def stop(self) -> None:
        with self.cond:
            self._closing = True
            self.cond.notify_all()
            containers = list(self.containers.values())
        for c in containers:
            if c.proc is not None and c.proc.poll() is None:
                _killpg(c.proc, signal.SIGKILL)
                try:
                    c.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for t in self._threads:
            t.join(5)
        shutil.rmtree(self._root, ignore_errors=True)

    # -- test hooks ----------------------------------------------------------------------
    def compact(self) -> None:
        """Forget the whole event history: a watch from any version seen so far gets 410."""
        with self.cond:
            self.history.clear()
            self.compacted = self.rv + 1
            self.cond.notify_all()

    def cut_watches(self) -> None:
        """Drop every open watch connection mid-stream (as a restarting API server would)."""
        with self.cond:
            self._cut += 1
            self.cond.notify_all()

    def get(self, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            obj = self.objects.get((plural, ns, name))
            return copy.deepcopy(obj) if obj is not None else None

    def objects_of(self, plural: str, ns: str) -> list[dict[str, Any]]:
        with self.lock:
            return [
                copy.deepcopy(o)
                for (p, n, _), o in sorted(self.objects.items())
                if p == plural and n == ns
            ]

    def watch_requests(self, plural: str = "pods") -> list[dict[str, str]]:
        return [
            q
            for m, p, q in list(self.requests)
            if m == "GET" and p.endswith(f"/{plural}") and q.get("watch") in ("true", "1")
        ]

    def process_of(self, ns: str, name: str) -> subprocess.Popen[bytes] | None:
        with self.lock:
            obj = self.objects.get(("pods", ns, name))
            c = self.containers.get(obj["metadata"]["uid"]) if obj else None
            return c.proc if c else None

    # -- writes (callers hold the lock) --------------------------------------------------
    def _commit(self, kind: str, key: tuple[str, str, str], new: dict[str, Any] | None) -> None:
        old = self.objects.get(key)
        self.rv += 1
        if new is not None:
            new["metadata"]["resourceVersion"] = str(self.rv)
            self.objects[key] = new
        else:
            self.objects.pop(key, None)
            old = copy.deepcopy(old)
            if old is not None:
                old["metadata"]["resourceVersion"] = str(self.rv)
        self.history.append((self.rv, key[0], key[1], copy.deepcopy(new), copy.deepcopy(old)))
        self.cond.notify_all()

    def _need_ns(self, ns: str) -> None:
        if ns not in self.namespaces:
            raise ApiFailure(
                404, f'namespaces "{ns}" not found', details={"name": ns, "kind": "namespaces"}
            )

    def create(self, plural: str, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        kind = KINDS[plural]
        if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
            raise ApiFailure(400, "the body must be an object with metadata")
        if body.get("kind") not in (None, kind):
            raise ApiFailure(400, f"the body is a {body.get('kind')}, not a {kind}")
        meta = body["metadata"]
        if meta.get("namespace") not in (None, ns):
            raise ApiFailure(
                400,
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + pysecrets.token_hex(3)[:5]
        name = meta.get("name") or ""
        if len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
            raise ApiFailure(
                422,
                f'{kind} "{name}" is invalid: metadata.name: Invalid value: a lowercase RFC 1123 '
                "subdomain must consist of lower case alphanumeric characters, '-' or '.'",
            )
        _check_labels(meta.get("labels"), "metadata.labels")
        for ref in meta.get("ownerReferences") or []:
            if not all(ref.get(k) for k in ("apiVersion", "kind", "name", "uid")):
                raise ApiFailure(
                    422, "metadata.ownerReferences: apiVersion, kind, name and uid are required"
                )
        if self.schema:
            self._check_schema(kind, name, body)
        if kind == "Pod":
            containers = (body.get("spec") or {}).get("containers") or []
            if not containers or not all(c.get("name") and c.get("image") for c in containers):
                raise ApiFailure(
                    422,
                    f'Pod "{name}" is invalid: spec.containers: Required value (name and image)',
                )
            if (body.get("spec") or {}).get("restartPolicy", "Always") not in (
                "Always",
                "OnFailure",
                "Never",
            ):
                raise ApiFailure(422, "spec.restartPolicy: Unsupported value")
        with self.cond:
            self._need_ns(ns)
            key = (plural, ns, name)
            if key in self.objects:
                raise ApiFailure(
                    409,
                    f'{plural} "{name}" already exists',
                    reason="AlreadyExists",
                    details={"name": name, "kind": plural},
                )
            obj = copy.deepcopy(body)
            obj["kind"], obj["apiVersion"] = kind, "v1"
            obj["metadata"].update(
                namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339()
            )
            obj["metadata"].pop("deletionTimestamp", None)
            if kind == "Pod":
                obj["status"] = {"phase": "Pending", "qosClass": "Guaranteed"}
            self._commit(kind, key, obj)
            out = copy.deepcopy(obj)
        if kind == "Pod" and self.kubelet:
            c = _Container(key)
            with self.lock:
                self.containers[obj["metadata"]["uid"]] = c
            t = threading.Thread(
                target=self._run_pod,
                args=(c, obj["metadata"]["uid"]),
                daemon=True,
                name=f"k8s-sim-kubelet-{name}",
            )
            t.start()
        return out

    def _check_schema(self, kind: str, name: str, body: dict[str, Any]) -> None:
        """422 for a body the real API server would refuse by its schema: an unknown field,
        a wrong type (strict validation against the Kubernetes ``schema`` version)."""
        import kubernetes_validate

        doc = {**body, "apiVersion": body.get("apiVersion") or "v1", "kind": kind}
        try:
            kubernetes_validate.validate(doc, self.schema, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(map(str, e.path)) or "(root)"
            raise ApiFailure(422, f'{kind} "{name}" is invalid: {where}: {e.message}') from None

    def replace(self, plural: str, ns: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.cond:
            self._need_ns(ns)
            key = (plural, ns, name)
            cur = self.objects.get(key)
            if cur is None:
                raise ApiFailure(
                    404, f'{plural} "{name}" not found', details={"name": name, "kind": plural}
                )
            meta = body.get("metadata") or {}
            if meta.get("name") not in (None, name):
                raise ApiFailure(400, "the name of the object does not match the name on the URL")
            if meta.get("uid") and meta["uid"] != cur["metadata"]["uid"]:
                raise ApiFailure(
                    409,
                    f"Precondition failed: UID in precondition: {meta['uid']}, "
                    f"UID in object meta: {cur['metadata']['uid']}",
                )
            if (
                meta.get("resourceVersion")
                and meta["resourceVersion"] != cur["metadata"]["resourceVersion"]
            ):
                raise ApiFailure(
                    409,
                    f'Operation cannot be fulfilled on {plural} "{name}": the object has been '
                    "modified; please apply your changes to the latest version and try again",
                    details={"name": name, "kind": plural},
                )
            _check_labels(meta.get("labels"), "metadata.labels")
            new = copy.deepcopy(cur)
            for k in ("labels", "annotations", "ownerReferences", "finalizers"):
                if k in meta:
                    new["metadata"][k] = copy.deepcopy(meta[k])
                else:
                    new["metadata"].pop(k, None)
            if plural == "pods":
                if body.get("spec") is not None and body["spec"] != cur.get("spec"):
                    raise ApiFailure(
                        422,
                        f'Pod "{name}" is invalid: spec: Forbidden: pod updates may not change '
                        "fields other than metadata in this simulation",
                    )
            else:
                new["data"] = copy.deepcopy(body.get("data") or {})
            self._commit(KINDS[plural], key, new)
            return copy.deepcopy(new)

    def delete(
        self,
        plural: str,
        ns: str,
        name: str,
        grace: int | None = None,
        policy: str | None = None,
        preconditions: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if policy not in (None, "Background", "Orphan"):
            raise ApiFailure(
                400, f"propagationPolicy {policy!r} is not supported by this simulation"
            )
        with self.cond:
            self._need_ns(ns)
            key = (plural, ns, name)
            cur = self.objects.get(key)
            if cur is None:
                raise ApiFailure(
                    404, f'{plural} "{name}" not found', details={"name": name, "kind": plural}
                )
            pre = preconditions or {}
            if pre.get("uid") and pre["uid"] != cur["metadata"]["uid"]:
                raise ApiFailure(
                    409,
                    f"Precondition failed: UID in precondition: {pre['uid']}, "
                    f"UID in object meta: {cur['metadata']['uid']}",
                )
            if (
                pre.get("resourceVersion")
                and pre["resourceVersion"] != cur["metadata"]["resourceVersion"]
            ):
                raise ApiFailure(
                    409,
                    f"Precondition failed: ResourceVersion in precondition: "
                    f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                    f"{cur['metadata']['resourceVersion']}",
                )
            uid = cur["metadata"]["uid"]
            if policy == "Orphan":
                for k, o in list(self.objects.items()):
                    refs = o["metadata"].get("ownerReferences") or []
                    if any(r.get("uid") == uid for r in refs):
                        o = copy.deepcopy(o)
                        o["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                        self._commit(KINDS[k[0]], k, o)
            if plural != "pods":
                self._commit(KINDS[plural], key, None)
                return copy.deepcopy(cur)
            if grace is None:
                grace = int((cur.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
            grace = max(0, int(grace))
            c = self.containers.get(uid)
            ran = c is not None and c.proc is not None and c.proc.poll() is None
            if not ran or grace == 0:
                self._commit("Pod", key, None)  # never ran, has ended, or immediate: gone now
                if c is not None:
                    c.kill_at = time.monotonic()
                return copy.deepcopy(cur)
            meta = cur["metadata"]
            if (
                meta.get("deletionTimestamp")
                and int(meta.get("deletionGracePeriodSeconds", grace)) <= grace
            ):
                return copy.deepcopy(cur)  # already terminating, no sooner
            new = copy.deepcopy(cur)
            new["metadata"]["deletionTimestamp"] = now_rfc3339()
            new["metadata"]["deletionGracePeriodSeconds"] = grace
            assert c is not None
            c.kill_at = time.monotonic() + grace
            self._commit("Pod", key, new)
            return copy.deepcopy(new)

    # -- reads -----------------------------------------------------------------------------
    def list_objects(self, plural: str, ns: str, labels: str, fields: str) -> dict[str, Any]:
        match_l, match_f = parse_label_selector(labels), parse_field_selector(fields)
        with self.lock:
            self._need_ns(ns)
            items = [
                copy.deepcopy(o)
                for (p, n, _), o in sorted(self.objects.items())
                if p == plural
                and n == ns
                and match_l(o["metadata"].get("labels") or {})
                and match_f(o)
            ]
            for it in items:
                it.pop("kind", None)
                it.pop("apiVersion", None)
            return {
                "kind": f"{KINDS[plural]}List",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.rv)},
                "items": items,
            }

    def watch(self, plural: str, ns: str, params: dict[str, str]) -> Iterator[dict[str, Any]]:
        """Check the parameters (ApiFailure), then return the events as dicts; they end on
        timeoutSeconds, a cut, or shutdown."""
        match_l = parse_label_selector(params.get("labelSelector", ""))
        match_f = parse_field_selector(params.get("fieldSelector", ""))

        def matches(o: dict[str, Any] | None) -> bool:
            return (
                o is not None
                and o["metadata"].get("namespace") == ns
                and match_l(o["metadata"].get("labels") or {})
                and match_f(o)
            )

        try:
            timeout = float(params.get("timeoutSeconds") or 1800)
        except ValueError:
            raise ApiFailure(400, "timeoutSeconds: expected a number") from None
        bookmarks = params.get("allowWatchBookmarks") in ("true", "1")
        rv_param = params.get("resourceVersion", "")
        with self.lock:
            self._need_ns(ns)
            gen = self._cut
            if rv_param in ("", "0"):
                initial = [
                    {"type": "ADDED", "object": copy.deepcopy(o)}
                    for (p, n, _), o in sorted(self.objects.items())
                    if p == plural and n == ns and matches(o)
                ]
                pos = self.rv
            else:
                if not rv_param.isdigit():
                    raise ApiFailure(
                        400, f"resourceVersion {rv_param!r}: not a resource version of this server"
                    )
                pos = int(rv_param)
                initial = []
        return self._events(plural, ns, matches, initial, pos, gen, timeout, bookmarks)

    def _oldest_kept(self) -> int:
        """Watches must start at this resourceVersion or later (callers hold the lock)."""
        lost = self.history[0][0] - 1 if len(self.history) == self.history.maxlen else 0
        return max(self.compacted - 1, lost)

    def _events(
        self,
        plural: str,
        ns: str,
        matches: Callable[[dict[str, Any] | None], bool],
        initial: list[dict[str, Any]],
        pos: int,
        gen: int,
        timeout: float,
        bookmarks: bool,
    ) -> Iterator[dict[str, Any]]:
        kind = KINDS[plural]
        yield from initial
        end = time.monotonic() + timeout
        next_bookmark = time.monotonic() + self.bookmark_interval
        while True:
            out: list[dict[str, Any]] = []
            with self.cond:
                if pos < self._oldest_kept():
                    yield {
                        "type": "ERROR",
                        "object": ApiFailure(
                            410, f"too old resource version: {pos} ({self._oldest_kept()})"
                        ).status(),
                    }
                    return
                while True:
                    if self._closing:
                        return
                    if self._cut != gen:
                        raise _Cut()
                    newer = [e for e in self.history if e[0] > pos]
                    if newer or time.monotonic() >= min(end, next_bookmark if bookmarks else end):
                        break
                    self.cond.wait(
                        max(0.01, min(end, next_bookmark if bookmarks else end) - time.monotonic())
                    )
                for rv, p, n, new, old in newer:
                    pos = rv
                    if p != plural or n != ns:
                        continue
                    now_in, was_in = matches(new), matches(old)
                    if now_in and was_in:
                        out.append({"type": "MODIFIED", "object": new})
                    elif now_in:
                        out.append({"type": "ADDED", "object": new})
                    elif was_in:
                        out.append({"type": "DELETED", "object": new if new is not None else old})
                if not newer and bookmarks and time.monotonic() >= next_bookmark:
                    pos = max(pos, self.rv)
                    out.append(
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": kind,
                                "apiVersion": "v1",
                                "metadata": {"resourceVersion": str(pos)},
                            },
                        }
                    )
                    next_bookmark = time.monotonic() + self.bookmark_interval
            yield from out
            if time.monotonic() >= end:
                return

    def log_stream(self, ns: str, name: str, params: dict[str, str]) -> Iterator[bytes]:
        follow = params.get("follow") in ("true", "1")
        tail = params.get("tailLines")
        with self.lock:
            self._need_ns(ns)
            obj = self.objects.get(("pods", ns, name))
            if obj is None:
                raise ApiFailure(
                    404, f'pods "{name}" not found', details={"name": name, "kind": "pods"}
                )
            cname = obj["spec"]["containers"][0]["name"]
            if params.get("container") not in (None, "", cname):
                raise ApiFailure(
                    400, f"container {params['container']} is not valid for pod {name}"
                )
            c = self.containers.get(obj["metadata"]["uid"])
            if c is None or c.log_path is None or not c.started.is_set():
                waiting = (
                    ((obj.get("status") or {}).get("containerStatuses") or [{}])[0]
                    .get("state", {})
                    .get("waiting", {})
                    .get("reason", "ContainerCreating")
                )
                raise ApiFailure(
                    400, f'container "{cname}" in pod "{name}" is waiting to start: {waiting}'
                )
            uid = obj["metadata"]["uid"]
        n: int | None = None
        if tail not in (None, ""):
            try:
                n = int(tail)  # type: ignore[arg-type]
            except ValueError:
                raise ApiFailure(400, "tailLines: expected an integer") from None
        return self._log_chunks(c, ns, name, uid, n, follow)

    def _log_chunks(
        self, c: _Container, ns: str, name: str, uid: str, n: int | None, follow: bool
    ) -> Iterator[bytes]:
        assert c.log_path is not None
        with open(c.log_path, "rb") as f:
            data = f.read()
            if n is not None:
                lines = data.splitlines(keepends=True)
                data = b"".join(lines[-n:]) if n > 0 else b""
            if data:
                yield data
            if not follow:
                return
            while True:
                chunk = f.read(65536)
                if chunk:
                    yield chunk
                    continue
                with self.lock:
                    cur = self.objects.get(("pods", ns, name))
                    gone = self._closing or cur is None or cur["metadata"]["uid"] != uid
                if gone or c.exited.is_set():
                    rest = f.read()
                    if rest:
                        yield rest
                    return
                time.sleep(0.05)

    # -- kubelet ---------------------------------------------------------------------------
    def _alloc_ip(self) -> str:
        n = self._next_ip
        self._next_ip += 1
        a, b = self._net
        return f"127.{a}.{b + n // 250}.{n % 250 + 2}"

    def _update_pod(self, uid: str, change: Callable[[dict[str, Any]], None]) -> bool:
        """Apply ``change`` to the Pod with ``uid`` (a status write); False if it is gone."""
        with self.cond:
            for key, o in self.objects.items():
                if key[0] == "pods" and o["metadata"]["uid"] == uid:
                    new = copy.deepcopy(o)
                    change(new)
                    if new != o:
                        self._commit("Pod", key, new)
                    return True
        return False

    def _image_argv(self, image: str) -> list[str] | None:
        if image in self.images:
            return list(self.images[image])
        for pattern, argv in self.images.items():
            if pattern.endswith("*") and image.startswith(pattern[:-1]):
                return list(argv)
        return None

    def _run_pod(self, c: _Container, uid: str) -> None:
        try:
            self._run_pod_inner(c, uid)
        finally:
            c.exited.set()

    def _run_pod_inner(self, c: _Container, uid: str) -> None:
        plural, ns, name = c.key
        with self.lock:
            pod = copy.deepcopy(self.objects.get(c.key))
        if pod is None:
            return
        spec = pod["spec"]
        cont = spec["containers"][0]
        ip = self._alloc_ip()
        cstatus = {
            "name": cont["name"],
            "image": cont["image"],
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "started": False,
        }

        def scheduled(p: dict[str, Any]) -> None:
            p["spec"]["nodeName"] = "sim-node"
            p["status"].update(
                conditions=[
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Ready", "status": "False"},
                ],
                containerStatuses=[
                    {**cstatus, "state": {"waiting": {"reason": "ContainerCreating"}}}
                ],
            )

        if not self._update_pod(uid, scheduled):
            return
        until = time.monotonic() + self.ip_delay  # the sandbox (and its IP) takes this long
        while time.monotonic() < until and c.kill_at is None and not self._closing:
            time.sleep(0.02)
        if not self._update_pod(
            uid,
            lambda p: p["status"].update(
                hostIP="127.0.0.1", podIP=ip, podIPs=[{"ip": ip}], startTime=now_rfc3339()
            ),
        ):
            return
        argv = self._image_argv(cont["image"])
        env: dict[str, str] = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOSTNAME": name}
        c.dir = self._root / uid
        c.dir.mkdir(parents=True, exist_ok=True)
        mounts: dict[str, str] = {}
        for vol in spec.get("volumes") or []:
            if "emptyDir" in vol:
                d = c.dir / "volumes" / vol["name"]
                d.mkdir(parents=True, exist_ok=True)
                for vm in cont.get("volumeMounts") or []:
                    if vm.get("name") == vol["name"]:
                        mounts[vm["mountPath"].rstrip("/") or "/"] = str(d)
        if "/tmp" in mounts:
            env["TMPDIR"] = mounts["/tmp"]
        waiting: tuple[str, str] | None = None
        for e in cont.get("env") or []:
            if "value" in e:
                env[e["name"]] = e["value"]
            elif "valueFrom" in e and "secretKeyRef" in e["valueFrom"]:
                ref = e["valueFrom"]["secretKeyRef"]
                value = self.secrets.get((ns, ref.get("name", "")), {}).get(ref.get("key", ""))
                if value is None and not ref.get("optional"):
                    waiting = (
                        "CreateContainerConfigError",
                        f'secret "{ref.get("name")}" not found',
                    )
                elif value is not None:
                    env[e["name"]] = value
        for k, v in list(env.items()):
            if v == "0.0.0.0":
                env[k] = ip  # no network namespace: "all my interfaces" is the Pod's IP
            for mount, host in mounts.items():
                if v == mount or v.startswith(mount + "/"):
                    env[k] = host + v[len(mount) :]
        if argv is None:
            waiting = (
                "ErrImagePull",
                f'image "{cont["image"]}" is not known to the simulated kubelet',
            )
        if waiting is not None:
            reason, message = waiting

            def wait_state(p: dict[str, Any]) -> None:
                p["status"]["containerStatuses"] = [
                    {**cstatus, "state": {"waiting": {"reason": reason, "message": message}}}
                ]

            self._update_pod(uid, wait_state)
            while not self._closing and c.kill_at is None:
                time.sleep(0.05)
            return
        assert argv is not None
        if c.kill_at is not None:
            return  # deleted before its container started
        c.log_path = c.dir / "container.log"
        with open(c.log_path, "ab") as log:
            try:
                c.proc = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=str(c.dir),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as e:
                log.write(f"k8s-sim: cannot start {argv[0]}: {e}\n".encode())
        started = now_rfc3339()
        c.started.set()
        if c.proc is None:
            self._update_pod(
                uid,
                lambda p: p["status"].update(
                    phase="Failed",
                    containerStatuses=[
                        {
                            **cstatus,
                            "state": {"terminated": {"exitCode": 128, "reason": "StartError"}},
                        }
                    ],
                ),
            )
            return

        def running(p: dict[str, Any]) -> None:
            p["status"]["phase"] = "Running"
            p["status"]["containerStatuses"] = [
                {**cstatus, "started": True, "state": {"running": {"startedAt": started}}}
            ]

        self._update_pod(uid, running)
        probe = cont.get("readinessProbe") or {}
        if not probe:  # no readiness probe: Ready as soon as the container runs (as on a cluster)

            def ready_now(p: dict[str, Any]) -> None:
                for cond in p["status"]["conditions"]:
                    if cond["type"] == "Ready":
                        cond["status"] = "True"
                p["status"]["containerStatuses"][0]["ready"] = True

            self._update_pod(uid, ready_now)
        period = float(probe.get("periodSeconds", 10))
        next_probe = time.monotonic()
        ready = False
        while True:
            code = c.proc.poll()
            if code is not None:
                break
            if c.kill_at is not None:
                if not c.term_sent:
                    _killpg(c.proc, signal.SIGTERM)
                    c.term_sent = True
                if time.monotonic() >= c.kill_at:
                    _killpg(c.proc, signal.SIGKILL)
            if self._closing:
                _killpg(c.proc, signal.SIGKILL)
            if probe and time.monotonic() >= next_probe and c.kill_at is None:
                next_probe = time.monotonic() + period
                ok = _probe(ip, probe)
                if ok != ready:
                    ready = ok

                    def set_ready(p: dict[str, Any], ok: bool = ok) -> None:
                        for cond in p["status"]["conditions"]:
                            if cond["type"] == "Ready":
                                cond["status"] = "True" if ok else "False"
                        p["status"]["containerStatuses"][0]["ready"] = ok

                    self._update_pod(uid, set_ready)
            try:
                c.proc.wait(0.05)
            except subprocess.TimeoutExpired:
                pass
        finished = now_rfc3339()

        def terminated(p: dict[str, Any]) -> None:
            p["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
            for cond in p["status"]["conditions"]:
                if cond["type"] == "Ready":
                    cond["status"] = "False"
            p["status"]["containerStatuses"] = [
                {
                    **cstatus,
                    "started": False,
                    "state": {
                        "terminated": {
                            "exitCode": code if code >= 0 else 128 - code,
                            "reason": "Completed" if code == 0 else "Error",
                            "startedAt": started,
                            "finishedAt": finished,
                        }
                    },
                }
            ]

        self._update_pod(uid, terminated)
        with self.cond:  # a Pod being deleted goes once its container has stopped
            for key, o in list(self.objects.items()):
                if (
                    key[0] == "pods"
                    and o["metadata"]["uid"] == uid
                    and o["metadata"].get("deletionTimestamp")
                ):
                    self._commit("Pod", key, None)

    # -- garbage collector -----------------------------------------------------------------
    def _gc_loop(self) -> None:
        while True:
            with self.cond:
                if self._closing:
                    return
                self.cond.wait(0.1)
                if self._closing:
                    return
                uids = {o["metadata"]["uid"] for o in self.objects.values()}
                doomed = [
                    k
                    for k, o in self.objects.items()
                    if o["metadata"].get("ownerReferences")
                    and not o["metadata"].get("deletionTimestamp")
                    and not any(r.get("uid") in uids for r in o["metadata"]["ownerReferences"])
                ]
                for plural, ns, name in doomed:
                    try:
                        self.delete(plural, ns, name)
                    except ApiFailure:
                        pass
                self.gc_sweeps += 1

    def sweeps_after(self, n: int) -> Callable[[], bool]:
        """A predicate for polling: true once ``n`` garbage-collector passes begun after
        this call have run (a pass holds the lock, so none is half done now)."""
        with self.lock:
            target = self.gc_sweeps + n
        return lambda: self.gc_sweeps >= target


class _Cut(Exception):
    """A watch the test asked to cut."""


def _killpg(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _probe(ip: str, probe: dict[str, Any]) -> bool:
    timeout = float(probe.get("timeoutSeconds", 1))
    action = probe.get("httpGet") or probe.get("tcpSocket") or {}
    port = action.get("port")
    if not isinstance(port, int):
        return False
    try:
        with socket.create_connection((ip, port), timeout=timeout) as s:
            if "httpGet" not in probe:
                return True
            path = probe["httpGet"].get("path", "/")
            s.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            line = s.makefile("rb").readline()
            parts = line.split()
            return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
    except OSError:
        return False


# -- HTTP ----------------------------------------------------------------------------------
class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class _Handler(http.server.BaseHTTPRequestHandler):
    cluster: SimCluster
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        if n <= 0:
            return None
        raw = self.rfile.read(n)
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiFailure(400, "the body is not valid JSON") from None

    def _send_json(self, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, ctype: str, chunks: Iterator[bytes]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        try:
            for chunk in chunks:
                self._chunk(chunk)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except _Cut:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)  # mid-stream, no final chunk
            except OSError:
                pass
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    def _handle(self, method: str) -> None:
        cluster = self.cluster
        url = urllib.parse.urlsplit(self.path)
        query = {
            k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()
        }
        with cluster.lock:
            cluster.requests.append((method, url.path, query))
        try:
            if self.headers.get("Authorization") != f"Bearer {cluster.token}":
                raise ApiFailure(401, "Unauthorized")
            body = self._body() if method in ("POST", "PUT", "DELETE", "PATCH") else None
            if url.path == "/version" and method == "GET":
                self._send_json(
                    200, {"major": "1", "minor": "30", "gitVersion": "v1.30.0-torpor-sim"}
                )
                return
            m = _PATH.match(url.path)
            if m is None or m.group("plural") not in KINDS:
                raise ApiFailure(
                    404, f"the server could not find the requested resource ({url.path})"
                )
            ns, plural, name, sub = (
                m.group("ns"),
                m.group("plural"),
                m.group("name"),
                m.group("sub"),
            )
            if sub is not None:
                if sub != "log" or plural != "pods" or method != "GET":
                    raise ApiFailure(
                        404, f"the server could not find the requested resource ({url.path})"
                    )
                assert name is not None
                self._stream("text/plain", cluster.log_stream(ns, name, query))
                return
            if method == "PATCH":
                raise ApiFailure(405, "PATCH is not supported by this simulation")
            if name is None:
                if method == "GET" and query.get("watch") in ("true", "1"):
                    events = (
                        json.dumps(e).encode() + b"\n" for e in cluster.watch(plural, ns, query)
                    )
                    self._stream("application/json", events)
                elif method == "GET":
                    self._send_json(
                        200,
                        cluster.list_objects(
                            plural,
                            ns,
                            query.get("labelSelector", ""),
                            query.get("fieldSelector", ""),
                        ),
                    )
                elif method == "POST":
                    self._send_json(201, cluster.create(plural, ns, body or {}))
                else:
                    raise ApiFailure(
                        405, f"{method} on a collection is not supported by this simulation"
                    )
                return
            if method == "GET":
                obj = cluster.get(plural, ns, name)
                if obj is None:
                    with cluster.lock:
                        cluster._need_ns(ns)
                    raise ApiFailure(
                        404, f'{plural} "{name}" not found', details={"name": name, "kind": plural}
                    )
                self._send_json(200, obj)
            elif method == "PUT":
                self._send_json(200, cluster.replace(plural, ns, name, body or {}))
            elif method == "DELETE":
                opts = body if isinstance(body, dict) else {}
                grace = query.get("gracePeriodSeconds", opts.get("gracePeriodSeconds"))
                policy = query.get("propagationPolicy", opts.get("propagationPolicy"))
                self._send_json(
                    200,
                    cluster.delete(
                        plural,
                        ns,
                        name,
                        None if grace in (None, "") else int(grace),
                        policy or None,
                        opts.get("preconditions"),
                    ),
                )
            else:
                raise ApiFailure(405, f"{method} is not supported by this simulation")
        except ApiFailure as e:
            self._send_json(e.code, e.status())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

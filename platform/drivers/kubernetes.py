"""The ``kubernetes`` driver: each replica is a Pod on a Kubernetes cluster.

Client: ``lightkube`` (async, typed models, in-cluster and kubeconfig configuration), an
optional dependency (``pip install 'torpor[kubernetes]'``) imported only when this
driver is chosen.

Pods directly, no Deployment: the controller already decides how many replicas a
revision has, names them, drains the one it picks before stopping it and backs off a
crash loop; a ReplicaSet would be a second decision-maker that picks its own victims on
scale-down and restarts crashed containers behind the controller's back. So each Pod
has ``restartPolicy: Never`` (a dead replica is the controller's to replace, as on
Docker) and an owner reference to a per-revision ConfigMap ``torpor-rev-REVISION``,
made in ``prepare()`` and deleted in ``remove()``: the cluster's garbage collector then
deletes what is left of the revision's Pods, even if no controller runs. A ConfigMap is
the smallest namespaced object that can own Pods (owners must share the namespace) and
needs no extra RBAC beyond create/get/delete on configmaps.

Pods carry the labels ``torpor.managed=true``, ``torpor.instance``, ``torpor.function``,
``torpor.revision`` and ``torpor.replica`` (as on Docker; values longer than a label
allows are shortened with a hash, the full names are in annotations of the same keys),
so a new driver instance adopts them through ``list()`` (label selector
``torpor.managed=true,torpor.instance=ID``) and two installations in one namespace never
touch each other's Pods.

Hardening: the Pod runs as uid/gid 65534 (``runAsNonRoot``, ``fsGroup``), seccomp
``RuntimeDefault``, no service account token, no service links; its container has a
read-only root file system, ``allowPrivilegeEscalation: false``, every capability
dropped, requests = limits from ``resources:`` (Guaranteed QoS), and a size-limited
emptyDir on ``/tmp``. No ``preStop`` hook: the controller takes a replica out of the
gateways' rotation (the store) before it deletes the Pod, and the runtime drains
in-flight requests on SIGTERM; a ``sleep`` hook would only delay every stop (and need a
``sleep`` binary in image functions). ``terminationGracePeriodSeconds`` covers the
runtime's drain (the controller's delete passes its own grace).

Source functions need no image build: their Pods run the generic runtime image
(``torpor images build-runtime``, pushed by the user; ``TORPOR_RUNTIME_IMAGE``) whose
entry point (``torpor/runtime/fetch.py``) downloads the revision's archive from
``TORPOR_ARCHIVE_URL_BASE/SHA256`` (the API's ``/v1/archives``) with that archive's own
read-only token (``TORPOR_ARCHIVE_TOKEN``: an HMAC of the hash under the installation's
key, which the controller hands the driver through ``use_archive_key``; it fetches that
one archive and nothing else), checks the hash and runs it. ``image:`` functions
are pulled by the kubelet as usual.

Endpoints are ``PODIP:PORT`` (``[PODIP]:PORT`` for an IPv6 address): ``start()`` waits
(bounded, with a watch resumed from the last resourceVersion) for the Pod's IP;
``list()`` reports current IPs; the gateways route to them. Readiness is the kubelet's:
the Pod's readiness probe (``/_torpor/health`` of the runtime, a TCP connect for
``image:`` functions) sets its ``Ready`` condition, and ``wait_ready()`` watches for it
through the API server, so the controller never connects to a Pod and a NetworkPolicy
can admit the gateways alone. The kubelet probes once a second at most, so this adds up
to a second to a cold start; ``TORPOR_K8S_READINESS=direct`` makes the controller probe
Pod IPs itself instead (every few ms), which needs a NetworkPolicy that lets the
controller in (the chart's ``networkPolicy.functionsFromController``).

Image pulls: ``TORPOR_RUNTIME_PULL_POLICY`` is the runtime image's ``imagePullPolicy``
(``image:`` functions keep the kubelet's default), ``TORPOR_IMAGE_PULL_SECRETS`` (names,
comma-separated) the ``imagePullSecrets`` of every function Pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import math
import os
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.config.kubeconfig import SingleConfig
from lightkube.core.exceptions import ConfigError
from lightkube.models.core_v1 import (
    Capabilities,
    Container,
    ContainerPort,
    EmptyDirVolumeSource,
    EnvVar,
    HTTPGetAction,
    LocalObjectReference,
    PodSecurityContext,
    PodSpec,
    Probe,
    ResourceRequirements,
    SeccompProfile,
    SecurityContext,
    TCPSocketAction,
    Volume,
    VolumeMount,
)
from lightkube.models.meta_v1 import ObjectMeta, OwnerReference
from lightkube.resources.core_v1 import ConfigMap, Pod
from lightkube.types import CascadeType, OnErrorAction, OnErrorResult

from torpor.drivers.base import BuildError, Progress, Running, contract_env, runtime_env
from torpor.drivers.runtimeimage import default_tag
from torpor.model import Revision, Spec
from torpor.sources import archive_token

log = logging.getLogger("torpor.drivers.kubernetes")

MANAGED = "torpor.managed"
INSTANCE = "torpor.instance"
FUNCTION = "torpor.function"
REVISION = "torpor.revision"
REPLICA = "torpor.replica"
CREATED = "torpor.created"  # annotation of the owner: which revision (by creation time) it is
CONTAINER = "function"
USER_ID = 65534
FETCH_DIR = "/tmp/fn"
TMP_SIZE = "256Mi"  # the emptyDir on /tmp: the fetched function, its temp files
HEALTH_PATH = "/_torpor/health"
DRAIN_FLOOR = 30  # s: the runtime's default drain (TORPOR_DRAIN_TIMEOUT)
# Waiting reasons after which a container will not start without someone changing something.
FATAL_WAITING = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


class KubernetesError(Exception):
    """The cluster refused or could not be reached; the message says what to do."""


def default_runtime_image() -> str:
    """``TORPOR_RUNTIME_IMAGE``, else ``torpor/runtime:VERSION`` (built by ``torpor images build-runtime``)."""
    return os.environ.get("TORPOR_RUNTIME_IMAGE") or default_tag()


# -- names and quantities ------------------------------------------------------------------
def label_value(value: str) -> str:
    """``value`` if it is a valid label value (63 characters at most), else a shortened
    form that stays unique: its first 50 characters and 12 hex digits of its sha256."""
    if len(value) <= 63:
        return value
    return f"{value[:50].rstrip('-._')}-{hashlib.sha256(value.encode()).hexdigest()[:12]}"


def pod_name(replica: str) -> str:
    return f"torpor-{replica}".lower()


def owner_name(revision: str) -> str:
    return f"torpor-rev-{revision}".lower()


def cpu_quantity(cpu: float) -> str:
    """Cores as a Kubernetes quantity: 0.5 -> ``500m``, 2 -> ``2``."""
    milli = max(1, round(cpu * 1000))
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def memory_quantity(size: int) -> str:
    """Bytes as a Kubernetes quantity: 256 MiB -> ``256Mi``; other sizes in bytes."""
    for suffix, unit in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(int(size))


def grace_seconds(spec: Spec) -> int:
    """``terminationGracePeriodSeconds``: the runtime's drain (at least 30 s, at least the
    request timeout) plus a margin, so its own drain ends before the kubelet's SIGKILL."""
    return max(DRAIN_FLOOR, math.ceil(spec.timeout)) + 5


def endpoint_of(ip: str, port: int) -> str:
    try:
        if ipaddress.ip_address(ip).version == 6:
            return f"[{ip}]:{port}"
    except ValueError:
        pass
    return f"{ip}:{port}"


# -- manifests -----------------------------------------------------------------------------
@dataclass
class PodSettings:
    """What the driver puts into every Pod beyond the revision itself."""

    instance: str
    namespace: str
    runtime_image: str
    archive_url_base: str | None = None
    archive_key: bytes | None = (
        None  # the installation's archive-token key (the controller passes it)
    )
    tmp_size: str = TMP_SIZE
    runtime_pull_policy: str | None = (
        None  # imagePullPolicy of the runtime image (None: the kubelet's default)
    )
    image_pull_secrets: tuple[str, ...] = ()  # imagePullSecrets of every function Pod


PULL_POLICIES = ("Always", "IfNotPresent", "Never")
READINESS = ("kubelet", "direct")  # who judges a replica ready (TORPOR_K8S_READINESS)
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def pull_policy(value: str | None, what: str = "TORPOR_RUNTIME_PULL_POLICY") -> str | None:
    """``value`` if it is an ``imagePullPolicy`` (empty: None), else KubernetesError."""
    if not value or not value.strip():
        return None
    value = value.strip()
    if value not in PULL_POLICIES:
        raise KubernetesError(f"{what}={value[:40]!r}: expected one of {', '.join(PULL_POLICIES)}")
    return value


def pull_secrets(value: str | None, what: str = "TORPOR_IMAGE_PULL_SECRETS") -> tuple[str, ...]:
    """Comma-separated Secret names -> a tuple of them; a name Kubernetes would refuse is a
    KubernetesError naming it."""
    names = tuple(x.strip() for x in (value or "").split(",") if x.strip())
    for n in names:
        if len(n) > 253 or not _DNS_SUBDOMAIN.fullmatch(n):
            raise KubernetesError(
                f"{what}: {n[:60]!r} is not a Secret name (lowercase letters, digits, "
                "'-' and '.', at most 253 characters)"
            )
    if len(names) > 32:
        raise KubernetesError(f"{what}: {len(names)} names; at most 32")
    return names


def _labels(
    instance: str, revision: Revision, replica: str | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    full = {FUNCTION: revision.function, REVISION: revision.name}
    if replica is not None:
        full[REPLICA] = replica
    labels = {MANAGED: "true", INSTANCE: instance, **{k: label_value(v) for k, v in full.items()}}
    return labels, full


def owner_manifest(revision: Revision, settings: PodSettings) -> ConfigMap:
    labels, full = _labels(settings.instance, revision)
    data = {"function": revision.function, "revision": revision.name}
    if revision.source_sha256:
        data["archive_sha256"] = revision.source_sha256
    if revision.spec.image:
        data["image"] = revision.spec.image
    return ConfigMap(
        metadata=ObjectMeta(
            name=owner_name(revision.name),
            namespace=settings.namespace,
            labels=labels,
            annotations={**full, CREATED: f"{revision.created:.6f}"},
        ),
        data=data,
    )


def archive_url(base: str, sha256: str) -> str:
    return f"{base.rstrip('/')}/{sha256}"


def pod_manifest(
    revision: Revision,
    replica: str,
    owner_uid: str,
    settings: PodSettings,
    secret_env: Mapping[str, str] | None = None,
) -> Pod:
    """The Pod of one replica (pure: tests read it field by field)."""
    spec = revision.spec
    labels, full = _labels(settings.instance, revision, replica)
    env: dict[str, str] = {
        **spec.env,
        **(secret_env or {}),
        "PORT": str(spec.port),
        "TORPOR_FUNCTION": revision.function,
        "TORPOR_REVISION": revision.name,
        "TORPOR_REPLICA": replica,
        **runtime_env(revision),
        **contract_env(revision),
    }
    if spec.image:
        image = spec.image
        probe = Probe(
            tcpSocket=TCPSocketAction(port=spec.port)
        )  # the user's image may not serve /_torpor/
    else:
        env.update(_source_env(revision, settings))
        image = revision.image or settings.runtime_image
        probe = Probe(httpGet=HTTPGetAction(path=HEALTH_PATH, port=spec.port))
    # 1 s, the shortest period Kubernetes allows: a cold start waits at most that long for the kubelet
    probe.periodSeconds, probe.timeoutSeconds, probe.failureThreshold = 1, 1, 3
    return Pod(
        metadata=ObjectMeta(
            name=pod_name(replica),
            namespace=settings.namespace,
            labels={**spec.labels, **labels},
            annotations=dict(full),
            ownerReferences=[
                OwnerReference(
                    apiVersion="v1",
                    kind="ConfigMap",
                    name=owner_name(revision.name),
                    uid=owner_uid,
                    controller=False,
                    blockOwnerDeletion=False,
                )
            ],
        ),
        spec=_pod_spec(spec, settings, _container(spec, settings, image, env, probe)),
    )


def _source_env(revision: Revision, settings: PodSettings) -> dict[str, str]:
    """What the runtime image needs to fetch and run a source function: the handler, the
    archive's URL, hash and read-only token. Raises BuildError when the revision has no
    archive hash or the driver lacks the archive URL base or key."""
    spec = revision.spec
    if not revision.source_sha256:
        raise BuildError(
            f"revision {revision.name} has no archive hash (source_sha256): the kubernetes "
            "driver runs source functions from content-addressed archives; deploy it again"
        )
    if not settings.archive_url_base:
        raise BuildError(
            "no archive URL for source functions: set TORPOR_ARCHIVE_URL_BASE "
            "(the API's /v1/archives as Pods reach it)"
        )
    if not settings.archive_key:
        raise BuildError(
            "no archive key: the controller passes the installation's key to the driver "
            "(use_archive_key) before it starts source functions"
        )
    return {
        "TORPOR_HANDLER": spec.handler or "handler:handle",
        "TORPOR_HOST": "0.0.0.0",  # the Pod's own network namespace: its IP
        "TORPOR_ARCHIVE_URL": archive_url(settings.archive_url_base, revision.source_sha256),
        "TORPOR_ARCHIVE_SHA256": revision.source_sha256,
        # read-only, this archive only (an HMAC of its hash): never the API's admin token
        "TORPOR_ARCHIVE_TOKEN": archive_token(settings.archive_key, revision.source_sha256),
        "TORPOR_FETCH_DIR": FETCH_DIR,
        "TORPOR_DRAIN_TIMEOUT": str(max(DRAIN_FLOOR, math.ceil(spec.timeout))),
    }


def _container(
    spec: Spec, settings: PodSettings, image: str, env: Mapping[str, str], probe: Probe
) -> Container:
    """The replica's one container: unprivileged, read-only root, all capabilities
    dropped, requests equal to limits, a writable ``/tmp``."""
    quantities: dict[str, str] = {}
    if spec.resources.cpu > 0:
        quantities["cpu"] = cpu_quantity(spec.resources.cpu)
    if spec.resources.memory > 0:
        quantities["memory"] = memory_quantity(spec.resources.memory)
    container = Container(
        name=CONTAINER,
        image=image,
        imagePullPolicy=None if spec.image else settings.runtime_pull_policy,
        ports=[ContainerPort(containerPort=spec.port, name="http", protocol="TCP")],
        env=[EnvVar(name=k, value=v) for k, v in env.items()],
        resources=ResourceRequirements(requests=dict(quantities), limits=dict(quantities)),
        readinessProbe=probe,
        securityContext=SecurityContext(
            runAsNonRoot=True,
            runAsUser=USER_ID,
            runAsGroup=USER_ID,
            readOnlyRootFilesystem=True,
            allowPrivilegeEscalation=False,
            privileged=False,
            capabilities=Capabilities(drop=["ALL"]),
            seccompProfile=SeccompProfile(type="RuntimeDefault"),
        ),
        volumeMounts=[VolumeMount(name="tmp", mountPath="/tmp")],
    )
    if spec.image:  # Knative's `command` / `args`: the image's ENTRYPOINT / CMD replaced
        container.command = list(spec.command) if spec.command is not None else None
        container.args = list(spec.args) if spec.args is not None else None
    return container


def _pod_spec(spec: Spec, settings: PodSettings, container: Container) -> PodSpec:
    """The Pod around ``container``: never restarted, no service account token or
    service links, unprivileged, its ``/tmp`` an emptyDir of ``settings.tmp_size``."""
    return PodSpec(
        containers=[container],
        restartPolicy="Never",
        automountServiceAccountToken=False,
        enableServiceLinks=False,
        terminationGracePeriodSeconds=grace_seconds(spec),
        securityContext=PodSecurityContext(
            runAsNonRoot=True,
            runAsUser=USER_ID,
            runAsGroup=USER_ID,
            fsGroup=USER_ID,
            seccompProfile=SeccompProfile(type="RuntimeDefault"),
        ),
        volumes=[Volume(name="tmp", emptyDir=EmptyDirVolumeSource(sizeLimit=settings.tmp_size))],
        imagePullSecrets=[LocalObjectReference(name=n) for n in settings.image_pull_secrets]
        or None,
    )


# -- reading Pods --------------------------------------------------------------------------
def _code(e: BaseException) -> int:
    if isinstance(e, ApiError):
        code = getattr(e.status, "code", None)
        if code:
            return int(code)
        if e.response is not None:
            return int(e.response.status_code)
    return 0


def _waiting(pod: Pod) -> tuple[str, str] | None:
    """(reason, message) of a container that has not started, if any."""
    for cs in (pod.status.containerStatuses or []) if pod.status else []:
        state = cs.state
        if state is not None and state.waiting is not None:
            return state.waiting.reason or "Waiting", state.waiting.message or ""
    return None


def _started(pod: Pod) -> bool:
    """The container has run (is running or has terminated): it has logs."""
    for cs in (pod.status.containerStatuses or []) if pod.status else []:
        if cs.state is not None and (
            cs.state.running is not None or cs.state.terminated is not None
        ):
            return True
    return False


def _terminated_code(pod: Pod) -> int | None:
    for cs in (pod.status.containerStatuses or []) if pod.status else []:
        if cs.state is not None and cs.state.terminated is not None:
            return int(cs.state.terminated.exitCode)
    return None


def _port(pod: Pod) -> int | None:
    for c in pod.spec.containers if pod.spec else []:
        for p in c.ports or []:
            return int(p.containerPort)
    return None


def is_alive(pod: Pod) -> bool:
    """Running or about to: not terminal, not being deleted, not stuck on a fatal wait."""
    if pod.metadata is not None and pod.metadata.deletionTimestamp is not None:
        return False
    phase = pod.status.phase if pod.status else None
    if phase not in (None, "Pending", "Running"):
        return False
    waiting = _waiting(pod)
    return not (waiting and waiting[0] in FATAL_WAITING)


def running_of(pod: Pod) -> Running:
    meta = pod.metadata
    assert meta is not None
    labels = dict(meta.labels or {})
    ann = meta.annotations or {}
    for key in (FUNCTION, REVISION, REPLICA):
        if key in ann:
            labels[key] = ann[key]
    ip = pod.status.podIP if pod.status else None
    port = _port(pod)
    alive = is_alive(pod)
    return Running(
        replica=labels.get(REPLICA, ""),
        function=labels.get(FUNCTION, ""),
        revision=labels.get(REVISION, ""),
        driver_id=meta.uid or "",
        endpoint=endpoint_of(ip, port) if ip and port else "",
        alive=alive,
        exit_code=None if alive else _terminated_code(pod),
        labels=labels,
    )


def is_ready(pod: Pod) -> bool:
    """Alive and its ``Ready`` condition is True (the kubelet's readiness probe passed)."""
    if not is_alive(pod) or pod.status is None:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def _has_ip(pod: Pod | None) -> bool:
    return pod is None or not is_alive(pod) or bool(pod.status and pod.status.podIP)


def _watch_retry(e: Exception, count: int) -> OnErrorResult:
    """A cut or failed watch is resumed from the last resourceVersion it saw (lightkube
    keeps it), with a backoff; 410 Gone and client errors go to the caller, which
    re-reads the object and watches again from there."""
    code = _code(e)
    if isinstance(e, ApiError) and code and code < 500 and code != 429:
        return OnErrorResult(OnErrorAction.RAISE)
    return OnErrorResult(OnErrorAction.RETRY, sleep=min(0.05 * 2 ** min(count, 6), 2.0))


def load_config(kubeconfig: str | None = None) -> SingleConfig:
    """In-cluster service account if present, else ``kubeconfig`` / ``KUBECONFIG`` / ~/.kube/config."""
    try:
        conf = (KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()).get()
    except (ConfigError, OSError) as e:
        raise KubernetesError(
            f"no Kubernetes configuration: not in a cluster and no usable kubeconfig ({e})"
        ) from e
    if conf is None:
        raise KubernetesError("the kubeconfig has no current context")
    return conf


class KubernetesDriver:
    name = "kubernetes"

    def __init__(
        self,
        instance: str,
        namespace: str | None = None,
        config: SingleConfig | KubeConfig | None = None,
        *,
        runtime_image: str | None = None,
        archive_url_base: str | None = None,
        runtime_pull_policy: str | None = None,
        image_pull_secrets: tuple[str, ...] | None = None,
        readiness: str | None = None,
        ip_timeout: float = 30.0,
        stop_margin: float = 15.0,
        trust_env: bool = True,
    ) -> None:
        if isinstance(config, KubeConfig):
            config = config.get()
        self.config: SingleConfig = config if config is not None else load_config()
        self.namespace = (
            namespace or os.environ.get("TORPOR_K8S_NAMESPACE") or self.config.namespace
        )
        self.instance = instance
        self.ip_timeout = ip_timeout
        self.readiness = (readiness or os.environ.get("TORPOR_K8S_READINESS") or "kubelet").strip()
        if self.readiness not in READINESS:
            raise KubernetesError(
                f"TORPOR_K8S_READINESS={self.readiness[:40]!r}: expected kubelet (the Pod's "
                "Ready condition) or direct (the controller probes Pod IPs)"
            )
        self.stop_margin = stop_margin
        self._trust_env = trust_env
        self.settings = PodSettings(
            instance=instance,
            namespace=self.namespace,
            runtime_image=runtime_image or default_runtime_image(),
            archive_url_base=archive_url_base
            if archive_url_base is not None
            else os.environ.get("TORPOR_ARCHIVE_URL_BASE") or None,
            runtime_pull_policy=pull_policy(runtime_pull_policy, "runtime_pull_policy")
            if runtime_pull_policy
            else pull_policy(os.environ.get("TORPOR_RUNTIME_PULL_POLICY")),
            image_pull_secrets=pull_secrets(",".join(image_pull_secrets), "image_pull_secrets")
            if image_pull_secrets is not None
            else pull_secrets(os.environ.get("TORPOR_IMAGE_PULL_SECRETS")),
        )
        self.client = self._new_client()

    def use_archive_key(self, key: bytes) -> None:
        """The installation's archive-token key (from the store, by the controller): each
        source Pod gets ``TORPOR_ARCHIVE_TOKEN`` = the read-only token of its own archive."""
        self.settings.archive_key = bytes(key)

    def _new_client(self) -> AsyncClient:
        return AsyncClient(
            self.config, namespace=self.namespace, field_manager="torpor", trust_env=self._trust_env
        )

    def _selector(self) -> dict[str, Any]:
        return {MANAGED: "true", INSTANCE: self.instance}

    def _fail(self, what: str, e: ApiError) -> KubernetesError:
        code, msg = _code(e), getattr(e.status, "message", "") or str(e)
        hint = ""
        if code == 401:
            hint = " (the cluster did not accept the credentials)"
        elif code == 403:
            hint = f" (RBAC: the controller's service account needs pods and configmaps in namespace {self.namespace})"
        elif code == 404:
            hint = f" (does namespace {self.namespace} exist?)"
        return KubernetesError(f"{what}: HTTP {code}: {msg}{hint}")

    # -- watching one object -----------------------------------------------------------------
    async def _wait(
        self,
        kind: type[Pod] | type[ConfigMap],
        name: str,
        current: Any,
        done: Callable[[Any], bool],
        timeout: float,
    ) -> Any:
        """Watch ``name`` from ``current``'s resourceVersion until ``done(obj)`` (``obj`` is
        None once it is deleted) or ``timeout``; returns the last state seen. A cut watch
        resumes from the last resourceVersion; 410 Gone (too old) re-reads the object."""
        if done(current):
            return current
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        rv = current.metadata.resourceVersion if current is not None and current.metadata else None
        uid = current.metadata.uid if current is not None and current.metadata else None
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return current
            try:
                async with asyncio.timeout(left):
                    events = self.client.watch(
                        kind,
                        namespace=self.namespace,
                        fields={"metadata.name": name},
                        resource_version=rv,
                        server_timeout=max(1, min(60, math.ceil(left))),
                        on_error=_watch_retry,
                    )
                    async with contextlib.aclosing(events) as stream:  # type: ignore[type-var]
                        async for event, obj in stream:
                            if event == "BOOKMARK":
                                continue
                            same = uid is None or (
                                obj.metadata is not None and obj.metadata.uid == uid
                            )
                            if event == "DELETED" and same:
                                return None
                            if not same:
                                return None  # a new object of that name: ours is gone
                            current = obj
                            if done(current):
                                return current
            except TimeoutError:
                return current
            except ApiError as e:
                if _code(e) != 410:
                    raise
                try:  # our resourceVersion is too old: read the object again, watch from there
                    current = await self.client.get(kind, name, namespace=self.namespace)
                except ApiError as e2:
                    if _code(e2) == 404:
                        return None
                    raise
                if uid is not None and current.metadata.uid != uid:
                    return None
                if done(current):
                    return current
                rv = current.metadata.resourceVersion

    # -- build -------------------------------------------------------------------------------
    async def prepare(self, revision: Revision, progress: Progress | None = None) -> Revision:
        if revision.spec.image:
            revision.image = revision.spec.image  # pulled by the kubelet
        else:
            if not revision.source_sha256:
                raise BuildError(
                    f"revision {revision.name} has no archive hash (source_sha256): the kubernetes "
                    "driver runs source functions from content-addressed archives, which the API "
                    "records on deploy (a revision made before them has none: deploy it again)"
                )
            if not self.settings.archive_url_base:
                raise BuildError(
                    "source functions on a cluster need TORPOR_ARCHIVE_URL_BASE: the URL of the API's "
                    "/v1/archives as Pods reach it"
                )
            if not self.settings.archive_key:
                raise BuildError(
                    "no archive key: the controller passes the installation's key to the driver "
                    "(use_archive_key) before it prepares source functions"
                )
            req = Path(revision.source or "", "requirements.txt")
            if (
                revision.source
                and req.is_file()
                and req.read_text(errors="replace").strip()
                and progress
            ):
                progress(
                    "warning: requirements.txt is not installed on a cluster: the runtime image "
                    f"({self.settings.runtime_image}) must already provide those packages"
                )
            revision.image = self.settings.runtime_image
        await self._ensure_owner(revision)
        if progress:
            progress(
                f"owner ConfigMap {owner_name(revision.name)} ready in namespace {self.namespace}; "
                f"image {revision.image}"
            )
        return revision

    async def _ensure_owner(self, revision: Revision) -> str:
        """The uid of the revision's owner ConfigMap, made if missing (read on every call:
        someone may have deleted it, and a Pod owned by a gone uid is collected at once)."""
        body = owner_manifest(revision, self.settings)
        name = owner_name(revision.name)
        for _ in range(5):
            try:
                cm = await self.client.get(ConfigMap, name, namespace=self.namespace)
            except ApiError as e:
                if _code(e) != 404:
                    raise self._fail(f"reading ConfigMap {name}", e) from e
                try:
                    cm = await self.client.create(body)
                except ApiError as e2:
                    if _code(e2) == 409:
                        continue  # made in between: read it
                    raise self._fail(f"creating ConfigMap {name}", e2) from e2
            meta = cm.metadata
            assert meta is not None
            owner = (meta.labels or {}).get(INSTANCE)
            if owner != self.instance:
                raise BuildError(
                    f"ConfigMap {name} in namespace {self.namespace} exists and belongs to another "
                    f"Torpor installation (torpor.instance={owner!r}); not touching it"
                )
            if (meta.annotations or {}).get(
                CREATED
            ) == f"{revision.created:.6f}" and meta.deletionTimestamp is None:
                assert meta.uid
                return meta.uid
            # left by an earlier function of the same name: delete it (its Pods with it), then create anew
            log.info("replacing stale owner %s of an earlier revision %s", name, revision.name)
            with contextlib.suppress(ApiError):
                await self.client.delete(
                    ConfigMap, name, namespace=self.namespace, cascade=CascadeType.BACKGROUND
                )
            await self._wait(ConfigMap, name, cm, lambda o: o is None, timeout=30.0)
        raise KubernetesError(f"ConfigMap {name}: could not create it (it kept changing)")

    async def remove(self, revision: Revision) -> None:
        """Delete the revision's owner ConfigMap; the garbage collector deletes its Pods."""
        name = owner_name(revision.name)
        try:
            cm = await self.client.get(ConfigMap, name, namespace=self.namespace)
            if cm.metadata is None or (cm.metadata.labels or {}).get(INSTANCE) != self.instance:
                return  # another installation's
            await self.client.delete(
                ConfigMap, name, namespace=self.namespace, cascade=CascadeType.BACKGROUND
            )
        except ApiError as e:
            if _code(e) != 404:
                raise self._fail(f"deleting ConfigMap {name}", e) from e

    # -- replicas ------------------------------------------------------------------------------
    async def start(
        self, revision: Revision, replica: str, secret_env: Mapping[str, str] | None = None
    ) -> Running:
        owner_uid = await self._ensure_owner(revision)
        pod = pod_manifest(revision, replica, owner_uid, self.settings, secret_env)
        name = pod_name(replica)
        try:
            created = await self.client.create(pod)
        except ApiError as e:
            code = _code(e)
            if code == 409:
                created = await self._existing(revision, pod)
            elif code == 422:
                raise BuildError(
                    f"the cluster refused Pod {name}: {getattr(e.status, 'message', e)}"
                ) from e
            else:
                raise self._fail(f"creating Pod {name}", e) from e
        try:
            got = await self._wait(Pod, name, created, _has_ip, self.ip_timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.client.delete(Pod, name, namespace=self.namespace, grace_period=0)
            raise
        if (
            got is None
        ):  # deleted already (its owner deleted meanwhile?): the controller will see it dead
            gone = running_of(created)
            gone.alive, gone.endpoint = False, ""
            return gone
        return running_of(got)

    async def _existing(self, revision: Revision, pod: Pod) -> Pod:
        """A Pod of that name exists: adopt it if it is this replica, alive; replace an
        exited leftover of ours; refuse anyone else's."""
        assert pod.metadata is not None and pod.metadata.name
        name = pod.metadata.name
        for _ in range(3):
            try:
                cur = await self.client.get(Pod, name, namespace=self.namespace)
            except ApiError as e:
                if _code(e) != 404:
                    raise self._fail(f"reading Pod {name}", e) from e
                cur = None
            if cur is not None:
                assert cur.metadata is not None
                if (cur.metadata.labels or {}).get(INSTANCE) != self.instance:
                    raise KubernetesError(
                        f"Pod {name} exists in namespace {self.namespace} and was not started "
                        "by this Torpor installation"
                    )
                found = running_of(cur)
                if found.alive and found.revision == revision.name:
                    return cur  # an earlier create of this very replica went through
                with contextlib.suppress(ApiError):
                    await self.client.delete(Pod, name, namespace=self.namespace, grace_period=0)
                await self._wait(Pod, name, cur, lambda p: p is None, timeout=30.0)
            try:
                return await self.client.create(pod)
            except ApiError as e:
                if _code(e) != 409:
                    raise self._fail(f"creating Pod {name}", e) from e
        raise KubernetesError(f"Pod {name}: a Pod of that name keeps coming back")

    async def stop(self, running: Running, grace: float = 10.0) -> None:
        name = pod_name(running.replica)
        try:
            pod = await self.client.get(Pod, name, namespace=self.namespace)
        except ApiError as e:
            if _code(e) == 404:
                return
            raise self._fail(f"reading Pod {name}", e) from e
        assert pod.metadata is not None
        if running.driver_id and pod.metadata.uid != running.driver_id:
            return  # not the Pod we were asked to stop: that one is gone
        if (pod.metadata.labels or {}).get(INSTANCE) != self.instance:
            return
        seconds = max(0, math.ceil(grace))
        try:
            await self.client.delete(Pod, name, namespace=self.namespace, grace_period=seconds)
        except ApiError as e:
            if _code(e) == 404:
                return
            raise self._fail(f"deleting Pod {name}", e) from e
        gone = await self._wait(
            Pod, name, pod, lambda p: p is None, timeout=seconds + self.stop_margin
        )
        if gone is not None:
            log.warning(
                "Pod %s still exists %gs after its deletion (is its node unreachable?)",
                name,
                seconds + self.stop_margin,
            )

    async def wait_ready(self, running: Running, timeout: float) -> bool | None:
        """Watch the replica's Pod (at most ``timeout`` s) until its ``Ready`` condition is
        True: True then (with ``running.endpoint`` set), False if it is not ready by then,
        gone, or no longer this replica's Pod."""
        if self.readiness == "direct":
            return None  # the controller probes the endpoint itself
        name = pod_name(running.replica)
        try:
            pod = await self.client.get(Pod, name, namespace=self.namespace)
        except ApiError as e:
            if _code(e) == 404:
                return False
            raise self._fail(f"reading Pod {name}", e) from e
        assert pod.metadata is not None
        if running.driver_id and pod.metadata.uid != running.driver_id:
            return False
        got = await self._wait(
            Pod, name, pod, lambda p: p is None or not is_alive(p) or is_ready(p), max(0.0, timeout)
        )
        if got is None or not is_ready(got):
            return False
        endpoint = running_of(got).endpoint
        if not endpoint:
            return False
        running.endpoint = endpoint
        return True

    async def list(self) -> list[Running]:
        try:
            pods = [
                p
                async for p in self.client.list(
                    Pod, namespace=self.namespace, labels=self._selector()
                )
            ]
        except ApiError as e:
            raise self._fail("listing Pods", e) from e
        return sorted((running_of(p) for p in pods), key=lambda r: r.replica)

    async def logs(
        self, running: Running, follow: bool = False, tail: int = 200
    ) -> AsyncIterator[str]:
        name = pod_name(running.replica)
        # a follow holds its HTTP stream open: on its own client, closed when the caller stops
        client = self._new_client() if follow else self.client
        try:
            while True:
                lines = client.log(
                    name,
                    namespace=self.namespace,
                    follow=follow,
                    tail_lines=max(0, tail),
                    newlines=False,
                )
                try:
                    async for line in lines:
                        yield line
                    return
                except ApiError as e:
                    if _code(e) == 404:
                        return
                    if _code(e) != 400:
                        raise
                # 400: the container has not started: say why, and (following) wait for it
                try:
                    pod = await self.client.get(Pod, name, namespace=self.namespace)
                except ApiError as e:
                    if _code(e) == 404:
                        return
                    raise
                waiting = _waiting(pod)
                if waiting:
                    yield f"torpor: Pod {name} is waiting: {waiting[0]}" + (
                        f": {waiting[1]}" if waiting[1] else ""
                    )
                elif not _started(pod):
                    phase = pod.status.phase if pod.status else None
                    yield f"torpor: Pod {name} has not started yet (phase {phase or 'unknown'})"
                if not follow or not is_alive(pod):
                    return
                await self._wait(
                    Pod,
                    name,
                    pod,
                    lambda p: p is None or _started(p) or not is_alive(p),
                    timeout=60.0,
                )
        finally:
            if client is not self.client:
                await client.close()

    async def close(self) -> None:
        await self.client.close()

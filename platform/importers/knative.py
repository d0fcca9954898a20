"""Knative ``serving.knative.dev/v1`` Service documents -> Torpor functions (pure).

What each field becomes is the table in the README ("Coming from Knative / OpenFaaS").
Fields Torpor does not support are named in a warning; scheduling fields are warned
about and ignored; a field whose meaning would change (the ``rps`` metric, the HPA
class, cluster-local visibility, sidecars, h2c, env from ConfigMaps...) is refused with
an :class:`ImportRefused` naming it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from torpor.importers.common import (
    Imported,
    ImportRefused,
    TrafficEntry,
    mapping,
    number,
    text,
)
from torpor.spec import SpecError, describe, validate_secret_name, validate_tag

API_VERSION = "serving.knative.dev/v1"
AUTOSCALING = "autoscaling.knative.dev/"
# Knative's defaults where Torpor's differ and the mapping needs them
KNATIVE_TARGET = 100.0  # container-concurrency-target-default
KNATIVE_UTILIZATION = 70.0  # container-concurrency-target-percentage

SCHEDULING = (
    "nodeSelector",
    "affinity",
    "tolerations",
    "topologySpreadConstraints",
    "priorityClassName",
    "schedulerName",
    "runtimeClassName",
    "nodeName",
)
CLUSTER_STATE = (
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "finalizers",
    "ownerReferences",
    "deletionTimestamp",
)
VISIBILITY = ("networking.knative.dev/visibility", "serving.knative.dev/visibility")
_SAFE_SECRET = re.compile(r"[^a-z0-9-]+")


class _Doc:
    """One Service being imported: where it came from and what was said about it."""

    def __init__(self, source: str, name: str) -> None:
        self.source, self.name = source, name
        self.warnings: list[str] = []

    def warn(self, where: str, what: str) -> None:
        self.warnings.append(f"{self.source}: {self.name}: {where}: {what}")

    def refuse(self, where: str, what: str) -> ImportRefused:
        return ImportRefused(self.source, f"{self.name}: {where}", what)


def import_documents(docs: list[Any], source: str) -> list[Imported]:
    """Every Knative Service in ``docs`` (other kinds are skipped with a warning)."""
    out: list[Imported] = []
    skipped: list[str] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, Mapping):
            raise ImportRefused(
                source, f"document {i + 1}", f"expected a mapping, got {describe(doc)}"
            )
        api, kind = doc.get("apiVersion"), doc.get("kind")
        if api == API_VERSION and kind == "Service":
            out.append(import_service(doc, source))
            continue
        if isinstance(api, str) and api.startswith("serving.knative.dev/"):
            if kind == "Service":
                raise ImportRefused(
                    source,
                    f"document {i + 1}: apiVersion",
                    f"{api} is not supported; expected {API_VERSION} (convert it first)",
                )
            raise ImportRefused(
                source,
                f"document {i + 1}: kind",
                f"{describe(kind)} of {api}: only Service documents are deployed (a Route or "
                "Configuration alone has no Torpor equivalent)",
            )
        skipped.append(f"document {i + 1} ({describe(kind)} of {describe(api)})")
    if not out:
        raise ImportRefused(source, "", f"no {API_VERSION} Service document found")
    if skipped:
        out[0].warnings.append(f"{source}: skipped, not a Knative Service: {', '.join(skipped)}")
    names = [f.name for f in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ImportRefused(
            source, "metadata.name", f"{dupes[0]!r} is named by more than one Service"
        )
    return out


def import_service(doc: Mapping[Any, Any], source: str) -> Imported:
    meta = mapping(doc.get("metadata"), source, "metadata")
    raw_name = meta.get("name")
    if not isinstance(raw_name, str) or not raw_name:
        raise ImportRefused(source, "metadata.name", "required: the function's name")
    d = _Doc(source, raw_name)
    origin: dict[str, str] = {"name": "metadata.name"}
    spec: dict[str, Any] = {"name": raw_name}
    labels: dict[str, str] = {}
    scale: dict[str, Any] = {}
    resources: dict[str, Any] = {}

    for key in doc:
        if key not in ("apiVersion", "kind", "metadata", "spec", "status"):
            d.warn(str(key), "unknown top-level field, ignored")
    if "status" in doc:
        d.warn("status", "cluster state (as `kubectl get -o yaml` prints it), ignored")
    _metadata(d, meta, "metadata", labels, service=True)
    body = mapping(doc.get("spec"), source, "spec")
    for key in body:
        if key not in ("template", "traffic"):
            d.warn(f"spec.{key}", "not supported, ignored")
    template = mapping(body.get("template"), source, "spec.template")
    for key in template:
        if key not in ("metadata", "spec"):
            d.warn(f"spec.template.{key}", "not supported, ignored")
    tmeta = mapping(template.get("metadata"), source, "spec.template.metadata")
    template_name = tmeta.get("name") if isinstance(tmeta.get("name"), str) else None
    if template_name:
        d.warn(
            "spec.template.metadata.name",
            f"Torpor names revisions itself ({raw_name}-00001, ...); "
            f"traffic that names {template_name!r} goes to the revision this deploy creates",
        )
    annotations = {
        **_annotations(d, meta, "metadata"),
        **_annotations(d, tmeta, "spec.template.metadata"),
    }
    _metadata(d, tmeta, "spec.template.metadata", labels, service=False)
    tspec = mapping(template.get("spec"), source, "spec.template.spec")
    concurrency = _revision_spec(d, tspec, spec, scale, resources, origin)
    _autoscaling(d, annotations, concurrency, scale, origin)
    if labels:
        spec["labels"] = labels
        origin["labels"] = "metadata.labels"
    if scale:
        spec["scale"] = scale
    if resources:
        spec["resources"] = resources
    secrets = {env: name for env, name in spec.get("secrets", {}).items()}
    traffic = _traffic(d, body.get("traffic"), template_name)
    return Imported(
        name=raw_name,
        spec=spec,
        traffic=traffic,
        warnings=d.warnings,
        origin=origin,
        secrets_needed={name: f"env {env}" for env, name in secrets.items()},
    )


def _metadata(
    d: _Doc, meta: Mapping[Any, Any], where: str, labels: dict[str, str], service: bool
) -> None:
    for key, value in meta.items():
        if key in ("name", "annotations"):
            continue
        if key == "labels":
            for lk, lv in mapping(value, d.source, f"{where}.labels").items():
                lk = text(lk, d.source, f"{where}.labels")
                if lk in VISIBILITY:
                    if str(lv) == "cluster-local":
                        raise d.refuse(
                            f"{where}.labels.{lk}",
                            "cluster-local: Torpor has no cluster-only "
                            "visibility, every function is reachable on the gateway; remove the label "
                            "to deploy it as public",
                        )
                    continue
                if lk.startswith(("serving.knative.dev/", "networking.knative.dev/")):
                    d.warn(f"{where}.labels.{lk}", "a Knative setting, not supported, ignored")
                    continue
                labels[lk] = text(lv, d.source, f"{where}.labels.{lk}")
        elif key == "namespace" and service:
            d.warn(f"{where}.namespace", "Torpor has no namespaces; ignored")
        elif key in CLUSTER_STATE or key == "generateName":
            d.warn(f"{where}.{key}", "cluster state, ignored")
        else:
            d.warn(f"{where}.{key}", "not supported, ignored")


def _annotations(d: _Doc, meta: Mapping[Any, Any], where: str) -> dict[str, tuple[str, str]]:
    """Autoscaling annotations -> (value, where); every other one is named in a warning."""
    out: dict[str, tuple[str, str]] = {}
    for key, value in mapping(meta.get("annotations"), d.source, f"{where}.annotations").items():
        key = text(key, d.source, f"{where}.annotations")
        path = f"{where}.annotations.{key}"
        if key.startswith(AUTOSCALING):
            out[key[len(AUTOSCALING) :]] = (text(value, d.source, path), path)
        elif key.startswith("kubectl.kubernetes.io/"):
            d.warn(path, "kubectl bookkeeping, ignored")
        else:
            d.warn(path, "not supported, ignored")
    return out


def _revision_spec(
    d: _Doc,
    tspec: Mapping[Any, Any],
    spec: dict[str, Any],
    scale: dict[str, Any],
    resources: dict[str, Any],
    origin: dict[str, str],
) -> int | None:
    """``spec.template.spec``: the container, containerConcurrency, timeoutSeconds.
    Returns containerConcurrency (None when not given)."""
    where = "spec.template.spec"
    concurrency: int | None = None
    for key, value in tspec.items():
        path = f"{where}.{key}"
        if key == "containers":
            continue
        if key == "containerConcurrency":
            concurrency = int(number(value, d.source, path, integer=True))
            scale["concurrency"] = concurrency
            origin["scale.concurrency"] = path
        elif key == "timeoutSeconds":
            spec["timeout"] = number(value, d.source, path)
            origin["timeout"] = path
        elif key in SCHEDULING:
            d.warn(path, "scheduling field, ignored (Torpor places replicas itself)")
        elif key == "volumes":
            d.warn(path, "volumes are not supported, ignored")
        elif key in ("responseStartTimeoutSeconds", "idleTimeoutSeconds"):
            d.warn(path, "not supported, ignored (Torpor's one per-request limit is `timeout`)")
        else:
            d.warn(path, "not supported, ignored")
    containers = tspec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise d.refuse(f"{where}.containers", "expected a list with one container")
    if len(containers) > 1:
        raise d.refuse(
            f"{where}.containers",
            f"{len(containers)} containers: Torpor runs one container per "
            "replica (sidecars are not supported)",
        )
    _container(
        d, mapping(containers[0], d.source, f"{where}.containers[0]"), spec, resources, origin
    )
    return concurrency


def _container(
    d: _Doc,
    c: Mapping[Any, Any],
    spec: dict[str, Any],
    resources: dict[str, Any],
    origin: dict[str, str],
) -> None:
    where = "spec.template.spec.containers[0]"
    if "image" not in c:
        raise d.refuse(f"{where}.image", "required: the image that serves HTTP on $PORT")
    for key, value in c.items():
        path = f"{where}.{key}"
        if key == "image":
            spec["image"] = value
            origin["image"] = path
        elif key == "env":
            _env(d, value, path, spec, origin)
        elif key == "ports":
            _ports(d, value, path, spec, origin)
        elif key == "resources":
            _resources(d, mapping(value, d.source, path), path, resources, origin)
        elif key in ("command", "args"):
            spec[key] = value
            origin[key] = path
        elif key == "envFrom":
            raise d.refuse(
                path,
                "variables from a whole ConfigMap or Secret are not known at deploy time; list "
                "them under env (a Secret's keys as valueFrom.secretKeyRef)",
            )
        elif key == "volumeMounts":
            raise d.refuse(path, "volumes are not supported: the mounted files would be missing")
        elif key in ("readinessProbe", "livenessProbe", "startupProbe"):
            d.warn(path, "ignored: Torpor counts a replica ready once its port answers")
        elif key == "securityContext":
            d.warn(
                path,
                "ignored: Torpor runs every replica as uid 65534 with a read-only root file system and "
                "no capabilities",
            )
        elif key in (
            "name",
            "imagePullPolicy",
            "terminationMessagePath",
            "terminationMessagePolicy",
        ):
            d.warn(path, "ignored")
        else:
            d.warn(path, "not supported, ignored")


def _env(d: _Doc, value: Any, where: str, spec: dict[str, Any], origin: dict[str, str]) -> None:
    if not isinstance(value, list):
        raise d.refuse(where, f"expected a list of {{name, value}}, got {describe(value)}")
    env: dict[str, Any] = {}
    secrets: dict[str, str] = {}
    for i, item in enumerate(value):
        path = f"{where}[{i}]"
        item = mapping(item, d.source, path)
        name = item.get("name")
        if not isinstance(name, str):
            raise d.refuse(f"{path}.name", "required: the variable's name")
        if name in env or name in secrets:
            raise d.refuse(f"{path}.name", f"{name} is set twice")
        for key in item:
            if key not in ("name", "value", "valueFrom"):
                d.warn(f"{path}.{key}", "not supported, ignored")
        if "valueFrom" in item:
            secrets[name] = _secret_ref(d, item["valueFrom"], f"{path}.valueFrom")
            origin[f"secrets.{name}"] = f"{path}.valueFrom"
        else:
            raw = item.get("value", "")
            env[name] = "" if raw is None else raw
            origin[f"env.{name}"] = path
    if env:
        spec["env"] = env
        origin.setdefault("env", where)
    if secrets:
        spec["secrets"] = secrets
        origin.setdefault("secrets", where)


def _secret_ref(d: _Doc, value: Any, where: str) -> str:
    """``valueFrom.secretKeyRef`` -> the Torpor secret's name: NAME when the key is NAME
    too (what ``torpor export`` writes), else NAME-KEY."""
    src = mapping(value, d.source, where)
    if set(src) != {"secretKeyRef"}:
        other = ", ".join(sorted(str(k) for k in src if k != "secretKeyRef")) or "nothing"
        raise d.refuse(
            where,
            f"only secretKeyRef maps to Torpor (a secret); {other} has no equivalent: set the "
            "value under env, or store it with `torpor secret set`",
        )
    ref = mapping(src["secretKeyRef"], d.source, f"{where}.secretKeyRef")
    name, key = ref.get("name"), ref.get("key")
    if not isinstance(name, str) or not isinstance(key, str):
        raise d.refuse(f"{where}.secretKeyRef", "expected name and key")
    if ref.get("optional") is True:
        d.warn(
            f"{where}.secretKeyRef.optional",
            "Torpor refuses a deploy whose secret is missing; "
            "set it first with `torpor secret set`",
        )
    wanted = name if name == key else f"{name}-{key}"
    secret = _SAFE_SECRET.sub("-", wanted.lower()).strip("-")[:63].strip("-")
    try:
        validate_secret_name(secret, "secret")
    except SpecError:
        raise d.refuse(f"{where}.secretKeyRef", f"{wanted!r} gives no usable secret name") from None
    if secret != wanted:
        d.warn(
            f"{where}.secretKeyRef", f"Secret {name!r} key {key!r} is the Torpor secret {secret!r}"
        )
    return secret


def _ports(d: _Doc, value: Any, where: str, spec: dict[str, Any], origin: dict[str, str]) -> None:
    if not isinstance(value, list):
        raise d.refuse(where, f"expected a list, got {describe(value)}")
    if len(value) > 1:
        raise d.refuse(where, "Knative and Torpor serve one port; list one")
    if not value:
        return
    port = mapping(value[0], d.source, f"{where}[0]")
    for key, item in port.items():
        path = f"{where}[0].{key}"
        if key == "containerPort":
            spec["port"] = item
            origin["port"] = path
        elif key == "name":
            if item == "h2c":
                raise d.refuse(
                    path,
                    "h2c (HTTP/2 without TLS): Torpor speaks HTTP/1.1 to replicas; remove the "
                    "name to serve HTTP/1.1",
                )
            if item not in ("http1", "http"):
                d.warn(path, "ignored")
        elif key == "protocol":
            if str(item).upper() != "TCP":
                raise d.refuse(path, f"{describe(item)}: only TCP")
        else:
            d.warn(path, "not supported, ignored")


def _resources(
    d: _Doc, res: Mapping[Any, Any], where: str, resources: dict[str, Any], origin: dict[str, str]
) -> None:
    """Torpor enforces one value per resource, as a limit: ``limits`` where given, else
    ``requests`` (a warning says so)."""
    limits = mapping(res.get("limits"), d.source, f"{where}.limits")
    requests = mapping(res.get("requests"), d.source, f"{where}.requests")
    for key in res:
        if key not in ("limits", "requests"):
            d.warn(f"{where}.{key}", "not supported, ignored")
    for kind in ("cpu", "memory"):
        if kind in limits:
            resources[kind] = limits[kind]
            origin[f"resources.{kind}"] = f"{where}.limits.{kind}"
            if kind in requests:
                d.warn(
                    f"{where}.requests.{kind}",
                    "Torpor reserves nothing ahead; it enforces the limit only",
                )
        elif kind in requests:
            resources[kind] = requests[kind]
            origin[f"resources.{kind}"] = f"{where}.requests.{kind}"
            d.warn(
                f"{where}.requests.{kind}",
                "no limit given: Torpor enforces this request as the limit",
            )
    for section, values in (("limits", limits), ("requests", requests)):
        for key in values:
            if key in ("cpu", "memory"):
                continue
            if "gpu" in str(key):
                raise d.refuse(f"{where}.{section}.{key}", "GPUs are not supported")
            d.warn(f"{where}.{section}.{key}", "not supported, ignored")


_KNOWN_AUTOSCALING = frozenset(
    {
        "class",
        "metric",
        "min-scale",
        "max-scale",
        "initial-scale",
        "target",
        "target-utilization-percentage",
        "window",
        "panic-window-percentage",
        "panic-threshold-percentage",
        "scale-to-zero-pod-retention-period",
    }
)


def _autoscaling(
    d: _Doc,
    ann: dict[str, tuple[str, str]],
    concurrency: int | None,
    scale: dict[str, Any],
    origin: dict[str, str],
) -> None:
    """The ``autoscaling.knative.dev/*`` annotations (``ann``: key -> (value, path)) ->
    ``scale`` fields, with ``origin`` for each; ``concurrency`` is the container's
    hard limit (containerConcurrency), which caps the target as in Knative."""
    _check_autoscaler(d, ann)
    _replica_bounds(d, ann, scale, origin)
    _target(d, ann, concurrency, scale, origin)
    if "window" in ann:
        scale["window"] = ann["window"][0]
        origin["scale.window"] = ann["window"][1]
    if (v := _annotation_number(d, ann, "panic-window-percentage")) is not None:
        scale["panic_window"] = v
        origin["scale.panic_window"] = ann["panic-window-percentage"][1]
    if (v := _annotation_number(d, ann, "panic-threshold-percentage")) is not None:
        scale["panic_threshold"] = v
        origin["scale.panic_threshold"] = ann["panic-threshold-percentage"][1]
    if "scale-to-zero-pod-retention-period" in ann:
        scale["idle"] = ann["scale-to-zero-pod-retention-period"][0]
        origin["scale.idle"] = ann["scale-to-zero-pod-retention-period"][1]


def _annotation_number(
    d: _Doc, ann: dict[str, tuple[str, str]], key: str, integer: bool = False
) -> float | None:
    """The number annotation ``key`` says (None if absent); ImportRefused if it is none."""
    if key not in ann:
        return None
    return number(ann[key][0], d.source, ann[key][1], integer=integer)


def _check_autoscaler(d: _Doc, ann: dict[str, tuple[str, str]]) -> None:
    """Refuse another autoscaler class or a metric but concurrency; warn about every
    annotation Torpor does not read."""
    for key, (value, path) in ann.items():
        if key == "class" and value not in ("kpa.autoscaling.knative.dev", "kpa"):
            raise d.refuse(
                path,
                f"{value!r}: Torpor's autoscaler is KPA-style (in-flight requests); remove the "
                "annotation to use it",
            )
        if key == "metric" and value != "concurrency":
            if value == "rps":
                raise d.refuse(
                    path,
                    "rps is not supported yet: Torpor scales on concurrency (in-flight requests); "
                    "use metric concurrency with a target",
                )
            raise d.refuse(path, f"{value!r}: Torpor scales on concurrency only")
    for key, (_, path) in ann.items():
        if key not in _KNOWN_AUTOSCALING:
            d.warn(path, "not supported, ignored")


def _replica_bounds(
    d: _Doc, ann: dict[str, tuple[str, str]], scale: dict[str, Any], origin: dict[str, str]
) -> None:
    """``min-scale`` / ``max-scale`` (0, unbounded in Knative, keeps Torpor's default);
    an ``initial-scale`` other than 1 is warned about."""
    if (v := _annotation_number(d, ann, "min-scale", True)) is not None:
        scale["min"] = int(v)
        origin["scale.min"] = ann["min-scale"][1]
    if (v := _annotation_number(d, ann, "max-scale", True)) is not None:
        if v == 0:
            d.warn(
                ann["max-scale"][1],
                "0 (unbounded in Knative): Torpor's default max applies (20, within the "
                "platform's --max-replicas)",
            )
        else:
            scale["max"] = int(v)
            origin["scale.max"] = ann["max-scale"][1]
    if (v := _annotation_number(d, ann, "initial-scale", True)) is not None and v != 1:
        d.warn(
            ann["initial-scale"][1],
            f"{v:g}: Torpor starts one replica to verify a revision, then follows "
            "the load (as initial-scale 1)",
        )


def _target(
    d: _Doc,
    ann: dict[str, tuple[str, str]],
    concurrency: int | None,
    scale: dict[str, Any],
    origin: dict[str, str],
) -> None:
    """Knative's effective target: ``target`` (else the hard limit, else Knative's
    default), capped at the hard limit, times the utilisation percentage."""
    target = _annotation_number(d, ann, "target")
    util = _annotation_number(d, ann, "target-utilization-percentage")
    # Knative's rule, with Knative's defaults for what is not given
    base = target if target is not None else (concurrency if concurrency else KNATIVE_TARGET)
    if concurrency and base > concurrency:
        base = float(concurrency)  # Knative caps the target at the hard limit
    share = (util if util is not None else KNATIVE_UTILIZATION) / 100
    if not 0 < share <= 1:
        raise d.refuse(
            ann["target-utilization-percentage"][1], "expected a percent above 0 and at most 100"
        )
    effective = base * share
    scale["target"] = math.floor(effective * 1000) / 1000 or effective
    origin["scale.target"] = ann.get(
        "target",
        ann.get("target-utilization-percentage", ("", "spec.template.spec.containerConcurrency")),
    )[1]
    if target is None and not concurrency:
        d.warn(
            "spec.template.metadata.annotations",
            f"no autoscaling.knative.dev/target: Knative's default "
            f"applies ({KNATIVE_TARGET:g} x {util if util is not None else KNATIVE_UTILIZATION:g} % = "
            f"{effective:g} in-flight requests per replica; Torpor's own default is 10)",
        )


def _traffic(d: _Doc, value: Any, template_name: str | None) -> list[TrafficEntry] | None:
    """``spec.traffic`` -> entries; None when all of it goes to the latest revision untagged."""
    if value is None:
        return None
    where = "spec.traffic"
    if not isinstance(value, list) or not value:
        raise d.refuse(where, f"expected a non-empty list, got {describe(value)}")
    out: list[TrafficEntry] = []
    tags: set[str] = set()
    for i, raw in enumerate(value):
        path = f"{where}[{i}]"
        t = mapping(raw, d.source, path)
        for key in t:
            if key == "url":
                d.warn(f"{path}.url", "status, ignored (Torpor serves a tag at TAG-NAME.<domain>)")
            elif key == "configurationName":
                raise d.refuse(
                    f"{path}.configurationName",
                    "Torpor routes to revisions; use revisionName or latestRevision",
                )
            elif key not in ("revisionName", "latestRevision", "percent", "tag"):
                d.warn(f"{path}.{key}", "not supported, ignored")
        rev, latest = t.get("revisionName"), t.get("latestRevision")
        if latest is not None and not isinstance(latest, bool):
            raise d.refuse(
                f"{path}.latestRevision", f"expected true or false, got {describe(latest)}"
            )
        if rev is not None and not isinstance(rev, str):
            raise d.refuse(f"{path}.revisionName", f"expected a revision name, got {describe(rev)}")
        if rev and latest:
            raise d.refuse(path, "revisionName and latestRevision: true exclude each other")
        if not rev and latest is False:
            raise d.refuse(path, "latestRevision: false needs a revisionName")
        target = None if not rev or rev == template_name else rev
        pct = t.get("percent", 0)
        if isinstance(pct, bool) or not isinstance(pct, int) or not 0 <= pct <= 100:
            raise d.refuse(f"{path}.percent", f"expected an integer 0..100, got {describe(pct)}")
        tag = t.get("tag")
        if tag is not None:
            try:
                validate_tag(tag, f"{path}.tag")
            except SpecError as e:
                raise d.refuse(f"{path}.tag", str(e).split(": ", 1)[-1]) from None
            if tag in tags:
                raise d.refuse(f"{path}.tag", f"tag {tag!r} used twice")
            tags.add(tag)
        out.append(TrafficEntry(target, pct, tag))
    total = sum(t.percent for t in out)
    if total != 100:
        raise d.refuse(where, f"percents must sum to 100, got {total}")
    if len(out) == 1 and out[0].revision is None and out[0].tag is None:
        return None
    return out

"""A Torpor function (``GET /v1/functions/NAME``) as a Knative Service or an OpenFaaS
stack (pure). The inverse of the importers for every field both sides have: importing
the output gives back the same spec. What has no equivalent is named in a warning."""

from __future__ import annotations

from typing import Any

from torpor.model import Spec
from torpor.spec import format_duration, format_size

PLACEHOLDER_IMAGE = "REGISTRY/IMAGE:TAG"


def _serving(fn: dict[str, Any]) -> dict[str, Any]:
    """The revision to export: the one with the most traffic, else the latest."""
    revisions = fn.get("revisions") or []
    if not revisions:
        raise ValueError(f"{fn.get('name')} has no revision")
    return max(revisions, key=lambda r: (r.get("traffic", 0), r.get("number", 0)))


def _cpu(cpu: float) -> str:
    milli = round(cpu * 1000)
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def _image(rev: dict[str, Any], spec: Spec, warnings: list[str]) -> str:
    if spec.image:
        return spec.image
    built = rev.get("image")
    if built:
        warnings.append(
            f"image: {built} was built by Torpor from source; push it to a registry the cluster pulls "
            "from and put that name here"
        )
        return str(built)
    warnings.append(
        f"image: a source function has no image here; build one and replace {PLACEHOLDER_IMAGE}"
    )
    return PLACEHOLDER_IMAGE


def to_knative(fn: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    rev = _serving(fn)
    spec = Spec.from_dict(rev["spec"])
    warnings: list[str] = []
    s = spec.scale
    ann: dict[str, str] = {
        "autoscaling.knative.dev/class": "kpa.autoscaling.knative.dev",
        "autoscaling.knative.dev/metric": "concurrency",
        "autoscaling.knative.dev/min-scale": str(s.min),
        "autoscaling.knative.dev/max-scale": str(s.max),
        "autoscaling.knative.dev/target": f"{s.target:g}",
        "autoscaling.knative.dev/target-utilization-percentage": "100",
        "autoscaling.knative.dev/window": str(format_duration(s.window)),
        "autoscaling.knative.dev/panic-window-percentage": f"{s.panic_window:g}",
        "autoscaling.knative.dev/panic-threshold-percentage": f"{s.panic_threshold:g}",
        "autoscaling.knative.dev/scale-to-zero-pod-retention-period": str(format_duration(s.idle)),
    }
    container: dict[str, Any] = {"image": _image(rev, spec, warnings)}
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in spec.env.items()]
    env += [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": v, "key": v}}}
        for k, v in spec.secrets.items()
    ]
    if env:
        container["env"] = env
    container["ports"] = [{"containerPort": spec.port}]
    quantities = {
        "cpu": _cpu(spec.resources.cpu),
        "memory": str(format_size(spec.resources.memory)),
    }
    container["resources"] = {"limits": dict(quantities), "requests": dict(quantities)}
    if spec.command is not None:
        container["command"] = list(spec.command)
    if spec.args is not None:
        container["args"] = list(spec.args)
    if spec.secrets:
        warnings.append(
            "env valueFrom.secretKeyRef: create each Kubernetes Secret with one key of its own name ("
            + ", ".join(sorted(set(spec.secrets.values())))
            + ")"
        )
    if spec.handler and not spec.image:
        warnings.append(
            f"handler {spec.handler} ({spec.handler_style} style): the image must serve it on $PORT"
        )
    if spec.max_body != Spec(name=spec.name).max_body:
        warnings.append(f"max_body {format_size(spec.max_body)}: no Knative field; not exported")
    warnings.append("rollout: Knative has no judged canary; not exported")
    meta: dict[str, Any] = {"name": fn["name"]}
    if spec.labels:
        meta["labels"] = dict(spec.labels)
    template_spec: dict[str, Any] = {
        "containerConcurrency": s.concurrency,
        "timeoutSeconds": max(1, round(spec.timeout)),
    }
    if not float(spec.timeout).is_integer():
        warnings.append(f"timeout {spec.timeout:g}s: Knative takes whole seconds; rounded")
    template_spec["containers"] = [container]
    doc: dict[str, Any] = {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"template": {"metadata": {"annotations": ann}, "spec": template_spec}},
    }
    traffic = [t for t in fn.get("traffic") or [] if t.get("percent") or t.get("tag")]
    if traffic:
        doc["spec"]["traffic"] = [
            {
                "revisionName": t["revision"],
                "percent": t["percent"],
                **({"tag": t["tag"]} if t.get("tag") else {}),
            }
            for t in traffic
        ]
        warnings.append(
            "spec.traffic names Torpor's revisions (NAME-00001...): Knative names the first revisions "
            "of a new Service the same way only if they are created in the same order"
        )
    return doc, warnings


def to_openfaas(fn: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    rev = _serving(fn)
    spec = Spec.from_dict(rev["spec"])
    warnings: list[str] = []
    s = spec.scale
    entry: dict[str, Any] = {}
    if not spec.image and spec.handler_style == "openfaas":
        entry["lang"] = "python3-http"
        entry["handler"] = f"./{fn['name']}"
        entry["image"] = f"{fn['name']}:latest"
        warnings.append(
            f"handler: put the function's files (the package `function`) in ./{fn['name']}"
        )
    else:
        entry["image"] = _image(rev, spec, warnings)
        if not spec.image:
            warnings.append(
                f"a Torpor-style handler ({spec.handler}) has no OpenFaaS template; the image runs"
            )
    env = dict(spec.env)
    if env:
        entry["environment"] = env
    if spec.secrets:
        entry["secrets"] = sorted(set(spec.secrets.values()))
        warnings.append(
            "secrets: OpenFaaS mounts them as files under /var/openfaas/secrets/ rather than "
            "variables (" + ", ".join(f"{k} <- {v}" for k, v in sorted(spec.secrets.items())) + ")"
        )
    labels: dict[str, str] = {
        "com.openfaas.scale.min": str(max(s.min, 1)),
        "com.openfaas.scale.max": str(s.max),
        "com.openfaas.scale.zero": "true" if s.min == 0 else "false",
        "com.openfaas.scale.zero-duration": str(format_duration(s.idle)),
        "com.openfaas.scale.type": "capacity",
        "com.openfaas.scale.target": f"{s.target:g}",
        "com.openfaas.scale.target-proportion": "1",
        **spec.labels,
    }
    entry["labels"] = labels
    entry["limits"] = {
        "memory": str(format_size(spec.resources.memory)),
        "cpu": _cpu(spec.resources.cpu),
    }
    entry["environment"] = {
        **env,
        "exec_timeout": str(format_duration(spec.timeout)),
        "write_timeout": str(format_duration(spec.timeout)),
    }
    if s.concurrency:
        entry["environment"]["max_inflight"] = str(s.concurrency)
    if spec.port != 8080:
        warnings.append(f"port {spec.port}: OpenFaaS sends traffic to 8080")
    if spec.command is not None or spec.args is not None:
        warnings.append("command/args: no stack.yml key; bake them into the image")
    doc = {
        "version": 1.0,
        "provider": {"name": "openfaas", "gateway": "http://127.0.0.1:8080"},
        "functions": {fn["name"]: entry},
    }
    return doc, warnings

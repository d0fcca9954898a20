"""An OpenFaaS stack file (``stack.yml``) -> Torpor functions.

Pure but for reading the files the stack names (``environment_file``, the handler
folder's ``requirements.txt``), relative to the stack file's folder. What each key
becomes is the table in the README ("Coming from Knative / OpenFaaS"):

- ``lang: python3-http`` / ``python3-http-debian``: built from the ``handler`` folder,
  shipped as the package ``function`` (as the template does) and run with
  ``handler_style: openfaas`` (``handle(event, context)``); its ``requirements.txt`` is
  installed.
- ``lang: dockerfile``, or ``image:`` without ``lang``: the image runs (Torpor does not
  build it: ``docker build -t IMAGE HANDLER`` first).
- Any other ``lang`` is refused: its template is not supported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from torpor.importers.common import (
    MAX_FILE_BYTES,
    Imported,
    ImportRefused,
    mapping,
    number,
    secret_env_name,
    text,
)
from torpor.spec import SpecError, describe, parse_duration, validate_secret_name

PYTHON_LANGS = ("python3-http", "python3-http-debian")
IMAGE_LANGS = ("dockerfile",)
SCALE = "com.openfaas.scale."
OPENFAAS_MIN = 1  # OpenFaaS's default com.openfaas.scale.min
OPENFAAS_PROPORTION = 0.9  # default com.openfaas.scale.target-proportion
IGNORED_KEYS = (
    "skip_build",
    "build_args",
    "build_options",
    "build_secrets",
    "platforms",
    "namespace",
    "fprocess",
)


def import_stack(doc: Any, stack: Path, only: str | None = None) -> list[Imported]:
    """The functions of a parsed stack file (``only``: just that one)."""
    source = stack.name
    top = mapping(doc, source, "")
    warnings: list[str] = []
    for key, value in top.items():
        if key in ("version", "functions"):
            continue
        if key == "provider":
            prov = mapping(value, source, "provider")
            if prov.get("name") not in (None, "openfaas", "faas"):
                warnings.append(
                    f"{source}: provider.name: {describe(prov.get('name'))} is not openfaas; read as "
                    "an OpenFaaS stack anyway"
                )
            if "gateway" in prov:
                warnings.append(
                    f"{source}: provider.gateway: ignored (Torpor deploys to its own API: --api)"
                )
        elif key == "configuration":
            warnings.append(
                f"{source}: configuration: ignored (templates are not fetched; python3-http is built in)"
            )
        else:
            warnings.append(f"{source}: {key}: not supported, ignored")
    functions = mapping(top.get("functions"), source, "functions")
    if not functions:
        raise ImportRefused(source, "functions", "no function listed")
    if only is not None and only not in functions:
        known = ", ".join(sorted(str(k) for k in functions))
        raise ImportRefused(
            source, "functions", f"--filter {only!r}: no such function (the stack has {known})"
        )
    out = []
    for name, body in functions.items():
        if only is not None and name != only:
            continue
        fn = import_function(
            text(name, source, "functions"), mapping(body, source, f"functions.{name}"), stack
        )
        out.append(fn)
    out[0].warnings[:0] = warnings
    return out


HANDLED_KEYS = (
    "lang",
    "handler",
    "image",
    "environment",
    "environment_file",
    "secrets",
    "labels",
    "annotations",
    "limits",
    "requests",
)


@dataclass
class _Function:
    """One stack entry being mapped: where it is (for messages) and what is collected
    along the way (warnings in the order the keys are read, spec field -> source field)."""

    name: str
    stack: Path
    warnings: list[str] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return self.stack.name

    @property
    def base(self) -> Path:
        return self.stack.parent

    @property
    def where(self) -> str:
        return f"functions.{self.name}"

    def warn(self, key: str, what: str) -> None:
        self.warnings.append(f"{self.source}: {self.where}.{key}: {what}")

    def refuse(self, key: str, what: str) -> ImportRefused:
        return ImportRefused(self.source, f"{self.where}.{key}" if key else self.where, what)


def import_function(name: str, body: Mapping[Any, Any], stack: Path) -> Imported:
    """One ``functions.NAME`` entry of the stack ``stack`` as a Torpor function: the
    spec, the folder and requirements to ship (``lang: python3-http``) and a warning for
    every key that maps loosely or not at all. Raises ImportRefused naming the key."""
    fn = _Function(name, stack)
    fn.origin["name"] = fn.where
    spec: dict[str, Any] = {"name": name}
    folder, requirements = _code(fn, body, spec)
    env = _environment(fn, body)
    _timeout(fn, env, spec)
    scale: dict[str, Any] = {}
    if "max_inflight" in env:  # of-watchdog's hard in-flight limit
        scale["concurrency"] = int(
            number(
                env["max_inflight"], fn.source, f"{fn.where}.environment.max_inflight", integer=True
            )
        )
        fn.origin["scale.concurrency"] = f"{fn.where}.environment.max_inflight"
    secrets = _secrets(fn, body, env)
    labels: dict[str, str] = {}
    _labels(
        mapping(body.get("labels"), fn.source, f"{fn.where}.labels"),
        fn.source,
        fn.where,
        scale,
        labels,
        fn.origin,
        fn.warn,
        fn.refuse,
    )
    for key, value in mapping(
        body.get("annotations"), fn.source, f"{fn.where}.annotations"
    ).items():
        fn.warn(f"annotations.{key}", f"{describe(value)}: not supported, ignored")
    resources = _resources(fn, body)
    _other_keys(fn, body)
    for key, part in (
        ("env", env),
        ("secrets", secrets),
        ("scale", scale),
        ("resources", resources),
        ("labels", labels),
    ):
        if part:
            spec[key] = part
    if labels:
        fn.origin["labels"] = f"{fn.where}.labels"
    return Imported(
        name=name,
        spec=spec,
        source=folder,
        package="function" if folder else None,
        requirements=requirements,
        warnings=fn.warnings,
        origin=fn.origin,
        secrets_needed={s: f"secrets ({v})" for v, s in secrets.items()},
    )


def _code(
    fn: _Function, body: Mapping[Any, Any], spec: dict[str, Any]
) -> tuple[Path | None, Path | None]:
    """``lang``, ``handler``, ``image``: what runs. Sets ``spec``'s handler or image and
    returns (handler folder, its requirements.txt), both None for an image."""
    lang = body.get("lang")
    if isinstance(lang, str) and lang.lower() == "dockerfile":
        lang = "dockerfile"  # old stack files say `Dockerfile`
    image = body.get("image")
    if lang is not None and lang not in PYTHON_LANGS + IMAGE_LANGS:
        raise fn.refuse(
            "lang",
            f"{describe(lang)}: Torpor builds {', '.join(PYTHON_LANGS)} from source and runs "
            "images (lang: dockerfile, or image: without lang); other templates are not supported",
        )
    if lang in PYTHON_LANGS:
        return _python_code(fn, body, spec)
    if not isinstance(image, str) or not image:
        raise fn.refuse(
            "image", "required: the image to run (or lang: python3-http to build from source)"
        )
    spec["image"] = image
    fn.origin["image"] = f"{fn.where}.image"
    if lang == "dockerfile":
        fn.warn(
            "lang",
            f"dockerfile: Torpor runs the image {image}, it does not build it; build it first "
            f"(docker build -t {image} {body.get('handler') or '.'})",
        )
    elif "handler" in body:
        fn.warn("handler", "ignored without lang (the image runs)")
    return None, None


def _python_code(
    fn: _Function, body: Mapping[Any, Any], spec: dict[str, Any]
) -> tuple[Path, Path | None]:
    """``lang: python3-http``: the handler folder (which must hold handler.py), run in
    the ``openfaas`` handler style, and its requirements.txt if it has one."""
    handler = body.get("handler")
    if not isinstance(handler, str) or not handler:
        raise fn.refuse("handler", "required with lang python3-http: the folder of handler.py")
    folder = (fn.base / handler).resolve()
    if not (folder / "handler.py").is_file():
        raise fn.refuse("handler", f"{handler!r}: no handler.py in {folder}")
    spec["handler"] = "function.handler:handle"
    spec["handler_style"] = "openfaas"
    fn.origin["handler"] = f"{fn.where}.handler"
    requirements = folder / "requirements.txt"
    if body.get("image") is not None:
        fn.warn(
            "image",
            "the tag OpenFaaS pushes its build to; Torpor builds from the handler folder itself",
        )
    return folder, requirements if requirements.is_file() else None


def _environment(fn: _Function, body: Mapping[Any, Any]) -> dict[str, Any]:
    """``environment_file`` entries in order, then ``environment`` over them."""
    where = fn.where
    env: dict[str, Any] = {}
    for i, item in enumerate(
        _list(body.get("environment_file"), fn.source, f"{where}.environment_file")
    ):
        at = f"{where}.environment_file[{i}]"
        env.update(_env_file(fn.base, text(item, fn.source, at), fn.source, at))
        fn.origin.setdefault("env", at)
    inline = mapping(body.get("environment"), fn.source, f"{where}.environment")
    if inline:
        fn.origin["env"] = f"{where}.environment"
    env.update(inline)
    for key in env:
        fn.origin[f"env.{key}"] = f"{where}.environment.{key}"
    return env


def _timeout(fn: _Function, env: Mapping[str, Any], spec: dict[str, Any]) -> None:
    """of-watchdog's ``exec_timeout`` (else ``write_timeout``) -> ``timeout``; a value
    Torpor cannot read is warned about and the default kept."""
    timeout = env.get("exec_timeout") or env.get("write_timeout")
    if timeout is None:
        return
    key = "exec_timeout" if env.get("exec_timeout") else "write_timeout"
    try:
        spec["timeout"] = parse_duration(str(timeout), key)
    except SpecError:
        fn.warn(
            f"environment.{key}",
            f"{describe(timeout)} is not a duration Torpor reads; timeout left at 30s",
        )
    else:
        fn.origin["timeout"] = f"{fn.where}.environment.{key}"


def _secrets(fn: _Function, body: Mapping[Any, Any], env: Mapping[str, Any]) -> dict[str, str]:
    """``secrets`` -> {environment variable: Torpor secret}; a name that would collide
    with an environment variable or another secret's is refused."""
    secrets: dict[str, str] = {}
    for i, raw in enumerate(_list(body.get("secrets"), fn.source, f"{fn.where}.secrets")):
        path = f"secrets[{i}]"
        secret = text(raw, fn.source, f"{fn.where}.{path}")
        try:
            validate_secret_name(secret, "secret")
        except SpecError as e:
            raise fn.refuse(path, str(e).split(": ", 1)[-1]) from None
        var = secret_env_name(secret)
        if var in env or var in secrets:
            raise fn.refuse(path, f"{secret!r} becomes the variable {var}, which is already set")
        secrets[var] = secret
        fn.origin[f"secrets.{var}"] = f"{fn.where}.{path}"
        fn.warn(
            path,
            f"OpenFaaS mounts it as the file /var/openfaas/secrets/{secret}; Torpor sets it in the "
            f"environment as {var} (read os.environ[{var!r}])",
        )
    return secrets


def _resources(fn: _Function, body: Mapping[Any, Any]) -> dict[str, Any]:
    """``limits`` (else ``requests``) memory and cpu -> ``resources``: Torpor enforces a
    limit and reserves nothing."""
    resources: dict[str, Any] = {}
    limits = mapping(body.get("limits"), fn.source, f"{fn.where}.limits")
    requests = mapping(body.get("requests"), fn.source, f"{fn.where}.requests")
    for kind in ("memory", "cpu"):
        if kind in limits:
            resources[kind] = limits[kind]
            fn.origin[f"resources.{kind}"] = f"{fn.where}.limits.{kind}"
            if kind in requests:
                fn.warn(
                    f"requests.{kind}", "Torpor reserves nothing ahead; it enforces the limit only"
                )
        elif kind in requests:
            resources[kind] = requests[kind]
            fn.origin[f"resources.{kind}"] = f"{fn.where}.requests.{kind}"
            fn.warn(f"requests.{kind}", "no limit given: Torpor enforces this request as the limit")
    for section, values in (("limits", limits), ("requests", requests)):
        for key in values:
            if key not in ("memory", "cpu"):
                fn.warn(f"{section}.{key}", "not supported, ignored")
    return resources


def _other_keys(fn: _Function, body: Mapping[Any, Any]) -> None:
    """A warning for every key of the entry not mapped above."""
    for key, value in body.items():
        if key in HANDLED_KEYS:
            continue
        if key == "constraints":
            fn.warn(key, "scheduling constraints, ignored (Torpor places replicas itself)")
        elif key == "readonly_root_filesystem":
            if value is not True:
                fn.warn(
                    key,
                    "Torpor always runs replicas with a read-only root file system (writable /tmp)",
                )
        elif key in IGNORED_KEYS:
            fn.warn(key, "a build or deploy option of faas-cli, ignored")
        else:
            fn.warn(key, "not supported, ignored")


def _list(value: Any, source: str, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ImportRefused(source, where, f"expected a list, got {describe(value)}")
    return value


def _env_file(base: Path, rel: str, source: str, where: str) -> Mapping[Any, Any]:
    """An ``environment_file``: YAML with an ``environment:`` mapping."""
    path = base / rel
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ImportRefused(source, where, f"{rel}: cannot read: {e.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ImportRefused(source, where, f"{rel}: larger than 1 MiB")
    try:
        data = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise ImportRefused(
            source, where, f"{rel}: invalid YAML: {str(e).splitlines()[0][:120]}"
        ) from None
    doc = mapping(data, source, f"{where} ({rel})")
    return mapping(doc.get("environment"), source, f"{where} ({rel}): environment")


def _labels(
    raw: Mapping[Any, Any],
    source: str,
    where: str,
    scale: dict[str, Any],
    labels: dict[str, str],
    origin: dict[str, str],
    warn: Any,
    refuse: Any,
) -> None:
    """``com.openfaas.scale.*`` -> scale; other labels are kept as labels."""
    sc = {
        str(k)[len(SCALE) :]: (v, f"{where}.labels.{k}")
        for k, v in raw.items()
        if str(k).startswith(SCALE)
    }
    for key, value in raw.items():
        if not str(key).startswith(SCALE):
            labels[str(key)] = text(value, source, f"{where}.labels.{key}")

    def num(key: str, integer: bool = False) -> float | None:
        if key not in sc:
            return None
        return number(sc[key][0], source, sc[key][1], integer=integer)

    kind = str(sc["type"][0]) if "type" in sc else "rps"
    zero = str(sc["zero"][0]).lower() in ("true", "1") if "zero" in sc else False
    low = num("min", True)
    if zero:
        scale["min"] = 0
        origin["scale.min"] = sc["zero"][1]
        if low is not None and low > 1:
            warn(
                f"labels.{SCALE}min",
                f"{low:g} while active and 0 when idle in OpenFaaS; Torpor scales between "
                "0 and max on the load",
            )
    else:
        scale["min"] = int(low) if low is not None else OPENFAAS_MIN
        origin["scale.min"] = sc["min"][1] if "min" in sc else f"{where}.labels"
        if scale["min"] >= 1:
            warn(
                "labels",
                f"{SCALE}zero is not true: {scale['min']} replica(s) always run, as in OpenFaaS "
                f"(set {SCALE}zero: true to scale to zero)",
            )
    if (v := num("max", True)) is not None:
        scale["max"] = int(v)
        origin["scale.max"] = sc["max"][1]
    if "zero-duration" in sc:
        scale["idle"] = str(sc["zero-duration"][0])
        origin["scale.idle"] = sc["zero-duration"][1]
    if "target" in sc:
        if kind != "capacity":
            raise refuse(
                f"labels.{SCALE}target",
                f"a target in {kind!r} ({SCALE}type, rps by default) is not "
                f"supported: Torpor scales on in-flight requests; set {SCALE}type: capacity",
            )
        target = num("target")
        proportion = num("target-proportion")
        share = OPENFAAS_PROPORTION if proportion is None else proportion
        if target is not None:
            effective = target * share
            scale["target"] = math.floor(effective * 1000) / 1000 or effective
            origin["scale.target"] = sc["target"][1]
    elif "type" in sc and kind not in ("capacity", "rps"):
        raise refuse(
            f"labels.{SCALE}type", f"{kind!r}: Torpor scales on in-flight requests (capacity) only"
        )
    for key in sc:
        if key not in (
            "min",
            "max",
            "zero",
            "zero-duration",
            "target",
            "target-proportion",
            "type",
        ):
            warn(f"labels.{SCALE}{key}", "not supported, ignored")

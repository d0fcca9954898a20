"""What the Knative and OpenFaaS importers share: the result type, the refusal, reading
a YAML file of one or several documents, and telling the two kinds apart."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from torpor.model import Spec
from torpor.spec import SpecError, describe, parse_spec

MAX_FILE_BYTES = 1024 * 1024  # a service.yaml / stack.yml larger than this is refused unread
MAX_DOCUMENTS = 100


class ImportRefused(ValueError):
    """A document Torpor will not deploy as it stands: ``where`` names the field in the
    source file (``spec.template.metadata.annotations.autoscaling.knative.dev/metric``)."""

    def __init__(self, source: str, where: str, message: str) -> None:
        self.source, self.where, self.message = source, where, message
        super().__init__(f"{source}: {where}: {message}" if where else f"{source}: {message}")


@dataclass
class TrafficEntry:
    revision: str | None  # None: the revision this deploy creates (Knative latestRevision)
    percent: int
    tag: str | None = None


@dataclass
class Imported:
    """One function to deploy."""

    name: str
    spec: dict[str, Any]  # a torpor.yaml mapping
    source: Path | None = None  # folder whose files ship with it (None: an image only)
    package: str | None = None  # ship the folder's files under this package (OpenFaaS: "function")
    requirements: Path | None = None  # a requirements.txt to ship at the top
    traffic: list[TrafficEntry] | None = None  # None: the new revision takes all traffic
    secrets_needed: dict[str, str] = field(
        default_factory=dict
    )  # Torpor secret -> where it came from
    warnings: list[str] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)  # spec field -> field of the source file

    def validate(self, source: str, max_replicas: int | None = None) -> Spec:
        """The spec, checked as a ``torpor.yaml`` would be; a refusal names the source field."""
        try:
            return parse_spec(self.spec, source=source, max_replicas=max_replicas)
        except SpecError as e:
            top = e.path.split(".")[0].split("[")[0]
            where = self.origin.get(e.path) or self.origin.get(top) or ""
            prefix = f"{where} (as {e.path})" if where and e.path else e.path
            body = (
                str(e)[len(e.path) + 2 :] if e.path and str(e).startswith(e.path + ": ") else str(e)
            )
            raise ImportRefused(
                source, f"{self.name}: {prefix}" if prefix else self.name, body
            ) from None


def detect(docs: list[Any]) -> str | None:
    """``"knative"``, ``"openfaas"`` or None (a torpor.yaml or something else)."""
    for doc in docs:
        if isinstance(doc, Mapping):
            api = doc.get("apiVersion")
            if isinstance(api, str) and api.startswith("serving.knative.dev/"):
                return "knative"
    if (
        len(docs) == 1
        and isinstance(docs[0], Mapping)
        and "functions" in docs[0]
        and "provider" in docs[0]
    ):
        return "openfaas"
    return None


def load_documents(path: Path) -> list[Any]:
    """Every YAML document in ``path`` (empty ones dropped). Raises ImportRefused."""
    source = path.name
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ImportRefused(str(path), "", f"cannot read: {e.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ImportRefused(source, "", "file larger than 1 MiB")
    try:
        docs = [d for d in yaml.safe_load_all(raw) if d is not None]
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ImportRefused(source, "", f"invalid YAML{where}: {e.problem or e.context}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise ImportRefused(source, "", f"invalid YAML: {str(e).splitlines()[0][:120]}") from None
    if len(docs) > MAX_DOCUMENTS:
        raise ImportRefused(source, "", f"{len(docs)} documents; at most {MAX_DOCUMENTS}")
    return docs


def mapping(value: Any, source: str, where: str) -> Mapping[Any, Any]:
    """A mapping (null = empty), else a refusal naming ``where``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ImportRefused(source, where, f"expected a mapping, got {describe(value)}")
    return value


def text(value: Any, source: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ImportRefused(source, where, f"expected a string, got {describe(value)}")
    return str(value)


def number(value: Any, source: str, where: str, *, integer: bool = False) -> float:
    """A number from an annotation (always a string in Kubernetes) or a YAML number."""
    if isinstance(value, bool):
        raise ImportRefused(source, where, f"expected a number, got {describe(value)}")
    try:
        out = (
            float(value) if isinstance(value, str | int | float) and len(str(value)) <= 30 else None
        )
    except ValueError:
        out = None
    if (
        out is None
        or out != out
        or out in (float("inf"), float("-inf"))
        or (integer and not out.is_integer())
    ):
        kind = "an integer" if integer else "a number"
        raise ImportRefused(source, where, f"expected {kind}, got {describe(value)}")
    return out


def secret_env_name(secret: str) -> str:
    """The environment variable an OpenFaaS secret becomes: ``db-password`` -> DB_PASSWORD."""
    name = "".join(c if c.isalnum() else "_" for c in secret.upper())
    return name if name and not name[0].isdigit() else f"_{name}"

"""``torpor deploy FILE`` for a Knative service.yaml or an OpenFaaS stack.yml, and
``torpor export NAME --format knative|openfaas``.

The importers (``torpor.importers``) turn the file into torpor.yaml mappings; this
module packs each with its files into the upload the API always takes, deploys it the
normal way, and applies a Knative traffic block once the new revision is ready.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path
from typing import Any

import yaml

from torpor.archive import skipped_path
from torpor.cli.main import Api, CliError, deploy_params, die, upload
from torpor.importers import Imported, ImportRefused, detect, knative, load_documents, openfaas
from torpor.importers.export import to_knative, to_openfaas
from torpor.model import format_traffic


def _say(msg: str) -> None:
    print(f"torpor: deploy: {msg}", file=sys.stderr)


def read_file(path: Path, only: str | None) -> tuple[str, list[Imported]]:
    """(kind, functions) of a Knative or OpenFaaS file. Raises ImportRefused."""
    docs = load_documents(path)
    kind = detect(docs)
    if kind == "knative":
        if only is not None:
            raise ImportRefused(path.name, "", "--filter is for OpenFaaS stack files")
        return kind, knative.import_documents(docs, path.name)
    if kind == "openfaas":
        return kind, openfaas.import_stack(docs[0], path, only)
    raise ImportRefused(
        path.name,
        "",
        "neither a Knative Service (apiVersion serving.knative.dev/v1, kind Service) "
        "nor an OpenFaaS stack (functions: and provider:); for a torpor.yaml give its folder",
    )


def pack_imported(imp: Imported) -> bytes:
    """The upload: torpor.yaml from the spec, the source folder's regular files (under
    ``imp.package`` when set), and ``requirements.txt`` at the top."""
    buf = io.BytesIO()

    def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        add_bytes(tar, "torpor.yaml", yaml.safe_dump(imp.spec, sort_keys=False).encode())
        if imp.requirements is not None:
            add_bytes(tar, "requirements.txt", imp.requirements.read_bytes())
        if imp.source is not None:
            prefix = Path(imp.package) if imp.package else Path()
            if imp.package:
                dir_info = tarfile.TarInfo(imp.package)
                dir_info.type, dir_info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(dir_info)
            for path in sorted(imp.source.rglob("*")):
                rel = path.relative_to(imp.source)
                if skipped_path(rel):
                    continue
                if not imp.package and rel.parts[0] in (
                    "torpor.yaml",
                    "torpor.yml",
                    "requirements.txt",
                ):
                    continue
                if path.is_symlink() or not (path.is_file() or path.is_dir()):
                    _say(f"skipping {rel}: not a regular file or folder")
                    continue
                tar.add(path, arcname=str(prefix / rel), recursive=False)
    return buf.getvalue()


def deploy_file(api: Api, path: Path, args: argparse.Namespace) -> int:
    try:
        kind, functions = read_file(path, args.filter)
        specs = [
            imp.validate(path.name) for imp in functions
        ]  # every one, before anything is uploaded
    except ImportRefused as e:
        die(f"deploy: {e}")
    if len(functions) > 1 and (args.canary is not None or args.tag):
        die(
            "deploy: --canary and --tag apply to one function; use --filter NAME (OpenFaaS) or one Service a file"
        )
    for imp in functions:
        for line in imp.warnings:
            _say(f"warning: {line}")
    for imp in functions:
        if imp.traffic is not None:
            if args.canary is not None or args.no_traffic or args.tag:
                die(
                    f"deploy: {imp.name}: the file's spec.traffic sets the split; drop --canary/--tag/--no-traffic"
                )
            _check_traffic(api, imp)
    code = 0
    for imp, spec in zip(functions, specs, strict=True):
        print(
            f"{kind}: {imp.name} ({'image ' + spec.image if spec.image else 'built from ' + str(imp.source)})",
            file=sys.stderr,
        )
        params = deploy_params(args)
        if imp.traffic is not None:
            params = {"no_traffic": "1"}
        rev, rc = upload(
            api, imp.name, pack_imported(imp), params, args, quiet_url=imp.traffic is not None
        )
        code = code or rc
        if imp.traffic is not None:
            targets = [
                {"revision": t.revision or rev, "percent": t.percent, "tag": t.tag}
                for t in imp.traffic
            ]
            out = api.call("PUT", f"/v1/functions/{imp.name}/traffic", json={"traffic": targets})
            print(
                f"{rev} ready; traffic: " + format_traffic(out["traffic"]),
                file=sys.stderr,
            )
            fn = api.call("GET", f"/v1/functions/{imp.name}")
            print(fn["url"])
    return code


def _check_traffic(api: Api, imp: Imported) -> None:
    """Before uploading: every revisionName the traffic block names exists and is ready."""
    named = [t.revision for t in imp.traffic or [] if t.revision]
    if not named:
        return
    try:
        fn = api.call("GET", f"/v1/functions/{imp.name}")
        revisions = {r["name"]: r["status"] for r in fn["revisions"]}
    except CliError:
        revisions = {}
    for name in named:
        if name not in revisions:
            known = ", ".join(sorted(revisions)) or "none yet"
            die(
                f"deploy: {imp.name}: spec.traffic names revision {name!r}, which Torpor does not have (its "
                f"revisions: {known}; Torpor names them {imp.name}-00001, ...)"
            )
        if revisions[name] != "ready":
            die(
                f"deploy: {imp.name}: spec.traffic names revision {name!r}, which is {revisions[name]}"
            )


def export(api: Api, args: argparse.Namespace) -> int:
    fn: dict[str, Any] = api.call("GET", f"/v1/functions/{args.name}")
    try:
        doc, warnings = to_knative(fn) if args.format == "knative" else to_openfaas(fn)
    except ValueError as e:
        die(f"export: {e}")
    for line in warnings:
        print(f"torpor: export: warning: {line}", file=sys.stderr)
    sys.stdout.write(yaml.safe_dump(doc, sort_keys=False))
    return 0

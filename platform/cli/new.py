"""``torpor new NAME [--lang python] [--template http|json] [--dir PARENT]``: write a new
function folder from a template; ``torpor new --list`` shows the templates.

Templates are package data (``torpor.templates``, the repository's
``functions/templates/LANG/TEMPLATE/``), so an installed CLI carries them. Every file's
``__NAME__`` becomes the function's name. An existing folder is never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from torpor.spec import SpecError, validate_name

PLACEHOLDER = "__NAME__"
DEFAULT_LANG = "python"
DEFAULT_TEMPLATE = "http"
MAX_TEMPLATE_FILE = 256 * 1024


class NewError(Exception):
    pass


def templates_root() -> Traversable:
    return resources.files("torpor.templates")


def available() -> dict[str, dict[str, str]]:
    """``{lang: {template: one-line description}}``."""
    out: dict[str, dict[str, str]] = {}
    root = templates_root()
    for lang in sorted(root.iterdir(), key=lambda t: t.name):
        if not lang.is_dir() or lang.name.startswith(("_", ".")):
            continue
        for tpl in sorted(lang.iterdir(), key=lambda t: t.name):
            if tpl.is_dir() and tpl.joinpath("torpor.yaml").is_file():
                out.setdefault(lang.name, {})[tpl.name] = _describe(tpl)
    return out


def _describe(tpl: Traversable) -> str:
    handler = tpl.joinpath("handler.py")
    if handler.is_file():
        first = handler.read_text(encoding="utf-8").lstrip("\"' \n").splitlines()[0]
        return first.replace(f"{PLACEHOLDER}: ", "").strip()
    return ""


def _files(tpl: Traversable, prefix: str = "") -> list[tuple[str, Traversable]]:
    out: list[tuple[str, Traversable]] = []
    for item in sorted(tpl.iterdir(), key=lambda t: t.name):
        if item.name in ("__pycache__", ".pytest_cache") or item.name.endswith(".pyc"):
            continue
        rel = f"{prefix}{item.name}"
        if item.is_dir():
            out += _files(item, rel + "/")
        else:
            out.append((rel, item))
    return out


def create(
    name: str, parent: Path, lang: str = DEFAULT_LANG, template: str = DEFAULT_TEMPLATE
) -> Path:
    """Write ``parent/name`` from the template; the folder written."""
    try:
        validate_name(name, "name")
    except SpecError as e:
        raise NewError(str(e)) from None
    found = available()
    if lang not in found:
        raise NewError(
            f"--lang {lang!r}: no such language; templates exist for {', '.join(sorted(found))}"
        )
    if template not in found[lang]:
        raise NewError(
            f"--template {template!r}: no such {lang} template; expected one of "
            f"{', '.join(sorted(found[lang]))}"
        )
    dest = parent / name
    if dest.exists() or dest.is_symlink():
        raise NewError(f"{dest} already exists; choose another name or remove it first")
    tpl = templates_root().joinpath(lang).joinpath(template)
    files = _files(tpl)
    dest.mkdir(parents=True)
    for rel, item in files:
        data = item.read_bytes()[:MAX_TEMPLATE_FILE]
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data.replace(PLACEHOLDER.encode(), name.encode()))
    return dest


def cmd_new(args: argparse.Namespace) -> int:
    if args.list:
        for lang, tpls in available().items():
            for tpl, desc in tpls.items():
                mark = " (default)" if (lang, tpl) == (DEFAULT_LANG, DEFAULT_TEMPLATE) else ""
                print(f"{lang:<8} {tpl:<8} {desc}{mark}")
        return 0
    if not args.name:
        print("torpor: new: give a NAME (or --list)", file=sys.stderr)
        return 2
    try:
        dest = create(args.name, Path(args.dir), args.lang, args.template)
    except NewError as e:
        print(f"torpor: new: {e}", file=sys.stderr)
        return 2 if "already exists" not in str(e) else 1
    shown = dest if args.dir != "." else Path(args.name)
    print(
        f"created {shown}/ ({args.lang} {args.template}): "
        + ", ".join(
            r for r, _ in _files(templates_root().joinpath(args.lang).joinpath(args.template))
        ),
        file=sys.stderr,
    )
    print(f"next: torpor deploy {shown}   (test it: cd {shown} && pytest)", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("new", help="write a new function folder from a template")
    p.add_argument("name", nargs="?", help="the function's name (and its folder's)")
    p.add_argument("--lang", default=DEFAULT_LANG, help=f"language (default {DEFAULT_LANG})")
    p.add_argument(
        "--template",
        default=DEFAULT_TEMPLATE,
        help=f"template (default {DEFAULT_TEMPLATE}; see --list)",
    )
    p.add_argument(
        "--dir", default=".", metavar="PARENT", help="where to create the folder (default .)"
    )
    p.add_argument("--list", action="store_true", help="show the templates")

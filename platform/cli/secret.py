"""`torpor secret`: values a function gets as env, never shown back.

    torpor secret set NAME [--from-file F]   value from F (verbatim), else from stdin: typed
                                             without echo on a terminal; piped, one trailing
                                             newline is dropped (`echo pw | ...`)
    torpor secret ls [-o json|yaml]                NAME, VERSION, UPDATED, USED BY
    torpor secret rm NAME [--force]          refused while a function uses it, unless --force

A spec maps env names to secrets: ``secrets: {DB_PASSWORD: db-password}``. A new value
reaches replicas started after the change; running ones keep the env they started with.
Nothing here prints a value.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from torpor.cli.output import add_output, emit

MAX_VALUE = 64 * 1024  # the API's cap (torpor.secret.MAX_VALUE)


def _fail(msg: str) -> NoReturn:
    print(f"torpor: {msg}", file=sys.stderr)
    sys.exit(1)


def _read_capped(f: BinaryIO, what: str) -> bytes:
    data = f.read(MAX_VALUE + 1)
    if len(data) > MAX_VALUE:
        _fail(f"secret set: {what} is over the {MAX_VALUE // 1024} KiB cap")
    return data


def read_value(name: str, from_file: str | None) -> bytes:
    """The value to set: the file verbatim, a line typed without echo, or piped stdin
    less one trailing newline."""
    if from_file is not None:
        try:
            with Path(from_file).open("rb") as f:
                return _read_capped(f, from_file)
        except OSError as e:
            _fail(f"secret set: cannot read {from_file}: {e.strerror}")
    if sys.stdin is None:
        _fail("secret set: no value: give --from-file F or pipe the value on stdin")
    if sys.stdin.isatty():
        try:
            return getpass.getpass(f"value of secret {name} (not shown): ").encode()
        except EOFError:
            _fail("secret set: no value typed")
    data = _read_capped(sys.stdin.buffer, "stdin")
    if data.endswith(b"\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith(b"\n") else data


def _ago(t: float) -> str:
    s = max(0, int(time.time() - t))
    return (
        f"{s}s"
        if s < 120
        else f"{s // 60}m"
        if s < 7200
        else f"{s // 3600}h"
        if s < 172800
        else f"{s // 86400}d"
    )


def cmd_secret(api: Any, args: argparse.Namespace) -> int:
    if args.secret_cmd == "set":
        value = read_value(args.name, args.from_file)
        if not value:
            _fail("secret set: the value is empty")
        out = api.call(
            "PUT",
            f"/v1/secrets/{args.name}",
            content=value,
            headers={"content-type": "application/octet-stream"},
        )
        verb = "created" if out["version"] == 1 else f"updated (version {out['version']})"
        users = (
            f"; used by {', '.join(out['used_by'])}: takes effect for replicas started from now on"
            if out["used_by"]
            else ""
        )
        print(f"secret {out['name']} {verb}{users}", file=sys.stderr)
        return 0
    if args.secret_cmd == "ls":
        secrets = api.call("GET", "/v1/secrets")["secrets"]
        if emit(args, secrets):
            return 0
        print(f"{'NAME':<32} {'VERSION':>7}  {'UPDATED':>7}  USED BY")
        for s in secrets:
            print(
                f"{s['name']:<32} {s['version']:>7}  {_ago(s['updated']):>7}  {', '.join(s['used_by']) or '-'}"
            )
        return 0
    params = {"force": "true"} if args.force else {}
    out = api.call("DELETE", f"/v1/secrets/{args.name}", params=params)
    note = (
        f" (still named by {', '.join(out['used_by'])}: their new replicas fail to start)"
        if out["used_by"]
        else ""
    )
    print(f"deleted secret {out['deleted']}{note}", file=sys.stderr)
    return 0


def add_parsers(sub: Any) -> dict[str, Any]:
    """Add `secret` to the CLI's subparsers; returns {command: handler(api, args)}."""
    p = sub.add_parser("secret", help="values functions get as env, never shown back")
    ss = p.add_subparsers(dest="secret_cmd", required=True)
    st = ss.add_parser("set", help="create or replace a secret (value from --from-file or stdin)")
    st.add_argument("name")
    st.add_argument("--from-file", metavar="F", help="read the value from F, verbatim")
    ls = ss.add_parser("ls", help="secrets and the functions that use them (never values)")
    add_output(ls)
    rm = ss.add_parser("rm", help="delete a secret")
    rm.add_argument("name")
    rm.add_argument("--force", action="store_true", help="delete even while functions use it")
    return {"secret": cmd_secret}

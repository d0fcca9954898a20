"""The ``torpor`` command line. Talks to the API over HTTP (and to the gateway for
``invoke``); knows the API's contract and the spec, nothing else.

Exit 0 on success; otherwise non-zero with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import httpx

from torpor.apitoken import client_token, default_state_dir, token_path
from torpor.archive import skipped_path
from torpor.cli.calls import add_parsers as add_call_parsers
from torpor.cli.calls import invoke_async
from torpor.cli.completion import SHELLS, completion_script
from torpor.cli.deploy import follow as follow_deploy
from torpor.cli.new import add_parser as add_new_parser
from torpor.cli.new import cmd_new
from torpor.cli.output import EXIT_CODES, EXIT_FAILED, EXIT_NOT_FOUND, add_output, emit, version
from torpor.cli.rollout import add_parsers, finite_float, watch
from torpor.cli.secret import add_parsers as add_secret_parsers
from torpor.cli.ui import add_parser as add_ui_parser
from torpor.model import format_traffic

DEFAULT_API = "http://127.0.0.1:8081"
DEFAULT_GATEWAY = "http://127.0.0.1:8080"


class CliError(Exception):
    def __init__(self, msg: str, code: int = EXIT_FAILED) -> None:
        super().__init__(msg)
        self.code = code


def die(msg: str, code: int = EXIT_FAILED) -> NoReturn:
    print(f"torpor: {msg}", file=sys.stderr)
    sys.exit(code)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def api_token(api_url: str, state_dir: Path) -> tuple[str | None, str]:
    """(token to send, a hint for a 401 saying where it was looked for): ``TORPOR_TOKEN``,
    else ``STATE_DIR/token``, which goes only to an API on loopback (it is this machine's)."""
    path = token_path(state_dir)
    if os.environ.get("TORPOR_TOKEN"):
        return client_token(state_dir), "the API refused TORPOR_TOKEN"
    if (httpx.URL(api_url).host or "").strip("[]") not in LOOPBACK_HOSTS:
        return (
            None,
            f"set TORPOR_TOKEN for an API beyond loopback ({path} is sent only to an API on loopback)",
        )
    token = client_token(state_dir)
    if token is None:
        return None, (
            f"TORPOR_TOKEN is unset and {path} is missing or unreadable; set TORPOR_TOKEN, or give "
            "--state-dir / TORPOR_STATE_DIR as `torpor up` had it"
        )
    return token, (
        f"the API refused the token in {path}; set TORPOR_TOKEN, or give --state-dir / "
        "TORPOR_STATE_DIR as `torpor up` had it"
    )


class Api:
    def __init__(self, url: str, token: str | None, token_hint: str = "") -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.token_hint = token_hint
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=60.0)

    def failure(self, r: httpx.Response) -> CliError:
        """The one-line error for a 4xx/5xx answer (with where the token was looked for on 401)."""
        try:
            body = r.json()
            msg = body.get("detail") or body.get("error")
        except ValueError:
            msg = r.text[:200]
        if r.status_code == 401 and self.token_hint:
            msg = f"{msg}; {self.token_hint}"
        return CliError(
            f"{msg} (HTTP {r.status_code})", EXIT_NOT_FOUND if r.status_code == 404 else EXIT_FAILED
        )

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.client.request(method, path, **kw)
        except httpx.ConnectError as e:
            raise CliError(
                f"cannot reach the API at {self.url} ({e}); is `torpor up` running?"
            ) from e
        except httpx.HTTPError as e:
            raise CliError(f"API call {method} {path} failed: {e}") from e
        if r.status_code >= 400:
            raise self.failure(r)
        ctype = r.headers.get("content-type", "")
        return r.json() if ctype.startswith("application/json") else r.text


def pack(folder: Path, warn: Callable[[str], None] | None = None) -> bytes:
    """The folder as a tar.gz of its regular files and folders (what the API accepts).

    Symbolic links and special files (FIFOs, sockets, devices) are left out, each with a
    warning through ``warn``: the platform refuses them, and shipping a link's target
    instead could upload files from outside the folder. What
    ``torpor.archive.skipped_path`` names (tool caches, local environments, ``*.pyc``) is
    left out silently."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if skipped_path(rel):
                continue
            if path.is_symlink():
                if warn:
                    warn(
                        f"skipping symlink {rel} -> {os.readlink(path)}: the platform accepts regular "
                        "files and folders only (copy the target into the folder to ship it)"
                    )
                continue
            if not (path.is_file() or path.is_dir()):
                if warn:
                    warn(f"skipping {rel}: not a regular file or folder")
                continue
            tar.add(path, arcname=str(rel), recursive=False)
    return buf.getvalue()


def _ago(t: float) -> str:
    s = max(0, int(time.time() - t))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


# -- commands ---------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    from torpor.up import ALL, UpConfig, UpError, read_token, run_up

    component = args.cmd if args.cmd in ALL else None
    try:
        given = read_token(getattr(args, "token_file", None)) if args.cmd in ("up", "api") else None
    except UpError as e:
        die(f"{args.cmd}: {e}", 2)
    cfg = UpConfig(redis=args.redis, state_dir=_state_dir(args), log_level=args.log_level)
    if given:
        cfg.token, cfg.token_source = given
    for key in (
        "driver",
        "host",
        "port",
        "api_host",
        "api_port",
        "domain",
        "max_replicas",
        "base_image",
        "keep_revisions",
        "pause_idle",
        "trusted_proxies",
        "graceful_timeout",
        "head_timeout",
        "body_timeout",
        "write_timeout",
        "max_connections",
        "max_buffered",
        "namespace",
        "lease_ttl",
        "health_port",
        "health_host",
        "public_url",
    ):
        if hasattr(args, key):
            setattr(cfg, key, getattr(args, key))
    for key in ("api_allowed_hosts", "api_allowed_origins"):
        if getattr(args, key, None) is not None:
            setattr(cfg, key, tuple(x.strip() for x in getattr(args, key).split(",") if x.strip()))
    if hasattr(args, "max_upload"):
        cfg.limits = upload_limits(args)
    return run_up(cfg, frozenset({component}) if component else ALL)


def _state_dir(args: argparse.Namespace) -> Path:
    """``--state-dir`` (after or before the command), else TORPOR_STATE_DIR, else the default."""
    given = getattr(args, "state_dir", None) or getattr(args, "global_state_dir", None)
    return Path(given) if given else default_state_dir()


def cmd_deploy(api: Api, args: argparse.Namespace) -> int:
    from torpor.spec import SpecError, load_spec

    folder = Path(args.dir)
    if folder.is_file():  # a Knative service.yaml or an OpenFaaS stack.yml
        from torpor.cli.imports import deploy_file

        return deploy_file(api, folder, args)
    if args.filter:
        die("deploy: --filter picks a function of an OpenFaaS stack file; give the file")
    try:
        spec = load_spec(folder)
    except SpecError as e:
        die(f"deploy: {e}")
    params = deploy_params(args)
    body = pack(folder, warn=lambda msg: print(f"torpor: deploy: {msg}", file=sys.stderr))
    return upload(api, spec.name, body, params, args)[1]


def deploy_params(args: argparse.Namespace) -> dict[str, str]:
    params: dict[str, str] = {}
    if args.canary is not None:
        params["canary"] = str(args.canary)
    if args.tag:
        params["tag"] = args.tag
    if args.no_traffic:
        params["no_traffic"] = "1"
    return params


def upload(
    api: Api,
    name: str,
    body: bytes,
    params: dict[str, str],
    args: argparse.Namespace,
    quiet_url: bool = False,
) -> tuple[str, int]:
    """POST the packed function, follow the new revision (one line per phase; see
    torpor.cli.deploy) and print its URL; -> (revision, exit code). Exits when it fails."""
    out = api.call(
        "POST",
        "/v1/functions",
        params=params,
        content=body,
        headers={"content-type": "application/gzip"},
    )
    rev = out["revision"]
    code, fn = follow_deploy(
        api,
        name,
        rev,
        len(body),
        wait=args.wait,
        verbose=getattr(args, "verbose", False),
        quiet=getattr(args, "quiet", False),
    )
    if fn is None:
        sys.exit(code)
    if not quiet_url:
        print(fn["url"])
    if args.canary is not None and not args.no_watch:
        return rev, watch(api, name, to=rev)
    return rev, 0


def cmd_invoke(args: argparse.Namespace) -> int:
    gateway = (args.gateway or os.environ.get("TORPOR_GATEWAY") or DEFAULT_GATEWAY).rstrip("/")
    domain = os.environ.get("TORPOR_DOMAIN", "torpor.localhost")
    host = f"{args.tag}-{args.name}.{domain}" if args.tag else f"{args.name}.{domain}"
    method = args.X or ("POST" if args.d is not None else "GET")
    data = args.d.encode() if args.d is not None else None
    if args.d is not None and args.d.startswith("@"):
        data = Path(args.d[1:]).read_bytes()
    path = args.path if args.path.startswith("/") else "/" + args.path
    if args.async_:
        return invoke_async(gateway, args, data, path)
    if args.ws:
        from torpor.cli import wsclient

        return wsclient.main(gateway, host, path, args.timeout)
    try:
        with (
            httpx.Client(timeout=args.timeout) as c,
            c.stream(method, gateway + path, content=data, headers={"Host": host}) as r,
        ):
            if args.verbose:
                print(f"HTTP {r.status_code}", file=sys.stderr)
                for k, v in r.headers.items():
                    print(f"{k}: {v}", file=sys.stderr)
            for chunk in r.iter_bytes():  # a streamed response is printed as it comes
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
    except httpx.HTTPError as e:
        die(f"invoke: {e}")
    if r.status_code >= 400:
        die(f"invoke: HTTP {r.status_code}")
    return 0


def cmd_ls(api: Api, args: argparse.Namespace) -> int:
    fns = api.call("GET", "/v1/functions")["functions"]
    if emit(args, fns):
        return 0
    print(f"{'NAME':<24} {'LATEST':<20} {'STATUS':<10} {'READY':>5}  TRAFFIC")
    for f in fns:
        traffic = format_traffic(f["traffic"], skip_zero=True, tags=False)
        print(
            f"{f['name']:<24} {f['latest'] or '-':<20} {f['status'] or '-':<10} {f['replicas']:>5}  {traffic}"
        )
    print(_leader_line(api))
    return 0


def _leader_line(api: Api) -> str:
    """One line naming the acting controller (or saying there is none), for ls/describe."""
    try:
        st = api.call("GET", "/v1/status")
    except CliError:
        return "Controller: unknown (this API has no /v1/status)"
    lead = st.get("leader")
    if not lead:
        return "Controller: none leads right now: nothing is started or stopped until one does"
    standby = sum(1 for c in st.get("controllers", []) if c.get("id") != lead["id"])
    held = _ago(lead["since"]) if lead.get("since") else "?"
    return f"Controller: {lead['id']} leads (token {lead['token']}, for {held}); {standby} standby"


def cmd_status(api: Api, args: argparse.Namespace) -> int:
    st = api.call("GET", "/v1/status")
    if emit(args, st):
        return 0
    print(f"Torpor {st['version']}  store {st['store']}  installation {st['instance']}")
    lead = st.get("leader")
    if lead:
        held = _ago(lead["since"]) if lead.get("since") else "?"
        print(
            f"Leader:  {lead['id']}  host {lead.get('host') or '?'}  pid {lead.get('pid') or '?'}  "
            f"token {lead['token']}  for {held}  lease expires in {lead['lease_expires_in']:.1f}s"
        )
    else:
        print("Leader:  none (no controller holds the lease: nothing is started or stopped)")
    print(f"\n{'KIND':<11} {'ID':<40} {'ROLE':<8} {'HOST':<20} {'PID':>7}  {'HEARTBEAT':>9}")
    for c in st["controllers"]:
        print(
            f"{'controller':<11} {c['id'][:40]:<40} {c.get('role', '?'):<8} {str(c.get('host', '?'))[:20]:<20} "
            f"{c.get('pid', '?'):>7}  {c['age']:>8.1f}s"
        )
    for g in st["gateways"]:
        print(
            f"{'gateway':<11} {g['id'][:40]:<40} {'-':<8} {str(g.get('host', '?'))[:20]:<20} "
            f"{g.get('pid', '?'):>7}  {g['age']:>8.1f}s"
        )
    counts = st["counts"]

    def pairs(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"

    print(
        f"\nFunctions: {counts['functions']}   revisions: {pairs(counts['revisions'])}   "
        f"replicas: {pairs(counts['replicas'])}"
    )
    return 0


def cmd_describe(api: Api, args: argparse.Namespace) -> int:
    fn = api.call("GET", f"/v1/functions/{args.name}", params={"events": 15})
    if emit(args, fn):
        return 0
    print(f"Name:     {fn['name']}\nURL:      {fn['url']}\n          {fn['path_url']}")
    sc = fn.get("scale") or {}

    def num(v: Any) -> str:
        return (
            "?" if v is None else f"{v:g}"
        )  # null: a stored number that is not finite (see Problems)

    if sc:
        print(
            f"Scale:    min {sc['min']}  max {sc['max']}  target {num(sc['target'])}  concurrency {sc['concurrency']}"
            f"  idle {num(sc['idle'])}s  window {num(sc['window'])}s"
        )
    latest = fn["revisions"][-1]["spec"] if fn["revisions"] else {}
    if latest.get("secrets"):  # names only: the API never returns a value
        print(
            "Secrets:  "
            + "  ".join(f"{env} <- {name}" for env, name in sorted(latest["secrets"].items()))
        )
    for problem in fn.get("problems", []):
        print(f"Problem:  {problem}")
    print(_leader_line(api))
    if fn.get("rollout"):
        ro = fn["rollout"]
        print(
            f"Rollout:  {ro['stable']} -> {ro['to']}  step {ro['step'] + 1}/{len(ro['steps'])} "
            f"({ro['steps'][min(ro['step'], len(ro['steps']) - 1)]}%)  {ro['state']}  {ro['reason']}"
        )
    print("\nRevisions:")
    for r in reversed(fn["revisions"]):
        tags = f" tags={','.join(r['tags'])}" if r["tags"] else ""
        reason = f"  {r['reason'].splitlines()[0][:200]}" if r["reason"] else ""
        reps = [x for x in fn["replicas"] if x["revision"] == r["name"]]
        ready = sum(1 for x in reps if x["state"] == "ready")
        print(
            f"  {r['name']:<20} {r['status']:<9} {r['traffic']:>3}%  age {_ago(r['created']):>4}"
            f"  replicas {ready}/{len(reps)} ready{tags}{reason}"
        )
    print("\nReplicas:")
    if not fn["replicas"]:
        print("  (none: scaled to zero)")
    for r in fn["replicas"]:
        print(f"  {r['name']:<28} {r['revision']:<20} {r['state']:<9} {r['endpoint'] or '-'}")
    print("\nEvents:")
    for e in fn.get("events", []):
        first = e["message"].splitlines()[0][:140] if e["message"] else ""
        print(f"  {time.strftime('%H:%M:%S', time.localtime(e['time']))} {e['kind']:<8} {first}")
    return 0


def cmd_delete(api: Api, args: argparse.Namespace) -> int:
    api.call("DELETE", f"/v1/functions/{args.name}")
    print(f"deleted {args.name}", file=sys.stderr)
    return 0


def cmd_logs(api: Api, args: argparse.Namespace) -> int:
    if args.build is not None:
        params = {"revision": args.build} if args.build else {}
        sys.stdout.write(api.call("GET", f"/v1/functions/{args.name}/build-log", params=params))
        return 0
    params = {"follow": "1" if args.follow else "0", "tail": str(args.tail)}
    try:
        with api.client.stream(
            "GET", f"/v1/functions/{args.name}/logs", params=params, timeout=None
        ) as r:
            if r.status_code >= 400:
                r.read()
                raise api.failure(r)
            for chunk in r.iter_text():
                sys.stdout.write(chunk)
                sys.stdout.flush()
    except httpx.ConnectError as e:
        raise CliError(f"cannot reach the API at {api.url} ({e})") from e
    except KeyboardInterrupt:
        pass
    return 0


def cmd_traffic(api: Api, args: argparse.Namespace) -> int:
    tags: dict[str, str] = {}
    for t in args.tag or []:
        rev, _, tag = t.partition("=")
        if not tag:
            die(f"traffic: --tag {t!r}: expected REV=TAG")
        tags[rev] = tag
    targets = []
    for spec in args.split:
        rev, _, pct = spec.partition("=")
        if not pct.isdigit():
            die(f"traffic: {spec!r}: expected REV=PERCENT")
        targets.append({"revision": rev, "percent": int(pct), "tag": tags.pop(rev, None)})
    targets += [{"revision": rev, "percent": 0, "tag": tag} for rev, tag in tags.items()]
    out = api.call("PUT", f"/v1/functions/{args.name}/traffic", json={"traffic": targets})
    print(format_traffic(out["traffic"]))
    return 0


def cmd_scale(api: Api, args: argparse.Namespace) -> int:
    body = {
        k: getattr(args, k)
        for k in ("min", "max", "replicas", "target", "concurrency")
        if getattr(args, k) is not None
    }
    if not body:
        die("scale: give at least one of --min --max --replicas --target --concurrency")
    out = api.call("PATCH", f"/v1/functions/{args.name}/scale", json=body)
    sc = out.get("scale") or {}
    print(
        f"{args.name}: min {sc.get('min')} max {sc.get('max')} target {sc.get('target')} "
        f"concurrency {sc.get('concurrency')}"
    )
    return 0


def cmd_top(api: Api, args: argparse.Namespace) -> int:
    gateway = (args.gateway or os.environ.get("TORPOR_GATEWAY") or DEFAULT_GATEWAY).rstrip("/")
    from torpor.cli.top import run_top

    return run_top(api, gateway, args.interval, args.once, args.output)


def cmd_images(args: argparse.Namespace) -> int:
    if args.images_cmd == "build-runtime":
        from torpor.drivers.runtimeimage import RuntimeImageError, build_runtime_image

        try:
            tag = build_runtime_image(
                tag=args.tag, base=args.base, progress=lambda line: print(line, file=sys.stderr)
            )
        except RuntimeImageError as e:
            die(f"images build-runtime: {e}")
        print(tag)
        return 0
    from torpor.drivers.baseimage import DEFAULT_BASE_IMAGE, build_base_image

    name = args.name or os.environ.get("TORPOR_BASE_IMAGE") or DEFAULT_BASE_IMAGE
    build_base_image(name=name, force=args.force)
    print(name)
    return 0


# -- parser -----------------------------------------------------------------------------
def _size_arg(text: str) -> int:
    from torpor.spec import SpecError, parse_size

    try:
        size = parse_size(text, "size")
    except SpecError:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 64Mi, 1Gi or 512Ki, got {text[:40]!r}"
        ) from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a size of at least 1 byte, got {text[:40]!r}")
    return size


def _count_arg(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text[:40]!r}")
    return int(text)


def upload_limits(args: argparse.Namespace) -> Any:
    """The ``ArchiveLimits`` of ``--max-upload/--max-unpacked/--max-members/--max-depth``."""
    from torpor.archive import ArchiveLimits

    return ArchiveLimits(
        max_upload=args.max_upload,
        max_unpacked=args.max_unpacked,
        max_members=args.max_members,
        max_depth=args.max_depth,
    )


def add_upload_limits(sp: argparse.ArgumentParser) -> None:
    """The caps on a deploy's upload (``torpor.archive.ArchiveLimits``), env defaults."""
    env = os.environ.get
    sp.add_argument(
        "--max-upload",
        type=_size_arg,
        default=env("TORPOR_MAX_UPLOAD", "64Mi"),
        metavar="SIZE",
        help="largest deploy upload, compressed (env TORPOR_MAX_UPLOAD; default 64Mi)",
    )
    sp.add_argument(
        "--max-unpacked",
        type=_size_arg,
        default=env("TORPOR_MAX_UNPACKED", "256Mi"),
        metavar="SIZE",
        help="largest function folder once unpacked (env TORPOR_MAX_UNPACKED; default 256Mi)",
    )
    sp.add_argument(
        "--max-members",
        type=_count_arg,
        default=env("TORPOR_MAX_MEMBERS", "10000"),
        metavar="N",
        help="most files and folders in an upload (env TORPOR_MAX_MEMBERS; default 10000)",
    )
    sp.add_argument(
        "--max-depth",
        type=_count_arg,
        default=env("TORPOR_MAX_DEPTH", "32"),
        metavar="N",
        help="deepest path in an upload, in folders (env TORPOR_MAX_DEPTH; default 32)",
    )


def _gateway_limits(sp: argparse.ArgumentParser) -> None:
    """The gateway's bounds on what one client can hold (`torpor up` and `torpor gateway`)."""
    env = os.environ.get
    g = sp.add_argument_group("gateway limits (each also from the environment variable named)")
    g.add_argument(
        "--trusted-proxies",
        default=env("TORPOR_TRUSTED_PROXIES", ""),
        metavar="CIDR,...",
        help="peers whose Forwarded/X-Forwarded-* headers are appended to rather than replaced "
        "(TORPOR_TRUSTED_PROXIES; default: none, not even loopback)",
    )
    g.add_argument(
        "--graceful-timeout",
        type=float,
        default=env("TORPOR_GRACEFUL_TIMEOUT", "30"),
        metavar="SECONDS",
        help="on SIGTERM, in-flight requests get this long, then are cut off "
        "(TORPOR_GRACEFUL_TIMEOUT; default 30)",
    )
    g.add_argument(
        "--head-timeout",
        type=float,
        default=env("TORPOR_HEAD_TIMEOUT", "10"),
        metavar="SECONDS",
        help="a request head must arrive whole within this, else 408 (TORPOR_HEAD_TIMEOUT; default 10)",
    )
    g.add_argument(
        "--body-timeout",
        type=float,
        default=env("TORPOR_BODY_TIMEOUT", "30"),
        metavar="SECONDS",
        help="silence allowed while a request body is coming, else 408 (TORPOR_BODY_TIMEOUT; "
        "default 30)",
    )
    g.add_argument(
        "--write-timeout",
        type=float,
        default=env("TORPOR_WRITE_TIMEOUT", "30"),
        metavar="SECONDS",
        help="a client that reads nothing of its response for this long is disconnected "
        "(TORPOR_WRITE_TIMEOUT; default 30)",
    )
    g.add_argument(
        "--max-connections",
        type=int,
        default=env("TORPOR_MAX_CONNECTIONS", "10000"),
        metavar="N",
        help="open client connections; beyond: 503 + Retry-After (TORPOR_MAX_CONNECTIONS; "
        "default 10000)",
    )
    g.add_argument(
        "--max-buffered",
        type=_size_arg,
        default=env("TORPOR_MAX_BUFFERED", "256Mi"),
        metavar="SIZE",
        help="request body bytes the gateway holds at once, all requests; beyond: 503 + "
        "Retry-After (TORPOR_MAX_BUFFERED; default 256Mi)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``torpor`` argument parser: global flags, then one sub-command each, in the
    order ``torpor --help`` lists them. Registers the API commands of the sub-modules in
    ``API_COMMANDS``."""
    p = argparse.ArgumentParser(
        prog="torpor",
        description="Scale-to-zero functions.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"torpor {version()}")
    p.add_argument(
        "--api", default=os.environ.get("TORPOR_API", DEFAULT_API), help="API URL (env TORPOR_API)"
    )
    p.add_argument(
        "--state-dir",
        dest="global_state_dir",
        metavar="DIR",
        help="state directory of `torpor up`, whose token file the CLI sends when TORPOR_TOKEN is "
        "unset (env TORPOR_STATE_DIR; default ~/.local/share/torpor)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_server_commands(sub)
    _add_deploy(sub)
    _add_invoke(sub)
    _add_read_commands(sub)
    _add_change_commands(sub)
    _add_images(sub)
    API_COMMANDS.update(add_parsers(sub))
    API_COMMANDS.update(add_secret_parsers(sub))
    API_COMMANDS.update(add_call_parsers(sub))
    add_new_parser(sub)
    API_COMMANDS.update(add_ui_parser(sub))
    cp = sub.add_parser("completion", help="print a shell completion script: bash, zsh or fish")
    cp.add_argument("shell", choices=SHELLS)
    return p


def _add_server_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``up``, ``gateway``, ``controller``, ``api``: the platform's processes, each with
    the flags of the parts it runs."""
    up = sub.add_parser("up", help="run the platform in the foreground")
    gw = sub.add_parser("gateway", help="run one gateway (distributed mode: needs --redis)")
    ctl = sub.add_parser(
        "controller", help="run the controller and autoscaler (distributed mode: needs --redis)"
    )
    ap = sub.add_parser("api", help="run the control API (distributed mode: needs --redis)")
    for sp in (up, gw, ctl, ap):
        _add_store_flags(sp)
    for sp in (up, ctl):
        _add_controller_flags(sp)
    for sp in (up, gw, ap):
        sp.add_argument("--host", default="127.0.0.1", help="gateway bind address")
        sp.add_argument("--port", type=int, default=8080, help="gateway port")
    for sp in (up, gw):
        _gateway_limits(sp)
    for sp in (up, ap):
        _add_api_flags(sp)
    add_upload_limits(ctl)  # the same caps apply when a controller unpacks a source archive
    ap.add_argument(
        "--max-replicas", type=int, default=100, help="platform cap on replicas per revision"
    )
    ctl.add_argument(
        "--health-port",
        type=int,
        default=os.environ.get("TORPOR_HEALTH_PORT") or None,
        metavar="N",
        help="serve GET /healthz and /readyz (probes) on this port (env TORPOR_HEALTH_PORT)",
    )
    ctl.add_argument(
        "--health-host",
        default=os.environ.get("TORPOR_HEALTH_HOST", "0.0.0.0"),
        help="address of the health endpoint (env TORPOR_HEALTH_HOST; default 0.0.0.0)",
    )


def _add_store_flags(sp: argparse.ArgumentParser) -> None:
    """Where state lives, logging and the domain: every platform process has them."""
    sp.add_argument(
        "--redis", default=os.environ.get("TORPOR_REDIS"), help="Redis URL (shared store)"
    )
    sp.add_argument(
        "--state-dir",
        help="where state persists (env TORPOR_STATE_DIR; default ~/.local/share/torpor)",
    )
    sp.add_argument("--log-level", default="warning")
    sp.add_argument("--domain", default=os.environ.get("TORPOR_DOMAIN", "torpor.localhost"))


def _add_controller_flags(sp: argparse.ArgumentParser) -> None:
    """The driver, caps, retention, pausing and the lease: what a controller runs with."""
    sp.add_argument(
        "--driver",
        default=os.environ.get("TORPOR_DRIVER") or "auto",
        choices=["auto", "process", "docker", "kubernetes"],
        help="where replicas run (env TORPOR_DRIVER; default auto: docker if an engine answers)",
    )
    sp.add_argument(
        "--namespace",
        default=os.environ.get("TORPOR_K8S_NAMESPACE") or None,
        help="kubernetes driver: namespace of the Pods (env TORPOR_K8S_NAMESPACE; default: the "
        "controller's own namespace in a cluster, else the kubeconfig's, else default)",
    )
    sp.add_argument(
        "--max-replicas", type=int, default=100, help="platform cap on replicas per revision"
    )
    sp.add_argument(
        "--keep-revisions",
        type=int,
        default=5,
        help="retired revisions kept before garbage collection",
    )
    sp.add_argument("--base-image", default=os.environ.get("TORPOR_BASE_IMAGE"))
    sp.add_argument(
        "--pause-idle",
        type=finite_float,
        default=os.environ.get("TORPOR_PAUSE_IDLE", "0"),
        metavar="SECONDS",
        help="keep a replica scaled to zero paused (no CPU, memory kept) this "
        "long for a fast wake before removing it; 0 = off",
    )
    sp.add_argument(
        "--lease-ttl",
        type=finite_float,
        default=os.environ.get("TORPOR_LEASE_TTL", "5"),
        metavar="SECONDS",
        help="controller lease: only its holder acts; a standby takes over "
        "within this long of the leader's end (env TORPOR_LEASE_TTL; default 5)",
    )


def _add_api_flags(sp: argparse.ArgumentParser) -> None:
    """The API's address, token, allowed Hosts and Origins, public URL and upload caps."""
    sp.add_argument("--api-host", default="127.0.0.1")
    sp.add_argument("--api-port", type=int, default=8081)
    sp.add_argument(
        "--token-file",
        help="file holding the API bearer token (env TORPOR_TOKEN overrides; "
        "default STATE_DIR/token, generated at first start)",
    )
    sp.add_argument(
        "--api-allowed-hosts",
        metavar="NAMES",
        help="comma-separated extra Host names the API answers to, name or name:port; * = any "
        "(env TORPOR_API_ALLOWED_HOSTS)",
    )
    sp.add_argument(
        "--api-allowed-origins",
        metavar="ORIGINS",
        help="comma-separated browser Origins (scheme://host:port) allowed to call the API, "
        "with CORS; default none (env TORPOR_API_ALLOWED_ORIGINS)",
    )
    sp.add_argument(
        "--public-url",
        default=os.environ.get("TORPOR_PUBLIC_URL") or None,
        metavar="URL",
        help="where users reach the gateway, scheme://host[:port] (e.g. an Ingress for *.DOMAIN): "
        "the function URLs the API shows are built from it (env TORPOR_PUBLIC_URL; default the "
        "gateway's own address)",
    )
    add_upload_limits(sp)


def _add_deploy(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``deploy``: a folder, a Knative service.yaml or an OpenFaaS stack.yml."""
    d = sub.add_parser(
        "deploy",
        help="build, create a revision, route traffic (a folder, a Knative service.yaml "
        "or an OpenFaaS stack.yml)",
    )
    d.add_argument(
        "dir", nargs="?", default=".", help="function folder, or a Knative/OpenFaaS file"
    )
    d.add_argument("--filter", metavar="NAME", help="OpenFaaS stack: deploy only this function")
    d.add_argument("--canary", type=int, metavar="PCT")
    d.add_argument("--tag")
    d.add_argument("--no-traffic", action="store_true")
    d.add_argument(
        "--no-watch",
        action="store_true",
        help="with --canary: return once ready, leave the rollout running",
    )
    d.add_argument(
        "--wait", type=finite_float, default=600.0, help="seconds to wait for the revision"
    )
    d.add_argument("-v", "--verbose", action="store_true", help="stream the whole build log")
    d.add_argument("-q", "--quiet", action="store_true", help="print only the URL")


def _add_invoke(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``invoke``: one call through the gateway (plain, ``--async`` or ``--ws``)."""
    i = sub.add_parser("invoke", help="call a function through the gateway")
    i.add_argument("name")
    i.add_argument("-d", help="request body (@file reads a file)")
    i.add_argument("--path", default="/")
    i.add_argument("-X", help="method")
    i.add_argument("--tag")
    i.add_argument("--gateway", help="gateway URL (env TORPOR_GATEWAY)")
    i.add_argument("--timeout", type=finite_float, default=60.0)
    i.add_argument("-v", "--verbose", action="store_true")
    i.add_argument(
        "--async", dest="async_", action="store_true", help="queue the call; print its id"
    )
    i.add_argument("--callback", help="with --async: URL the result is POSTed to (X-Callback-Url)")
    i.add_argument(
        "--ws",
        action="store_true",
        help="open a WebSocket: stdin lines are sent, messages are printed",
    )


def _add_read_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``status``, ``ls``, ``describe``, ``export``, ``delete``, ``logs``."""
    stp = sub.add_parser(
        "status", help="which controller leads, standbys and gateways seen, counts"
    )
    add_output(stp)
    ls = sub.add_parser("ls", help="list functions")
    add_output(ls)
    de = sub.add_parser("describe", help="one function's revisions, traffic, replicas, events")
    de.add_argument("name")
    add_output(de)
    ex = sub.add_parser(
        "export", help="write a function as a Knative Service or an OpenFaaS stack entry"
    )
    ex.add_argument("name")
    ex.add_argument("--format", choices=["knative", "openfaas"], default="knative")
    rm = sub.add_parser("delete", help="remove a function, its revisions and replicas")
    rm.add_argument("name")
    lg = sub.add_parser("logs", help="replica logs")
    lg.add_argument("name")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("--tail", type=int, default=200)
    lg.add_argument(
        "--build",
        nargs="?",
        const="",
        metavar="REVISION",
        help="the last build log (of REVISION, default the newest build) instead of replica logs",
    )


def _add_change_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``traffic``, ``scale`` and ``top``: steering a function and watching it."""
    tr = sub.add_parser("traffic", help="set the traffic split: REV=PCT ...")
    tr.add_argument("name")
    tr.add_argument("split", nargs="+", metavar="REV=PCT")
    tr.add_argument("--tag", action="append", metavar="REV=TAG")
    sc = sub.add_parser("scale", help="change scaling without a new revision")
    sc.add_argument("name")
    sc.add_argument("--min", type=int)
    sc.add_argument("--max", type=int)
    sc.add_argument("--replicas", type=int, help="pin N replicas (0 holds the function at zero)")
    sc.add_argument("--target", type=finite_float)
    sc.add_argument("--concurrency", type=int)
    top = sub.add_parser("top", help="live table of replicas and concurrency")
    top.add_argument("--interval", type=finite_float, default=1.0)
    top.add_argument("--once", action="store_true")
    top.add_argument("--gateway")
    add_output(top)


def _add_images(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``images build-base`` and ``images build-runtime``."""
    im = sub.add_parser("images", help="images for the docker and kubernetes drivers")
    im_sub = im.add_subparsers(dest="images_cmd", required=True)
    bb = im_sub.add_parser("build-base", help="build the Python base image locally (debootstrap)")
    bb.add_argument("--name")
    bb.add_argument("--force", action="store_true")
    br = im_sub.add_parser(
        "build-runtime",
        help="build the generic runtime image of source functions on a cluster "
        "(push it to your registry; TORPOR_RUNTIME_IMAGE)",
    )
    br.add_argument("--tag", help="image tag (default torpor/runtime:VERSION)")
    br.add_argument(
        "--base",
        help="base image with python3 (default TORPOR_BASE_IMAGE or torpor/python-base:bookworm)",
    )


API_COMMANDS: dict[str, Any] = {
    "deploy": cmd_deploy,
    "ls": cmd_ls,
    "describe": cmd_describe,
    "delete": cmd_delete,
    "logs": cmd_logs,
    "traffic": cmd_traffic,
    "scale": cmd_scale,
    "top": cmd_top,
    "export": lambda api, args: cmd_export(api, args),
    "status": cmd_status,
}


def cmd_export(api: Api, args: argparse.Namespace) -> int:
    from torpor.cli.imports import export

    return export(api, args)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd in ("up", "gateway", "controller", "api"):
            sys.exit(cmd_up(args))
        if args.cmd == "invoke":
            sys.exit(cmd_invoke(args))
        if args.cmd == "images":
            sys.exit(cmd_images(args))
        if args.cmd == "new":
            sys.exit(cmd_new(args))
        if args.cmd == "completion":
            sys.stdout.write(completion_script(build_parser(), args.shell))
            sys.exit(0)
        token, hint = api_token(args.api, _state_dir(args))
        api = Api(args.api, token, hint)
        sys.exit(API_COMMANDS[args.cmd](api, args))
    except CliError as e:
        die(f"{args.cmd}: {e}", e.code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    # run the imported module, not this __main__ copy: modules that import torpor.cli.main
    # (torpor.cli.imports) must see the same CliError and Api classes
    from torpor.cli.main import main as _main

    _main()

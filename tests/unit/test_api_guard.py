"""The control API's browser guard (Host, Origin, Content-Type) and its token, in process."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route

from torpor.api.app import REQUEST_BODIES, ApiConfig, create_app
from torpor.api.guard import BodyRules, HostPolicy, media_type, split_host
from torpor.api.openapi import OPENAPI
from torpor.store.embedded import EmbeddedStore

TOKEN = "unit-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", None)),
        ("LocalHost:8081", ("localhost", "8081")),
        ("[::1]", ("[::1]", None)),
        ("[::1]:8081", ("[::1]", "8081")),
        ("::1", ("::1", None)),
        ("a.example:", ("a.example:", None)),
    ],
)
def test_split_host(value: str, expected: tuple[str, str | None]) -> None:
    assert split_host(value) == expected


LOOPBACK_OK = ["127.0.0.1", "127.0.0.1:8081", "localhost", "LOCALHOST:1", "[::1]", "[::1]:8081"]
REBINDING = [
    "evil.example",
    "evil.example:8081",
    "127.0.0.1.evil.example",
    "localhost.evil.example:8081",
    "",
    "127.0.0.1:8081@evil.example",
    "::1",
]


@pytest.mark.parametrize("host", LOOPBACK_OK)
def test_loopback_bind_answers_to_loopback_names(host: str) -> None:
    for bind in ("127.0.0.1", "localhost", "::1"):
        assert HostPolicy(bind).allows(host), (bind, host)


@pytest.mark.parametrize("host", [*REBINDING, "10.0.0.5:8081", "[fe80::1]"])
def test_loopback_bind_refuses_other_names_and_addresses(host: str) -> None:
    assert not HostPolicy("127.0.0.1").allows(host)


def test_wildcard_bind_answers_to_ip_literals_and_listed_names_only() -> None:
    p = HostPolicy("0.0.0.0", ["api.example", "other.example:9000"])
    for ok in [
        *LOOPBACK_OK,
        "10.1.2.3:8081",
        "[fe80::1]:8081",
        "api.example",
        "API.example:443",
        "other.example:9000",
    ]:
        assert p.allows(ok), ok
    for bad in [*REBINDING, "other.example", "other.example:9001", "10.1.2.3.evil.example"]:
        assert not p.allows(bad), bad
    assert "any IP address" in p.shown and "api.example" in p.shown


def test_specific_bind_answers_to_that_address() -> None:
    p = HostPolicy("10.0.0.5")
    assert p.allows("10.0.0.5:8081") and p.allows("10.0.0.5")
    assert (
        not p.allows("127.0.0.1:8081")
        and not p.allows("10.0.0.6:8081")
        and not p.allows("evil.example")
    )
    assert HostPolicy("fe80::1").allows("[fe80::1]:8081")
    assert HostPolicy("127.0.0.1", ["*"]).allows("evil.example:8081")


def test_media_type_parses_parameters() -> None:
    assert media_type("Application/JSON; Charset=utf-8") == ("application/json", ["charset"])
    assert media_type("text/plain") == ("text/plain", [])


def tarball() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in (
            ("torpor.yaml", "name: fn\nhandler: handler:handle\n"),
            ("handler.py", "def handle(request):\n    return 'hi'\n"),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def client(tmp_path: Path, **cfg: object) -> httpx.AsyncClient:
    app = create_app(EmbeddedStore(), ApiConfig(state_dir=tmp_path, token=TOKEN, **cfg))  # type: ignore[arg-type]
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8081"
    )


def test_the_app_cannot_be_built_without_a_token(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="token"):
        create_app(EmbeddedStore(), ApiConfig(state_dir=tmp_path, token=""))


@pytest.mark.parametrize(
    "ctype",
    [
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json",
        "application/gzip; x=1",
        None,
    ],
)
async def test_deploy_refuses_body_types_it_does_not_declare(
    tmp_path: Path, ctype: str | None
) -> None:
    async with client(tmp_path) as c:
        headers = {**AUTH, **({"Content-Type": ctype} if ctype else {})}
        r = await c.post("/v1/functions", content=tarball(), headers=headers)
        assert r.status_code == 415, r.text
        err = r.json()
        assert err["error"] == "unsupported media type" and err["field"] == "content-type"
        assert "application/gzip" in err["detail"] and "POST /v1/functions" in err["detail"]
        assert (await c.get("/v1/functions", headers=AUTH)).json()["functions"] == []


@pytest.mark.parametrize(
    "ctype",
    [
        "application/gzip",
        "application/x-gzip",
        "application/x-tar",
        "application/octet-stream",
        "APPLICATION/GZIP",
    ],
)
async def test_deploy_accepts_its_declared_types(tmp_path: Path, ctype: str) -> None:
    async with client(tmp_path) as c:
        r = await c.post(
            "/v1/functions", content=tarball(), headers={**AUTH, "Content-Type": ctype}
        )
        assert r.status_code == 201, r.text


async def test_json_routes_take_json_only_and_bodyless_posts_need_no_type(tmp_path: Path) -> None:
    async with client(tmp_path) as c:
        for ctype in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/json; foo=bar",
        ):
            r = await c.patch(
                "/v1/functions/fn/scale",
                content=b'{"max": 2}',
                headers={**AUTH, "Content-Type": ctype},
            )
            assert r.status_code == 415, (ctype, r.text)
        r = await c.patch(
            "/v1/functions/fn/scale",
            content=b'{"max": 2}',
            headers={**AUTH, "Content-Type": "application/json; charset=utf-8"},
        )
        assert r.status_code == 404  # past the guard: no such function
        assert (await c.post("/v1/functions/fn/rollback", headers=AUTH)).status_code == 404
        r = await c.post(
            "/v1/functions/fn/rollback", headers={**AUTH, "Content-Type": "text/plain"}
        )
        assert r.status_code == 415
        r = await c.request(
            "DELETE",
            "/v1/functions/fn",
            content=b"x",
            headers={**AUTH, "Content-Type": "text/plain"},
        )
        assert r.status_code == 415 and "no request body" in r.json()["detail"]
        assert (await c.delete("/v1/functions/fn", headers=AUTH)).status_code == 404


async def test_foreign_host_origin_and_fetch_site_are_refused(tmp_path: Path) -> None:
    async with client(tmp_path) as c:
        r = await c.get("/v1/functions", headers={**AUTH, "Host": "evil.example:8081"})
        assert (
            r.status_code == 421
            and r.json()["field"] == "host"
            and "evil.example" in r.json()["detail"]
        )
        assert (await c.get("/healthz", headers={"Host": "evil.example"})).status_code == 421
        for origin in ("http://evil.example", "null", "http://127.0.0.1:8081"):
            r = await c.get("/v1/functions", headers={**AUTH, "Origin": origin})
            assert r.status_code == 403 and r.json()["field"] == "origin", origin
            assert "access-control-allow-origin" not in r.headers
        for site in ("cross-site", "same-site"):
            r = await c.get("/v1/functions", headers={**AUTH, "Sec-Fetch-Site": site})
            assert r.status_code == 403 and r.json()["field"] == "sec-fetch-site"
        for site in ("none", "same-origin"):
            assert (
                await c.get("/v1/functions", headers={**AUTH, "Sec-Fetch-Site": site})
            ).status_code == 200
        r = await c.options(
            "/v1/functions",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers


async def test_token_is_required_but_for_health(tmp_path: Path) -> None:
    async with client(tmp_path) as c:
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/readyz")).status_code == 200
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-wrong-token"},
            {"Authorization": TOKEN},
        ):
            for method, path in (
                ("GET", "/v1/functions"),
                ("GET", "/v1/openapi.json"),
                ("GET", "/metrics"),
                ("DELETE", "/v1/functions/fn"),
            ):
                r = await c.request(method, path, headers=headers)
                assert r.status_code == 401 and TOKEN not in r.text, (method, path, headers)


async def test_listed_origin_and_host_get_through_with_cors(tmp_path: Path) -> None:
    async with client(
        tmp_path, allowed_origins=("http://localhost:3000",), allowed_hosts=("torpor.lan",)
    ) as c:
        r = await c.get(
            "/v1/functions",
            headers={
                **AUTH,
                "Origin": "http://localhost:3000",
                "Sec-Fetch-Site": "same-site",
                "Host": "torpor.lan:8081",
            },
        )
        assert (
            r.status_code == 200
            and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        )
        r = await c.options(
            "/v1/functions",
            headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"},
        )
        assert r.status_code == 204 and "authorization" in r.headers["access-control-allow-headers"]
        r = await c.post(
            "/v1/functions",
            content=b"x",
            headers={**AUTH, "Origin": "http://localhost:3000", "Content-Type": "text/plain"},
        )
        assert r.status_code == 415  # an allowed origin still sends only declared types


def test_every_state_changing_route_declares_its_body_types() -> None:
    async def h(request: object) -> None: ...

    rules = BodyRules({("POST", "/a"): ("application/json",)})
    rules.check_covers([Route("/a", h, methods=["POST", "GET"])])
    with pytest.raises(ValueError, match="PUT /b"):
        rules.check_covers([Route("/a", h, methods=["POST"]), Route("/b", h, methods=["PUT"])])


def test_openapi_documents_the_declared_body_types() -> None:
    documented = {}
    for path, item in OPENAPI["paths"].items():
        for method, op in item.items():
            if method in ("get", "parameters"):
                continue
            documented[(method.upper(), path)] = tuple(op.get("requestBody", {}).get("content", {}))
            assert "415" in op["responses"], (method, path)
    assert documented == REQUEST_BODIES

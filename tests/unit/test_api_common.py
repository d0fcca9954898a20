"""The API's shared pieces (torpor.api.common) as every route sees them: handlers hold no
state of their own (each app serves its own store), one 404 for a function name on every
route (a malformed name never reaches the store), and one JSON body rule (strict, except
where the body is optional)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from torpor.api.app import ApiConfig, create_app
from torpor.model import Function, Revision, Spec, TrafficTarget
from torpor.store.embedded import EmbeddedStore

TOKEN = "unit-test-token-0123456789"


class CountingStore(EmbeddedStore):
    """The embedded store, counting the names it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    async def get_function(self, name: str) -> Function | None:
        self.asked.append(name)
        return await super().get_function(name)


async def _store_with(name: str) -> CountingStore:
    store = CountingStore()

    def create(cur: Function | None) -> Function:
        rev = Revision(name=f"{name}-00001", function=name, number=1, spec=Spec(name=name))
        rev.status = "ready"
        return Function(
            name=name, revisions=[rev], traffic=[TrafficTarget(rev.name, 100)], next_number=2
        )

    await store.update_function(name, create)
    return store


def _body(method: str) -> dict[str, object]:
    """A JSON object for the routes that take a body (a DELETE takes none)."""
    if method == "DELETE":
        return {}
    return {"content": b"{}", "headers": {"Content-Type": "application/json"}}


def _client(store: EmbeddedStore, tmp_path: Path) -> httpx.AsyncClient:
    app = create_app(store, ApiConfig(state_dir=tmp_path, token=TOKEN))
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://127.0.0.1",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )


async def test_two_apps_serve_their_own_store(tmp_path: Path) -> None:
    a, b = await _store_with("alpha"), await _store_with("beta")
    async with _client(a, tmp_path / "a") as ca, _client(b, tmp_path / "b") as cb:
        assert [f["name"] for f in (await ca.get("/v1/functions")).json()["functions"]] == ["alpha"]
        assert [f["name"] for f in (await cb.get("/v1/functions")).json()["functions"]] == ["beta"]
        assert (await ca.get("/v1/functions/beta")).status_code == 404
        assert (await cb.get("/v1/functions/beta/rollout")).status_code == 200
        assert (await ca.get("/v1/secrets")).json() == {"secrets": []}


FUNCTION_ROUTES = [
    ("GET", "/v1/functions/{name}"),
    ("DELETE", "/v1/functions/{name}"),
    ("GET", "/v1/functions/{name}/revisions"),
    ("GET", "/v1/functions/{name}/revisions/x-00001"),
    ("GET", "/v1/functions/{name}/events"),
    ("GET", "/v1/functions/{name}/logs"),
    ("PUT", "/v1/functions/{name}/traffic"),
    ("PATCH", "/v1/functions/{name}/scale"),
    ("GET", "/v1/functions/{name}/rollout"),
    ("POST", "/v1/functions/{name}/rollout"),
    ("POST", "/v1/functions/{name}/rollout/pause"),
    ("POST", "/v1/functions/{name}/rollback"),
]


@pytest.mark.parametrize(("method", "path"), FUNCTION_ROUTES)
@pytest.mark.parametrize("name", ["Bad_Name", "a" * 64, "-x", "x.y"])
async def test_a_malformed_name_is_not_found_and_never_reaches_the_store(
    tmp_path: Path, method: str, path: str, name: str
) -> None:
    store = await _store_with("alpha")
    async with _client(store, tmp_path) as c:
        r = await c.request(method, path.format(name=name), **_body(method))  # type: ignore[arg-type]
    assert r.status_code == 404
    assert r.json() == {
        "error": "function not found",
        "detail": f"no function named {name[:63]!r}",
    }
    assert name not in store.asked


@pytest.mark.parametrize(("method", "path"), FUNCTION_ROUTES)
async def test_an_unknown_function_is_not_found_on_every_route(
    tmp_path: Path, method: str, path: str
) -> None:
    store = await _store_with("alpha")
    async with _client(store, tmp_path) as c:
        r = await c.request(method, path.format(name="ghost"), **_body(method))  # type: ignore[arg-type]
    assert (r.status_code, r.json()) == (
        404,
        {"error": "function not found", "detail": "no function named 'ghost'"},
    )


@pytest.mark.parametrize(
    ("method", "path", "empty_status", "empty_error"),
    [
        # a body is required: an empty one is not JSON
        ("PUT", "/v1/functions/alpha/traffic", 400, "bad request"),
        ("PATCH", "/v1/functions/alpha/scale", 400, "bad request"),
        # the body is optional: an empty one is {} (then the route's own answer)
        ("POST", "/v1/functions/alpha/rollout", 400, "invalid rollout"),
        ("POST", "/v1/functions/alpha/rollout/pause", 409, "rollout refused"),
        ("POST", "/v1/functions/alpha/rollback", 409, "rollout refused"),
    ],
)
async def test_json_bodies_one_rule(
    tmp_path: Path, method: str, path: str, empty_status: int, empty_error: str
) -> None:
    store = await _store_with("alpha")
    json_type = {"Content-Type": "application/json"}
    async with _client(store, tmp_path) as c:
        r = await c.request(method, path)
        assert (r.status_code, r.json()["error"]) == (empty_status, empty_error)
        for bad, detail in [
            (b"[1]", "body must be a JSON object"),
            (b'"text"', "body must be a JSON object"),
        ]:
            r = await c.request(method, path, content=bad, headers=json_type)
            assert (r.status_code, r.json()) == (
                400,
                {"error": "bad request", "detail": detail},
            )
        r = await c.request(method, path, content=b"{nope", headers=json_type)
        assert r.status_code == 400 and r.json()["error"] == "bad request"
        assert r.json()["detail"].startswith("body is not valid JSON")
        r = await c.request(method, path, content=b'{"a": NaN}', headers=json_type)
        assert (r.status_code, r.json()["error"], r.json().get("field")) == (
            400,
            "bad request",
            "a",
        )

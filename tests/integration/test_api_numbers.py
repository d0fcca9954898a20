"""The control API against bad numbers and clashing hosts: the real app (create_app) on a
real EmbeddedStore in a state dir, driven through Starlette's TestClient (API-only
behaviour: no controller, so revisions that need to be ready are stored ready).

State "from before" (a NaN target, a tag host clash) is written into the store's files
before the store opens, as an earlier version would have left it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from platform_proc import function_copy
from starlette.testclient import TestClient

from torpor.api.app import ApiConfig, create_app
from torpor.cli.main import pack
from torpor.model import Function, Revision, ScaleOverride, Spec, TrafficTarget
from torpor.store.embedded import EmbeddedStore

TOKEN = "numbers-api-test-token-0123456789"
CAP = 10  # the platform's --max-replicas here


class Api:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        (self.state / "functions").mkdir(parents=True, exist_ok=True)
        self._client: TestClient | None = None
        self.store: EmbeddedStore | None = None

    def stored(self, *fns: Function) -> Api:
        """Write functions straight into the store's files (before it opens)."""
        assert self._client is None
        for fn in fns:
            (self.state / "functions" / f"{fn.name}.json").write_text(
                json.dumps(fn.to_dict())
            )  # NaN as written
        return self

    @property
    def c(self) -> TestClient:
        if self._client is None:
            self.store = EmbeddedStore(self.state)
            app = create_app(
                self.store, ApiConfig(state_dir=self.state, max_replicas=CAP, token=TOKEN)
            )
            self._client = TestClient(
                app,
                raise_server_exceptions=False,
                base_url="http://127.0.0.1",
                headers={"Authorization": f"Bearer {TOKEN}"},
            ).__enter__()
        return self._client

    def deploy(self, folder: Path, **params: str) -> Any:
        return self.c.post(
            "/v1/functions",
            params=params,
            content=pack(folder),
            headers={"content-type": "application/gzip"},
        )

    def raw(self, method: str, path: str, body: str) -> Any:
        return self.c.request(
            method, path, content=body, headers={"content-type": "application/json"}
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.__exit__(None, None, None)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    a = Api(tmp_path)
    yield a
    a.close()


def ready_fn(
    name: str, revisions: int = 1, tag: str | None = None, scale: ScaleOverride | None = None
) -> Function:
    revs = [
        Revision(
            name=f"{name}-{i:05d}", function=name, number=i, spec=Spec(name=name), status="ready"
        )
        for i in range(1, revisions + 1)
    ]
    return Function(
        name=name,
        revisions=revs,
        traffic=[TrafficTarget(revs[0].name, 100, tag)],
        scale=scale or ScaleOverride(),
        next_number=revisions + 1,
    )


def small_hello(tmp: Path, **overrides: Any) -> Path:
    return function_copy(tmp, "hello", **{"scale": {"max": CAP}, **overrides})


# --- PATCH /scale ---------------------------------------------------------------------------------


@pytest.mark.security
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"target": NaN}', "target"),
        ('{"target": Infinity}', "target"),
        ('{"target": 1e999}', "target"),
        ('{"target": 1' + "0" * 400 + "}", "target"),
        ('{"concurrency": 1000000000}', "concurrency"),
        ('{"target": 1e300}', "target"),
    ],
)
def test_scale_patch_with_a_non_finite_or_huge_number(
    api: Api, attack: Any, body: str, field: str
) -> None:
    """PATCH /scale with a NaN, infinite or huge number (stored, it made every GET a 500 and stalled the controller)"""
    assert api.deploy(small_hello(api.tmp)).status_code == 201
    r = api.raw("PATCH", "/v1/functions/hello/scale", body)
    attack.ended(f"{r.status_code} {r.json().get('detail', '')}")
    assert r.status_code == 400
    assert r.json()["field"] == field and r.json()["detail"].startswith(f"{field}: ")
    fn = api.c.get("/v1/functions/hello")
    assert fn.status_code == 200 and fn.json()["scale_override"] == {
        "min": None,
        "max": None,
        "target": None,
        "concurrency": None,
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"max": 1e999}', "max"),
        ('{"max": 1000000}', "max"),
        ('{"max": 11}', "max"),
        ('{"min": -Infinity}', "min"),
    ],
)
def test_scale_patch_max_out_of_range_names_the_field(api: Api, body: str, field: str) -> None:
    assert api.deploy(small_hello(api.tmp)).status_code == 201
    r = api.raw("PATCH", "/v1/functions/hello/scale", body)
    assert r.status_code == 400 and r.json()["field"] == field


# --- deploy ---------------------------------------------------------------------------------------


@pytest.mark.security
def test_deploy_with_cpu_1e300(api: Api, attack: Any) -> None:
    """Deploy a torpor.yaml with resources.cpu: 1e300 (passed the spec; every start then raised OverflowError)"""
    r = api.deploy(small_hello(api.tmp, resources={"cpu": 1e300}))
    attack.ended(f"{r.status_code} {r.json().get('detail', '')}")
    assert r.status_code == 400
    assert r.json()["field"] == "resources.cpu"
    assert api.c.get("/v1/functions/hello").status_code == 404


@pytest.mark.security
def test_deploy_with_scale_max_above_the_platform_cap(api: Api, attack: Any) -> None:
    """Deploy scale.max above the platform's --max-replicas (was capped silently: describe showed a max that never applied)"""
    r = api.deploy(function_copy(api.tmp, "hello", scale={"max": CAP + 1}))
    attack.ended(f"{r.status_code} {r.json().get('detail', '')}")
    assert r.status_code == 400
    assert r.json()["field"] == "scale.max" and f"cap of {CAP}" in r.json()["detail"]


def test_deploy_without_a_max_takes_the_default_within_the_cap(api: Api) -> None:
    folder = function_copy(api.tmp, "echo")
    spec = (folder / "torpor.yaml").read_text().replace("max: 10, ", "")
    (folder / "torpor.yaml").write_text(spec)
    assert api.deploy(folder).status_code == 201
    assert api.c.get("/v1/functions/echo").json()["scale"]["max"] == CAP


@pytest.mark.security
@pytest.mark.parametrize("canary", ["²", "1" * 5000])
def test_deploy_with_a_canary_that_is_not_a_plain_percent(
    api: Api, attack: Any, canary: str
) -> None:
    """Deploy with ?canary=² or a 5000-digit percent (str.isdigit() accepted it, int() then raised: a 500)"""
    r = api.deploy(small_hello(api.tmp), canary=canary)
    attack.ended(f"{r.status_code} {r.json().get('detail', '')[:60]}")
    assert r.status_code == 400 and r.json()["field"] == "canary"


@pytest.mark.parametrize("canary", ["-5", "0x10", "100", "0"])
def test_deploy_canary_out_of_range(api: Api, canary: str) -> None:
    r = api.deploy(small_hello(api.tmp), canary=canary)
    assert r.status_code == 400 and r.json()["field"] == "canary"


# --- state stored before the checks ---------------------------------------------------------------


@pytest.mark.security
def test_get_a_function_whose_stored_target_is_nan(api: Api, attack: Any) -> None:
    """GET a function whose stored scale target is NaN (from before the checks: every GET answered 500)"""
    api.stored(ready_fn("hello", scale=ScaleOverride(target=math.nan)), ready_fn("echo"))
    r = api.c.get("/v1/functions/hello")
    attack.ended(f"{r.status_code} problems={r.json().get('problems')}")
    assert r.status_code == 200
    body = r.json()
    assert body["scale_override"]["target"] is None and body["scale"]["target"] is None
    assert any(
        p.startswith("scale_override.target: nan is not a finite number") for p in body["problems"]
    )
    assert [f["name"] for f in api.c.get("/v1/functions").json()["functions"]] == ["echo", "hello"]
    # and it can be repaired by hand: a valid PATCH drops the bad value
    r = api.raw("PATCH", "/v1/functions/hello/scale", '{"max": 3}')
    assert r.status_code == 200 and r.json()["scale_override"]["target"] is None
    fixed = api.c.get("/v1/functions/hello").json()
    assert "problems" not in fixed and fixed["scale"]["target"] == 10.0


# --- query parameters -----------------------------------------------------------------------------


@pytest.mark.security
@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/functions/hello?events=abc", "events"),
        ("/v1/functions/hello?events=99999999999999999999", "events"),
        ("/v1/functions/hello/events?since=abc", "since"),
        ("/v1/functions/hello/events?since=nan", "since"),
        ("/v1/functions/hello/events?since=inf", "since"),
        ("/v1/functions/hello/events?limit=²", "limit"),
        ("/v1/functions/hello/events?limit=" + "9" * 5000, "limit"),
    ],
)
def test_query_parameters_that_are_not_numbers(
    api: Api, attack: Any, path: str, field: str
) -> None:
    """GET with ?events=abc, ?since=abc, ?limit=² or a 5000-digit limit (each raised in int()/float(): a 500)"""
    api.stored(ready_fn("hello"))
    r = api.c.get(path)
    attack.ended(f"{r.status_code} {r.json().get('detail', '')[:60]}")
    assert r.status_code == 400 and r.json()["field"] == field


def test_query_parameters_in_range_still_work(api: Api) -> None:
    api.stored(ready_fn("hello"))
    assert api.c.get("/v1/functions/hello?events=5").status_code == 200
    assert api.c.get("/v1/functions/hello/events?since=1700000000.5&limit=10").json() == {
        "events": []
    }


# --- rollout policy -------------------------------------------------------------------------------


@pytest.mark.security
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"to": "hello-00002", "max_p95_ratio": 1e999}', "max_p95_ratio"),
        ('{"to": "hello-00002", "max_p95_ratio": 1' + "0" * 300 + "}", "max_p95_ratio"),
        ('{"to": "hello-00002", "min_requests": 1' + "0" * 90 + "}", "min_requests"),
        ('{"to": "hello-00002", "interval": "9999h"}', "interval"),
    ],
)
def test_rollout_with_an_unbounded_threshold(api: Api, attack: Any, body: str, field: str) -> None:
    """Start a rollout with max_p95_ratio 1e999, a 300-digit ratio or an absurd interval (accepted: never judged, or a 500)"""
    api.stored(ready_fn("hello", revisions=2))
    r = api.raw("POST", "/v1/functions/hello/rollout", body)
    attack.ended(f"{r.status_code} {r.json().get('detail', '')[:80]}")
    assert r.status_code == 400 and r.json()["field"] == field
    assert api.c.get("/v1/functions/hello/rollout").json()["rollout"] is None


# --- tag hosts that clash with another function ---------------------------------------------------


@pytest.mark.security
def test_deploy_a_function_named_like_another_functions_tag_host(api: Api, attack: Any) -> None:
    """Deploy a function canary-hello while hello has tag canary (both would be canary-hello.DOMAIN)"""
    api.stored(ready_fn("hello", tag="canary"))
    r = api.deploy(small_hello(api.tmp, name="canary-hello"))
    attack.ended(f"{r.status_code} {r.json().get('detail', '')}")
    assert r.status_code == 400 and r.json()["field"] == "name"
    assert (
        "canary-hello.torpor.localhost" in r.json()["detail"]
        and "tag 'canary'" in r.json()["detail"]
    )
    assert api.c.get("/v1/functions/canary-hello").status_code == 404
    assert not (api.state / "blobs").exists() or not any(
        (api.state / "blobs").iterdir()
    )  # no archive kept


@pytest.mark.security
def test_deploy_a_function_named_like_a_tag_still_building(api: Api, attack: Any) -> None:
    """Deploy hello --tag canary, then a function canary-hello before hello's revision is ready"""
    assert api.deploy(small_hello(api.tmp), tag="canary").status_code == 201
    r = api.deploy(small_hello(api.tmp, name="canary-hello"))
    attack.ended(f"{r.status_code} {r.json().get('detail', '')}")
    assert r.status_code == 400 and r.json()["field"] == "name"


@pytest.mark.security
@pytest.mark.parametrize("how", ["deploy --tag", "deploy --canary --tag", "PUT traffic"])
def test_set_a_tag_whose_host_is_another_function(api: Api, attack: Any, how: str) -> None:
    """Set tag canary on hello while a function canary-hello exists (deploy --tag, rollout tags, PUT traffic)"""
    api.stored(ready_fn("hello", revisions=2), ready_fn("canary-hello"))
    if how == "PUT traffic":
        r = api.c.put(
            "/v1/functions/hello/traffic",
            json={
                "traffic": [
                    {"revision": "hello-00001", "percent": 90},
                    {"revision": "hello-00002", "percent": 10, "tag": "canary"},
                ]
            },
        )
        field = "traffic[1].tag"
    else:
        params = {"tag": "canary", **({"canary": "10"} if "canary" in how.split("--")[1] else {})}
        r = api.deploy(small_hello(api.tmp), **params)
        field = "tag"
    attack.ended(f"{r.status_code} {r.json().get('detail', '')}")
    assert r.status_code == 400 and r.json()["field"] == field
    assert "function canary-hello" in r.json()["detail"]
    fn = api.c.get("/v1/functions/hello").json()
    assert [t["tag"] for t in fn["traffic"]] == [None] and len(fn["revisions"]) == 2


def test_tags_that_clash_with_nobody_still_work(api: Api) -> None:
    api.stored(ready_fn("hello", revisions=2), ready_fn("canary-hello"))
    r = api.c.put(
        "/v1/functions/hello/traffic",
        json={
            "traffic": [
                {"revision": "hello-00001", "percent": 90},
                {"revision": "hello-00002", "percent": 10, "tag": "beta"},
            ]
        },
    )
    assert r.status_code == 200
    assert api.deploy(small_hello(api.tmp), tag="gamma").status_code == 201
    # the function that exists from before may be redeployed, the tag holder may keep its tag
    assert api.deploy(small_hello(api.tmp, name="canary-hello")).status_code == 201

"""The dashboard's sign-in and gate (torpor.api.ui), in process: one-time codes, the
session cookie, the API guard in front of it, and the page's own files."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from torpor.api.app import ApiConfig, create_app
from torpor.api.ui import CODE_TTL, MAX_CODES, SESSION_TTL, UiSessions, _Stats
from torpor.store.embedded import EmbeddedStore

TOKEN = "unit-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE = "http://127.0.0.1:8081"
SAME = {"Origin": BASE, "Sec-Fetch-Site": "same-origin"}


def client(tmp_path: Path) -> httpx.AsyncClient:
    app = create_app(EmbeddedStore(), ApiConfig(state_dir=tmp_path, token=TOKEN))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)


async def signed_in(c: httpx.AsyncClient) -> str:
    r = await c.post("/v1/ui/code", headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert TOKEN not in r.text and body["path"] == f"/ui/login?code={body['code']}"
    r = await c.get(body["path"])
    assert r.status_code == 303 and r.headers["location"] == "/ui"
    cookie = r.headers["set-cookie"]
    for part in ("HttpOnly", "SameSite=Strict", "Path=/v1"):
        assert part in cookie, cookie
    assert TOKEN not in cookie
    c.cookies.clear()  # each test sends the cookie itself, where it means to
    return cookie.split(";")[0].split("=", 1)[1]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_codes_are_single_use_and_expire() -> None:
    clock = Clock()
    s = UiSessions(clock)
    code = s.issue_code()
    session = s.redeem(code)
    assert session is not None and s.valid(session)
    assert s.redeem(code) is None  # used up
    late = s.issue_code()
    clock.now += CODE_TTL + 1
    assert s.redeem(late) is None
    clock.now += SESSION_TTL
    assert not s.valid(session)
    assert s.redeem("") is None and s.redeem("x" * 5000) is None and not s.valid("nope")


def test_codes_and_sessions_are_bounded() -> None:
    s = UiSessions(Clock())
    codes = [s.issue_code() for _ in range(MAX_CODES * 3)]
    assert len(s.codes) <= MAX_CODES
    assert s.redeem(codes[0]) is None and s.redeem(codes[-1]) is not None


async def test_the_page_and_its_files_are_served_with_a_strict_policy(tmp_path: Path) -> None:
    async with client(tmp_path) as c:
        for path, kind in (
            ("/ui", "text/html"),
            ("/ui/static/app.js", "text/javascript"),
            ("/ui/static/style.css", "text/css"),
        ):
            r = await c.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
            csp = r.headers["content-security-policy"]
            assert (
                "default-src 'none'" in csp
                and "script-src 'self'" in csp
                and "frame-ancestors 'none'" in csp
            )
            assert r.headers["x-frame-options"] == "DENY"
        page = (await c.get("/ui")).text
        assert (
            "http://" not in page and "https://" not in page
        )  # no CDN: every file is Torpor's own


@pytest.mark.security
@pytest.mark.parametrize(
    "path",
    [
        "/ui/static/../app.py",
        "/ui/static/%2e%2e/ui.py",
        "/ui/static/ui.py",
        "/ui/static/",
        "/ui/static/index.html/x",
        "/ui/other",
    ],
)
async def test_only_the_page_files_are_served(tmp_path: Path, path: str, attack) -> None:
    """A browser asks the dashboard's file route for a file beside the page (path traversal)."""
    async with client(tmp_path) as c:
        r = await c.get(path)
        assert r.status_code == 404, (path, r.text)
        assert "import " not in r.text
    attack.ended(f"{r.status_code} not found")


@pytest.mark.security
async def test_a_used_or_made_up_code_signs_nobody_in(tmp_path: Path, attack) -> None:
    """A sign-in link is replayed (history, a shared screen), or a code is guessed."""
    async with client(tmp_path) as c:
        code = (await c.post("/v1/ui/code", headers=AUTH)).json()["code"]
        assert (await c.get(f"/ui/login?code={code}")).status_code == 303
        c.cookies.clear()
        for bad in (code, "A" * 43, "", "../../etc"):
            r = await c.get(f"/ui/login?code={bad}")
            assert r.status_code == 401 and "set-cookie" not in r.headers, bad
        assert (await c.post("/v1/ui/code")).status_code == 401  # minting needs the token
    attack.ended("401 sign-in link expired, no cookie")


async def test_the_session_cookie_reaches_the_api_through_the_guard(tmp_path: Path) -> None:
    async with client(tmp_path) as c:
        assert (await c.get("/v1/functions")).status_code == 401
        session = await signed_in(c)
        jar = {"Cookie": f"torpor_ui={session}"}
        r = await c.get("/v1/functions", headers=jar)
        assert r.status_code == 200 and r.json() == {"functions": []}
        # the page's own POST (Origin = this API, Sec-Fetch-Site: same-origin) passes the guard
        r = await c.post(
            "/v1/functions/nope/rollout/abort",
            headers={**jar, **SAME, "Content-Type": "application/json"},
            content=b"{}",
        )
        assert r.status_code == 404 and r.json()["error"] == "function not found"
        r = await c.get("/v1/functions", headers={"Cookie": "torpor_ui=forged-session-value"})
        assert r.status_code == 401


@pytest.mark.security
async def test_the_cookie_does_not_carry_a_foreign_page_past_the_guard(
    tmp_path: Path, attack
) -> None:
    """A page on another origin (or a function's page on the gateway's port) rides the session cookie."""
    async with client(tmp_path) as c:
        jar = {"Cookie": f"torpor_ui={await signed_in(c)}"}
        json_type = {"Content-Type": "application/json"}
        for origin, site in (
            ("http://evil.example", "cross-site"),
            ("http://127.0.0.1:8080", "same-site"),
            ("http://127.0.0.1:8080", "same-origin"),
            ("http://127.0.0.1:8081", "cross-site"),
        ):
            r = await c.post(
                "/v1/functions/x/rollout/abort",
                content=b"{}",
                headers={**jar, **json_type, "Origin": origin, "Sec-Fetch-Site": site},
            )
            assert r.status_code == 403 and r.json()["error"] == "cross-origin request", (
                origin,
                site,
            )
        r = await c.get(
            "/v1/functions", headers={**jar, "Sec-Fetch-Site": "same-site"}
        )  # <img>, no Origin
        assert r.status_code == 403
        r = await c.post(
            "/v1/functions/x/rollout/abort",
            content=b"{}",
            headers={**jar, **SAME, "Content-Type": "text/plain"},
        )  # no preflight needed for that
        assert r.status_code == 415
        r = await c.get(
            "/v1/functions", headers={**jar, "Host": "evil.example:8081"}
        )  # DNS rebinding
        assert r.status_code == 421
        r = await c.post(
            "/v1/ui/code", headers={**jar, **SAME}
        )  # a session cannot mint more sign-ins
        assert r.status_code == 403
    attack.ended("403 cross-origin request / 415 / 421; the cookie mints no code")


def test_stats_sum_gateways_per_function() -> None:
    st = _Stats()
    lat = [0] * 14
    lat[4] = 100  # (0.05, 0.1] s
    for gw in ("a", "b"):
        st.add(
            {
                "gateway": gw,
                "revisions": {
                    "fn-00001": {
                        "function": "fn",
                        "concurrency": 2.5,
                        "requests": 50,
                        "errors": 1,
                        "latency": lat,
                        "queued": 1,
                    }
                },
            }
        )
    st.add({"gateway": "bad", "revisions": "not a dict"})
    st.add(
        {"gateway": "worse", "revisions": {"x": {"function": "fn", "requests": "many"}}}
    )  # skipped whole
    frame = st.frame(1.0)
    assert (
        frame["fn"]["in_flight"] == 5.0
        and frame["fn"]["rps"] == 100.0
        and frame["fn"]["errors"] == 2
    )
    assert frame["fn"]["queued"] == 2 and 50 < frame["fn"]["p95_ms"] <= 100
    assert st.frame(1.0) == {}  # each frame starts afresh


async def test_a_frame_shows_a_bounded_number_of_functions(tmp_path: Path) -> None:
    from torpor.api.app import ApiConfig as Cfg
    from torpor.api.ui import MAX_FUNCTIONS_SHOWN, dashboard_state
    from torpor.model import Function

    store = EmbeddedStore()
    for i in range(MAX_FUNCTIONS_SHOWN + 5):
        await store.update_function(f"fn-{i:04d}", lambda cur, n=i: Function(name=f"fn-{n:04d}"))
    state = await dashboard_state(store, Cfg(state_dir=tmp_path, token=TOKEN), {})
    assert len(state["functions"]) == MAX_FUNCTIONS_SHOWN and state["functions_not_shown"] == 5
    assert state["functions"][0]["name"] == "fn-0000" and state["functions"][0]["replicas"] == {}

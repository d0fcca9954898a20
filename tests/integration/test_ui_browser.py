"""The dashboard in a real headless browser (Debian's chromium driven by Playwright) on a
real `torpor up`: signed in by `torpor ui`, a deploy appears, a burst moves the graph,
the rollout's traffic shows as bars and its Abort button aborts it through the API.

Set TORPOR_UI_SCREENSHOT=PATH to keep the screenshot (the README's docs/ui.png)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from platform_proc import DOMAIN, Torpor, function_copy, torpor_up

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (the test extra)"
    )
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium: apt-get install -y chromium (scripts/test.sh does)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


def burst(up: Torpor, name: str, seconds: float, threads: int = 6) -> int:
    """Requests to ``name`` from ``threads`` clients for ``seconds`` (bounded); the count."""
    end = time.monotonic() + seconds

    def worker(_: int) -> int:
        n = 0
        with httpx.Client(timeout=30, headers={"Host": f"{name}.{DOMAIN}"}) as c:
            while time.monotonic() < end and n < 2000:
                assert c.get(up.gateway + "/?ms=40").status_code == 200
                n += 1
        return n

    with cf.ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(worker, range(threads)))


def test_dashboard_shows_deploys_bursts_and_aborts_a_rollout(tmp_path: Path, browser) -> None:
    with torpor_up(tmp_path / "state") as up:
        url = up.cli("ui", "--no-open").stdout.strip()
        page = browser.new_page(viewport={"width": 1360, "height": 760})
        page.goto(url)
        assert (
            page.url == f"{up.api}/ui"
        )  # the code was exchanged for the cookie; it is gone from the URL
        page.wait_for_function(
            "() => document.querySelector('#conn').textContent === 'live'", timeout=15000
        )
        assert page.locator("article.fn").count() == 0

        slow = function_copy(tmp_path, "slow", env={"SLEEP_MS": "40", "FAIL_RATE": "0"})
        hello = function_copy(tmp_path, "hello")
        up.cli("deploy", str(slow), "-q")
        card = page.locator('article.fn[data-function="slow"]')
        card.wait_for(timeout=15000)  # a deploy appears
        assert card.locator(".fn-url").inner_text() == f"http://slow.{DOMAIN}:{up.port}/"
        up.cli("deploy", str(hello), "-q")
        page.locator('article.fn[data-function="hello"]').wait_for(timeout=15000)

        up.cli("deploy", str(slow), "--no-traffic", "-q")
        up.cli(
            "rollout",
            "slow",
            "--to",
            "slow-00002",
            "--steps",
            "50,100",
            "--interval",
            "10m",
            "--no-watch",
        )
        page.wait_for_function(
            """() => {
            const bars = document.querySelectorAll('article.fn[data-function="slow"] .traffic div');
            return bars.length === 2 && [...bars].every(b => b.dataset.percent === '50');
        }""",
            timeout=15000,
        )
        assert "step 1/2 (50%)" in card.locator(".ro-line").inner_text()

        baseline = card.locator(".s-rps").get_attribute("data-max")
        with cf.ThreadPoolExecutor(1) as pool:
            sent = pool.submit(burst, up, "slow", 6.0)
            page.wait_for_function(
                """() => {
                const c = document.querySelector('article.fn[data-function="slow"]');
                return Number(c.querySelector('.s-rps').dataset.max) >= 5
                    && Number(c.querySelector('.s-inflight').dataset.max) > 0
                    && c.querySelector('.v-p95').textContent.endsWith('ms');
            }""",
                timeout=20000,
            )  # a burst moves the graph
            assert sent.result(timeout=60) > 50
        assert float(baseline or 0) < 5
        points = card.locator(".s-rps polyline").get_attribute("points") or ""
        assert len({p.split(",")[1] for p in points.split()}) > 1  # not a flat line
        assert "ready" in card.locator(".replicas").inner_text()
        page.wait_for_timeout(1500)  # the sparklines carry the burst and its tail
        shot = tmp_path / "ui.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("TORPOR_UI_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["TORPOR_UI_SCREENSHOT"])

        card.locator('button[data-action="abort"]').click()  # through the guarded API, as the CLI
        page.wait_for_function(
            """() => document.querySelector(
            'article.fn[data-function="slow"] .rollout').dataset.state === 'aborted'""",
            timeout=15000,
        )
        ro = up.api_call("GET", "/v1/functions/slow/rollout").json()
        assert ro["rollout"]["state"] == "aborted"
        assert [(t["revision"], t["percent"]) for t in ro["traffic"] if t["percent"]] == [
            ("slow-00001", 100)
        ]
        assert card.locator(".ro-msg").inner_text() == "abort: done"
        assert card.locator('button[data-action="abort"]').is_disabled()

        # the same URL does not sign in twice; a fresh browser without the cookie sees no state
        other = browser.new_page()
        other.goto(url)
        assert "expired" in other.content()
        other.goto(f"{up.api}/ui")
        other.wait_for_function(
            "() => document.querySelector('#conn').textContent.includes('not signed in')",
            timeout=15000,
        )
        assert other.locator("article.fn").count() == 0

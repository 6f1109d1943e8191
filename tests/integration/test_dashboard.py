"""The operator's dashboard in a real headless browser (Debian chromium driven by Playwright)
against the running factory: sign in with the admin key, load arrives and the figures move, a
budget set through the admin API shows within 2 s, no console errors, readable at 1280x800 and
at phone width. Screenshots land in tests/artifacts/."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY_MODEL, bearer
from tests.support import background_load

pytestmark = pytest.mark.stack

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def _chromium() -> str:
    path = os.environ.get("FACTORY_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no chromium: `apt-get install chromium` (.ci/run does) or set FACTORY_CHROMIUM")
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


def _open(browser, base_url: str, admin_key: str, width: int, height: int):
    page = browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base_url + "/dashboard")
    page.wait_for_selector("#login", state="visible", timeout=15_000)  # auth is required here
    page.fill("#admin-key", admin_key)
    page.click("#sign-in")
    page.wait_for_function("Number(document.body.dataset.updates || 0) >= 2", timeout=20_000)
    return page, errors


def _number(text: str) -> float:
    m = re.search(r"[-+]?\d[\d,]*\.?\d*", text)
    return float(m.group(0).replace(",", "")) if m else 0.0


def test_dashboard_data_needs_the_admin_key(base_url, keys):
    assert httpx.get(base_url + "/dashboard/api/state").status_code == 401
    assert httpx.get(base_url + "/dashboard/api/state", headers=bearer(keys.tenant)).status_code == 403
    state = httpx.get(base_url + "/dashboard/api/state", headers=bearer(keys.admin)).json()
    assert state["auth_required"] is True
    assert state["replicas"] and state["replicas"][0]["source"] == "modeled"
    assert {a["kind"] for a in state["alarms"]} >= {"telemetry_modeled"}
    # The page itself holds no data and loads without a key; nothing is fetched from elsewhere.
    page = httpx.get(base_url + "/dashboard")
    assert page.status_code == 200 and "https://" not in page.text and "http://" not in page.text


def test_dashboard_under_load_and_a_budget_change(browser, base_url, keys, client):
    page, errors = _open(browser, base_url, keys.admin, 1280, 800)
    before = _number(page.inner_text("#tokens-per-s"))
    updates_before = int(page.evaluate("document.body.dataset.updates"))

    def send(_: int) -> None:
        client.completions.create(model=TINY_MODEL, prompt="dash", max_tokens=64, extra_body={"ignore_eos": True})

    try:
        with background_load(send, workers=4):
            page.wait_for_function(
                f"(() => {{ const t = document.querySelector('#tokens-per-s').innerText;"
                f" const n = parseFloat(t.replace(/,/g, '')); return n > 0 && n !== {before}; }})()",
                timeout=30_000,
                polling=250,
            )
            assert int(page.evaluate("document.body.dataset.updates")) > updates_before
            assert _number(page.inner_text("#site-power")) > 0
        # The picture right after the load (the page still shows its figures): during it, chromium's
        # renderer shares two cores with four load threads and the engine, and a full-page
        # screenshot once took over 30 s.
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-1280x800.png"), full_page=True)
        # Demand response: a new site budget shows on the page within 2 s. (Measured after the
        # load: on two cores, four load threads and chromium's renderer starve each other.)
        r = httpx.put(base_url + "/admin/power/budget", json={"site_w": 777}, headers=bearer(keys.admin))
        assert r.status_code == 200, r.text
        t0 = time.monotonic()
        page.wait_for_function(
            "document.querySelector('#site-budget').innerText.includes('777')", timeout=2_000, polling=100
        )
        assert time.monotonic() - t0 <= 2.0
    finally:
        httpx.put(base_url + "/admin/power/budget", json={}, headers=bearer(keys.admin))
    tenant_rows = page.inner_text("#tenant-table")
    assert "acme" in tenant_rows
    assert not errors, errors
    page.close()


def test_dashboard_fits_a_phone(browser, base_url, keys):
    page, errors = _open(browser, base_url, keys.admin, 390, 844)
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 1, f"the page scrolls sideways by {overflow}px at 390px"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-390.png"), full_page=True)
    assert not errors, errors
    page.close()


def test_tenant_table_sorts(browser, base_url, keys):
    page, _ = _open(browser, base_url, keys.admin, 1280, 800)
    rows = page.locator("#tenant-table tbody tr")
    if rows.count() < 2:  # make a second tenant with usage
        admin = bearer(keys.admin)
        httpx.post(base_url + "/admin/tenants", json={"name": "sorter"}, headers=admin)
        key = httpx.post(base_url + "/admin/keys", json={"tenant": "sorter"}, headers=admin).json()["key"]
        httpx.post(base_url + "/admin/packages", json={"tenant": "sorter", "tokens": 1000}, headers=admin)
        body = {"model": TINY_MODEL, "prompt": [1, 2], "max_tokens": 1}
        httpx.post(base_url + "/v1/completions", json=body, headers=bearer(key))
        page.wait_for_function("document.querySelectorAll('#tenant-table tbody tr').length >= 2", timeout=10_000)
    header = page.locator("#tenant-table th", has_text="Completion")
    header.click()
    first = [_number(t) for t in page.locator("#tenant-table tbody tr td:nth-child(4)").all_inner_texts()]
    header.click()
    second = [_number(t) for t in page.locator("#tenant-table tbody tr td:nth-child(4)").all_inner_texts()]
    assert sorted(first) in (first, first[::-1]) and second == first[::-1]
    page.close()

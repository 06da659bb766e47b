"""The dashboard (GET /dashboard) in a real headless browser: Debian's Chromium, driven by Playwright."""

import os
import re
import shutil
import threading
from urllib.parse import urlsplit

import httpx
import pytest
from eth_account import Account

from odla.core import protocol as p
from tests.helpers import NODE_KEY, infer, node_ids, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: make test installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed (make test installs it when run as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def test_the_dashboard_shows_nodes_and_jobs_live_with_an_api_key(sim, operator, node, browser, tmp_path):
    op = operator(api_keys=["secret-key"])
    auth = {"authorization": "Bearer secret-key"}
    node(op.url, sim.url, "n1")
    node(op.url, sim.url, "n2")
    wait_for(lambda: node_ids(op.url, headers=auth) == {"n1", "n2"})
    page = browser.new_page()
    elsewhere, errors = [], []
    page.on("request", lambda r: urlsplit(r.url).hostname not in ("127.0.0.1", None) and elsewhere.append(r.url))
    page.on("console", lambda m: m.type == "error" and "401" not in m.text and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))

    from playwright.sync_api import expect

    page.goto(f"{op.url}/dashboard")
    page.wait_for_selector("#login.shown")  # the page asks for the key once...
    page.fill("#key", "secret-key")
    page.click("#login button")
    expect(page.locator("#nodes tbody")).to_contain_text("n2")
    rows = page.inner_text("#nodes tbody")
    assert "n1" in rows and "n2" in rows and "healthy" in rows
    address = Account.from_key(NODE_KEY).address  # each node's key, as wallets show one
    assert f"{address[:6]}…{address[-4:]}" in rows and "1.00" in rows  # and its reputation

    # jobs run while the page is open: they appear without a reload
    sim.configure(delay=0.25)  # each job runs 1.5 s: the page, polling every 2 s, sees one running
    ids = []

    def run_jobs() -> None:
        for i in range(4):
            with httpx.stream("POST", f"{op.url}/inference", json={"model": "llama3", "prompt": f"live {i}"},
                              headers=auth) as resp:
                ids.append(resp.headers[p.JOB_HEADER])
                resp.read()

    runner = threading.Thread(target=run_jobs)
    runner.start()
    try:
        expect(page.locator("#t-inflight")).to_have_text("1", timeout=10_000)  # a job running, seen live
    finally:
        runner.join()
    assert infer(op.url, model="llama9", headers=auth)[0] == 404
    for job_id in ids:
        expect(page.locator("#jobs tbody")).to_contain_text(job_id[:12], timeout=10_000)
    jobs = page.inner_text("#jobs tbody")
    assert jobs.count("ok") >= 4 and "no_node" in jobs and "llama9" in jobs
    expect(page.locator("#line-requests")).to_have_attribute("points", re.compile(r"\d"))
    assert float(page.inner_text("#t-rps")) >= 0

    page.reload()  # ...and remembers it
    expect(page.locator("#jobs tbody")).to_contain_text("no_node")
    assert not page.is_visible("#login")
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    assert elsewhere == [] and errors == []


def test_the_dashboard_page_fetches_nothing_from_elsewhere(operator):
    op = operator()
    page = httpx.get(f"{op.url}/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text
    script = httpx.get(f"{op.url}/dashboard/app.js")
    assert script.status_code == 200 and "http" not in script.text.replace("httpx", "")
    assert httpx.get(f"{op.url}/dashboard/activity").status_code == 200
    keyed = operator(api_keys=["k"])
    assert httpx.get(f"{keyed.url}/dashboard").status_code == 200  # the page itself: it asks for the key
    assert httpx.get(f"{keyed.url}/dashboard/activity").status_code == 401


def test_a_new_operator_with_no_node_or_job_shows_its_empty_tables(operator, browser):
    """The page on an operator nothing has joined yet: each table says so (it threw on main)."""
    from playwright.sync_api import expect

    op = operator()
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{op.url}/dashboard")
    expect(page.locator("#nodes tbody")).to_contain_text("No node has joined yet")
    expect(page.locator("#jobs tbody")).to_contain_text("No job yet")
    assert errors == []


def test_a_model_two_nodes_list_under_different_builds_is_flagged(operator, node, browser):
    from playwright.sync_api import expect

    from tests.helpers import Sim

    with Sim(models=["llama3"]) as a, Sim(models=["llama3"], build="q8_0") as b:
        op = operator()
        node(op.url, a.url, "a")
        node(op.url, b.url, "b")
        wait_for(lambda: node_ids(op.url) == {"a", "b"})
        page = browser.new_page()
        page.goto(f"{op.url}/dashboard")
        expect(page.locator("#nodes tbody")).to_contain_text("another build elsewhere: llama3:latest")

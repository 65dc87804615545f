"""The console in a real browser: Debian's chromium and chromium-driver driven by Selenium,
against the example shop served by uvicorn on a loopback port.

Fails (never skips) when chromium is missing and QUERYWATCH_REQUIRE_TOOLS=1 (CI). Screenshots
of the list and unit views go to a temporary directory, or to docs/img/ with
QUERYWATCH_UPDATE_SCREENSHOTS=1:

    QUERYWATCH_UPDATE_SCREENSHOTS=1 .venv/bin/python -m pytest tests/test_console_browser.py
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import querywatch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from shop import app as sync_shop  # noqa: E402
from shop.traffic import ROUND, drive  # noqa: E402

DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
TOKEN = "browser-test-token-0123456789"
#: Markup planted in a path and in SQL (a quoted column name survives fingerprinting; the
#: comment does not): it must show as text, and never run.
PLANTED = "<script>window.planted=1</script><img src=x id=planted>"
WAIT = 20.0


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    if os.environ.get("QUERYWATCH_REQUIRE_TOOLS") == "1":
        pytest.fail(f"QUERYWATCH_REQUIRE_TOOLS=1 but {name} is not installed")
    pytest.skip(f"{name} is not installed (apt-get install chromium chromium-driver)")


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless chromium at 1280x800, through chromedriver."""
    chromedriver = _tool("chromedriver")
    chromium = _tool("chromium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,800",
        "--force-color-profile=srgb",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


def _planted_endpoint(app: FastAPI, engine: sa.Engine) -> None:
    """A route (this test's, not the shop's) that runs SQL with markup in it."""
    column = PLANTED.replace('"', "")
    statement = sa.text(f'SELECT 1 AS "{column}" /* {PLANTED} */')

    @app.get("/planted/{rest:path}")
    def planted(rest: str) -> dict[str, str]:
        with engine.connect() as conn:
            conn.execute(statement)
        return {"rest": rest}


@pytest.fixture
def serve_shop(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Serve the example shop (console on) with uvicorn on a free loopback port; returns its
    base URL once uvicorn reports it started."""
    running: list[tuple[uvicorn.Server, threading.Thread, FastAPI]] = []

    def serve(**settings: Any) -> str:
        url = f"sqlite:///{tmp_path / f'shop{len(running)}.db'}"
        app = sync_shop.create_app(
            url,
            settings=querywatch.Settings(console=True, **settings),
            registry=CollectorRegistry(),
        )
        _planted_endpoint(app, app.state.engines[0])
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", access_log=False
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        running.append((server, thread, app))
        deadline = time.monotonic() + WAIT
        while not server.started:  # uvicorn's own readiness flag, polled with a deadline
            assert thread.is_alive(), "uvicorn stopped"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    yield serve
    for server, thread, app in running:
        server.should_exit = True
        thread.join(10)
        app.state.querywatch_console.close()
        for session, _ in app.state.report_cache.values():
            session.close()
        for engine in app.state.engines:
            querywatch.uninstrument(engine)
            engine.dispose()


def _get(base_url: str, *paths: str) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for path in paths:
            client.get(path)


def _drive(base_url: str) -> None:
    async def run() -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            await drive(client, calls_per_round=ROUND)

    asyncio.run(run())


def _wait(driver: Any, condition: Callable[[Any], Any], message: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(condition, message)


def _rows(driver: Any) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, "#units-body tr"))


def _row_for(driver: Any, route: str) -> Any:
    for row in _rows(driver):
        if route in row.text:
            return row
    return None


def _screenshot(driver: Any, name: str, tmp_path: Path) -> None:
    update = os.environ.get("QUERYWATCH_UPDATE_SCREENSHOTS") == "1"
    directory = DOCS_IMG if update else tmp_path
    directory.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(directory / name))


def _open_list(driver: Any, base_url: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base_url}/_querywatch/")
    _wait(driver, lambda d: d.find_element(By.ID, "live").text == "live", "the list never polled")


def test_n_plus_one_request_appears_live(
    browser: Any, serve_shop: Callable[..., str], tmp_path: Path
) -> None:
    """A request sent while the list is open appears in it, with its N+1 badge, without a reload."""
    from selenium.webdriver.common.by import By

    base_url = serve_shop()
    _drive(base_url)
    _open_list(browser, base_url)
    browser.execute_script("window.notReloaded = true;")
    assert _row_for(browser, "/customers/n-plus-one") is not None  # from the traffic
    before = len(_rows(browser))
    _get(base_url, "/customers/n-plus-one")
    _wait(browser, lambda d: len(_rows(d)) == before + 1, "the new request never appeared")
    newest = _rows(browser)[0]
    assert "/customers/n-plus-one" in newest.text
    badges = [b.text for b in newest.find_elements(By.CSS_SELECTOR, ".badge")]
    assert badges == ["N+1"]
    assert browser.execute_script("return window.notReloaded;") is True
    _screenshot(browser, "console-list.png", tmp_path)
    csp_errors = [
        entry["message"]
        for entry in browser.get_log("browser")
        if "Content Security Policy" in entry["message"]
    ]
    assert csp_errors == []


def test_unit_view_groups_the_repeated_statement(
    browser: Any, serve_shop: Callable[..., str], tmp_path: Path
) -> None:
    """The N+1 request opened shows its repeated statement grouped, its call site and the fix."""
    from selenium.webdriver.common.by import By

    base_url = serve_shop()
    _get(base_url, "/customers/n-plus-one")
    _open_list(browser, base_url)
    _wait(browser, lambda d: _row_for(d, "/customers/n-plus-one"), "the request is not listed")
    _row_for(browser, "/customers/n-plus-one").find_element(By.CSS_SELECTOR, "a.route").click()
    table = _wait(
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, "#unit table.statements"),
        "the unit view never showed its statements",
    )
    repeated = table.find_element(By.CSS_SELECTOR, "tr.tag-n_plus_one")
    assert repeated.find_element(By.CSS_SELECTOR, ".count").text == "\u00d712"
    assert "from orders where ? = orders.customer_id" in repeated.text
    assert "examples/shop/app.py:" in repeated.text
    assert "in customers_n_plus_one" in repeated.text
    finding = browser.find_element(By.CSS_SELECTOR, "#unit .finding.kind-n_plus_one")
    fix = finding.find_element(By.CSS_SELECTOR, ".fix").text
    assert fix.startswith("Fix: ")
    assert "selectinload(Customer.orders)" in fix
    headline = finding.find_element(By.CSS_SELECTOR, "strong").text
    assert "Customer.orders" in headline
    assert "12 times" in headline
    _screenshot(browser, "console-unit.png", tmp_path)


def test_routes_view_sorts_by_a_column(browser: Any, serve_shop: Callable[..., str]) -> None:
    """The routes view lists each route template and re-sorts when a column header is clicked."""
    from selenium.webdriver.common.by import By

    base_url = serve_shop()
    _get(base_url, "/customers/n-plus-one", "/customers/n-plus-one", "/customers", "/healthz")
    browser.get(f"{base_url}/_querywatch/#/routes")

    def first_column(d: Any) -> list[str]:
        cells = d.find_elements(By.CSS_SELECTOR, "#routes-body tr td:first-child")
        return [cell.text for cell in cells]

    _wait(browser, lambda d: len(first_column(d)) == 3, "the routes never showed")
    header = browser.find_element(By.CSS_SELECTOR, "th[data-key=requests] button")
    header.click()
    assert first_column(browser)[0] == "GET /customers/n-plus-one"
    assert (
        browser.find_element(By.CSS_SELECTOR, "th[data-key=requests]").get_attribute("aria-sort")
        == "descending"
    )
    header.click()
    assert first_column(browser)[-1] == "GET /customers/n-plus-one"
    browser.find_element(By.CSS_SELECTOR, "th[data-key=route] button").click()
    assert first_column(browser) == sorted(first_column(browser))


def test_markup_in_path_and_sql_renders_as_text(
    browser: Any, serve_shop: Callable[..., str]
) -> None:
    """A <script> planted in a request path and in SQL shows as text and never runs."""
    from selenium.webdriver.common.by import By

    base_url = serve_shop()
    _get(base_url, "/planted/" + quote(PLANTED, safe=""))
    _open_list(browser, base_url)
    row = _wait(browser, lambda d: _row_for(d, "/planted/"), "the planted request is not listed")
    assert PLANTED in row.text
    row.find_element(By.CSS_SELECTOR, "a.route").click()
    shape = _wait(
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, "#unit table.statements pre"),
        "the unit view never showed",
    )
    assert "<script>window.planted=1</script>" in shape.text
    assert browser.execute_script("return window.planted;") is None
    assert browser.find_elements(By.ID, "planted") == []
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 1


def test_token_flow(browser: Any, serve_shop: Callable[..., str]) -> None:
    """With a token, the console is a 404 until /login?token= sets its cookie; then it works."""
    from selenium.webdriver.common.by import By

    base_url = serve_shop(console_token=TOKEN)
    browser.get(f"{base_url}/_querywatch/")
    assert "Not Found" in browser.find_element(By.TAG_NAME, "body").text
    assert browser.find_elements(By.ID, "units-table") == []
    browser.get(f"{base_url}/_querywatch/login?token={TOKEN}")
    _wait(browser, lambda d: d.find_element(By.ID, "live").text == "live", "login failed")
    assert browser.current_url == f"{base_url}/_querywatch/"

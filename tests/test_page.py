"""The search page in a real headless browser (Debian's chromium, driven by Selenium)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from indexer.serve.app import ServeConfig, create_app
from indexer.serve.registry import Registry
from tests.test_serve import Server

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
REQUIRED = os.environ.get("INDEXER_REQUIRE_BROWSER") == "1"  # CI: make install put them there
pytestmark = pytest.mark.skipif(
    not REQUIRED and not (CHROMIUM and DRIVER),
    reason="needs chromium and chromedriver (`make install` installs them as root)",
)


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1100,900"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER or "/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()


def wait_for(check: Callable[[], Any], what: str, seconds: float = 30) -> Any:
    deadline = time.monotonic() + seconds  # a guard against a hung page, not a timing test
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"the page never showed {what}")


@pytest.mark.parametrize("token", [None, "s3cret"])
def test_the_page_searches_by_upload_and_by_click(
    browser: Any, collection: Path, corpus: Path, tmp_path: Path, token: str | None
) -> None:
    from selenium.webdriver.common.by import By

    registry = Registry({"photos": collection})
    registry.refresh()
    server = Server(create_app(registry, ServeConfig(token=token)))
    try:
        browser.get(f"http://127.0.0.1:{server.port}/")
        if token:  # the first 401 makes the page ask for the token, once
            alert = wait_for(lambda: _alert(browser), "the token prompt")
            alert.send_keys(token)
            alert.accept()
        wait_for(
            lambda: browser.find_elements(By.CSS_SELECTOR, "#collection option"), "collections"
        )
        image = sorted(corpus.rglob("*.jpg"))[2]
        browser.find_element(By.ID, "file").send_keys(str(image))
        figures = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#results figure"),
                           "results")  # fmt: skip
        assert len(figures) == 24
        loaded = "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"
        wait_for(lambda: browser.execute_script(loaded), "thumbnails loaded")
        assert image.name in figures[0].text  # the upload's own item first, with its score
        first = figures[1]
        first_key = first.find_element(By.TAG_NAME, "img").get_attribute("alt")
        first_id = first.get_attribute("data-id")
        first.click()
        wait_for(lambda: f"query: {first_key}" in browser.find_element(By.ID, "query").text,
                 "a search from the clicked result")  # fmt: skip
        assert f"id={first_id}" in browser.current_url  # the URL holds the query
        second = browser.find_elements(By.CSS_SELECTOR, "#results figure")[1]
        second_key = second.find_element(By.TAG_NAME, "img").get_attribute("alt")
        second.click()
        wait_for(lambda: f"query: {second_key}" in browser.find_element(By.ID, "query").text,
                 "a second search")  # fmt: skip
        browser.back()
        wait_for(lambda: f"query: {first_key}" in browser.find_element(By.ID, "query").text,
                 "the first search again after Back")  # fmt: skip
        expected = "status of 401" if token else "\0"  # the one 401 that asks for the token
        severe = [e for e in browser.get_log("browser")
                  if e["level"] == "SEVERE" and expected not in e["message"]]  # fmt: skip
        assert severe == []
        if os.environ.get("INDEXER_SCREENSHOT") and not token:
            browser.save_screenshot(os.environ["INDEXER_SCREENSHOT"])
        bad = tmp_path / "not-an-image.jpg"
        bad.write_text("just text")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        message = wait_for(lambda: browser.find_element(By.ID, "error").text, "an error")
        assert "cannot read query image" in message
    finally:
        server.stop()


def _alert(browser: Any) -> Any:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        return browser.switch_to.alert
    except NoAlertPresentException:
        return None

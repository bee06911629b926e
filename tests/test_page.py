"""The search page in a real headless browser (Debian's chromium, driven by Selenium)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from indexer.serve.app import ServeConfig, create_app
from indexer.serve.registry import Registry
from indexer.synthetic import scene
from tests.helpers import BUILD_FLAGS, run_cli
from tests.test_serve import Server, build_captioned

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
REQUIRED = os.environ.get("INDEXER_REQUIRE_BROWSER") == "1"  # CI: make install put them there
pytestmark = pytest.mark.skipif(
    not REQUIRED and not (CHROMIUM and DRIVER),
    reason="needs chromium and chromedriver (`make install` installs them as root)",
)
BANNER = "random weights: neighbours reflect colour and texture, not content"
LOADED = ("return [...document.querySelectorAll(arguments[0])]"
          ".every(i => i.complete && i.naturalWidth > 0)")  # fmt: skip


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


@pytest.fixture(scope="session")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_captioned(tmp_path_factory.mktemp("captioned"))


@pytest.fixture(scope="session")
def long_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of pictures whose keys are far wider than a phone's screen."""
    folder = tmp_path_factory.mktemp("long-keys")
    deep = folder / "src" / ("an-archive-folder-with-a-long-name-" * 3)
    deep.mkdir(parents=True)
    for n in range(6):
        scene(40 + n, (160, 120)).save(deep / f"{'holiday-photo-taken-on-the-beach-' * 4}{n}.jpg")
    out = folder / "c"
    result = run_cli("build", folder / "src", "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    return out


@contextmanager
def page(roots: dict[str, Path], cfg: ServeConfig | None = None) -> Iterator[Server]:
    """A real server over these collections; `server.registry` is theirs."""
    registry = Registry(roots)
    registry.refresh()
    server = Server(create_app(registry, cfg or ServeConfig()))
    server.registry = registry  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


def wait_for(check: Callable[[], Any], what: str, seconds: float = 30) -> Any:
    deadline = time.monotonic() + seconds  # a guard against a hung page, not a timing test
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"the page never showed {what}")


def figures(browser: Any, grid: str, count: int | None = None) -> list[Any]:
    """The figures of a grid (#items or #results) once shown (`count` of them), thumbnails in."""
    from selenium.webdriver.common.by import By

    def shown() -> list[Any]:
        from selenium.common.exceptions import StaleElementReferenceException

        found = browser.find_elements(By.CSS_SELECTOR, f"#{grid} figure")
        try:  # a grid on show (not the hidden one of the other view), of the size expected
            if found and found[0].is_displayed() and count in (None, len(found)):
                return found
        except StaleElementReferenceException:  # replaced meanwhile: look again
            pass
        return []

    found = wait_for(shown, f"the {grid} grid")
    wait_for(lambda: browser.execute_script(LOADED, f"#{grid} img"), f"{grid} thumbnails")
    return found


def severe(browser: Any, *expected: str) -> list[str]:
    """The browser console's errors, less those a test caused on purpose."""
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"
            and not any(text in e["message"] for text in expected)]  # fmt: skip


def text(browser: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(browser.find_element(By.ID, element_id).text)


def url_params(browser: Any) -> dict[str, list[str]]:
    return parse_qs(urlsplit(browser.current_url).query)


def result_keys(browser: Any) -> list[str]:
    return [f.find_element("css selector", "img").get_attribute("alt")
            for f in browser.find_elements("css selector", "#results figure")]  # fmt: skip


def narrow(browser: Any, width: int) -> None:
    """A viewport of this width (a window cannot be made narrower than 500 px headless)."""
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": 800, "deviceScaleFactor": 1,
                             "mobile": False})  # fmt: skip


@pytest.mark.parametrize("token", [None, "s3cret"])
def test_the_page_searches_by_upload_and_by_click(
    browser: Any, collection: Path, corpus: Path, tmp_path: Path, token: str | None
) -> None:
    from selenium.webdriver.common.by import By

    with page({"photos": collection}, ServeConfig(token=token)) as server:
        browser.get(f"http://127.0.0.1:{server.port}/")
        if token:  # the first 401 makes the page ask for the token, once
            alert = wait_for(lambda: _alert(browser), "the token prompt")
            alert.send_keys(token)
            alert.accept()
        figures(browser, "items")  # the collection, before any search
        image = sorted(corpus.rglob("*.jpg"))[2]
        browser.find_element(By.ID, "file").send_keys(str(image))
        found = figures(browser, "results", 24)
        assert image.name in found[0].text  # the upload's own item first, with its score
        wait_for(lambda: browser.execute_script(LOADED, "#query-image"), "the query picture")
        query = browser.find_element(By.ID, "query-image").rect
        grid = browser.find_element(By.ID, "results").rect
        assert query["x"] + query["width"] <= grid["x"] and query["y"] < grid["y"] + 50  # beside
        assert f"query: {image.name}" in text(browser, "query")
        first = found[1]
        first_key = first.find_element(By.TAG_NAME, "img").get_attribute("alt")
        first_id = first.get_attribute("data-id")
        first.click()
        wait_for(lambda: f"query: {first_key}" in text(browser, "query"),
                 "a search from the clicked result")  # fmt: skip
        assert url_params(browser)["id"] == [first_id]  # the URL holds the query
        second = figures(browser, "results")[1]
        second_key = second.find_element(By.TAG_NAME, "img").get_attribute("alt")
        second.click()
        wait_for(lambda: f"query: {second_key}" in text(browser, "query"), "a second search")
        browser.back()
        wait_for(lambda: f"query: {first_key}" in text(browser, "query"),
                 "the first search again after Back")  # fmt: skip
        expected = "status of 401" if token else "\0"  # the one 401 that asks for the token
        assert severe(browser, expected) == []
        bad = tmp_path / "not-an-image.jpg"
        bad.write_text("just text")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        message = wait_for(lambda: text(browser, "error"), "an error")
        assert "cannot read query image" in message


def test_items_are_shown_before_a_search_and_open_to_their_row(
    browser: Any, collection: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with page({"photos": collection}) as server:
        browser.get(f"http://127.0.0.1:{server.port}/")
        items = figures(browser, "items", 28)
        assert text(browser, "page-info") == "items 1\u201328 of 28"
        assert browser.find_elements(By.CSS_SELECTOR, "#results figure") == []
        assert not browser.find_element(By.ID, "next").is_enabled()
        keys = [f.find_element(By.TAG_NAME, "img").get_attribute("alt") for f in items]
        assert keys[0] == "group0/scene0000.png"  # in id order
        items[2].click()  # a click opens the item's stored row
        dialog = wait_for(lambda: _open_dialog(browser), "the row view")
        cells = _row_cells(browser)
        assert cells["key"] == keys[2] and cells["id"] == items[2].get_attribute("data-id")
        assert cells["width"] == "320" and len(cells["content_hash"]) == 64
        dialog.send_keys(Keys.ESCAPE)  # Escape closes it, and the item has the focus again
        wait_for(lambda: not _open_dialog(browser), "the row view closed")
        active = browser.switch_to.active_element
        assert active.get_attribute("data-id") == items[2].get_attribute("data-id")
        active.send_keys(Keys.ARROW_RIGHT)  # arrows move between pictures
        assert browser.switch_to.active_element.get_attribute("data-id") == items[3].get_attribute(
            "data-id"
        )
        browser.switch_to.active_element.send_keys(Keys.ENTER)  # Enter opens it
        wait_for(lambda: _open_dialog(browser), "the row view from the keyboard")
        assert _row_cells(browser)["key"] == keys[3]
        browser.find_element(By.ID, "row-search").click()  # then: items like it
        wait_for(lambda: f"query: {keys[3]}" in text(browser, "query"), "a search from the row")
        assert result_keys(browser)[0] == keys[3]
        browser.back()  # Back: the items again
        figures(browser, "items", 28)
        assert severe(browser) == []


def test_k_threshold_and_where_change_results_and_live_in_the_url(
    browser: Any, collection: Path
) -> None:
    from selenium.webdriver.common.by import By

    with page({"photos": collection}) as server:
        base = f"http://127.0.0.1:{server.port}/"
        browser.get(f"{base}?c=photos&id=5&k=5")
        assert len(figures(browser, "results", 5)) == 5
        assert browser.find_element(By.ID, "k").get_attribute("value") == "5"
        _set(browser, "k", "3")
        _set(browser, "threshold", "-1")
        _set(browser, "where", "width<320")
        browser.find_element(By.CSS_SELECTOR, "#controls button[type=submit]").click()
        wait_for(lambda: url_params(browser).get("where") == ["width<320"], "where in the URL")
        params = url_params(browser)
        assert params["k"] == ["3"] and params["threshold"] == ["-1"] and params["id"] == ["5"]
        filtered = figures(browser, "results", 2)  # two items are narrower than 320 px
        keys = result_keys(browser)
        for figure in filtered:
            item_id = figure.get_attribute("data-id")
            assert server.json("GET", f"/api/collections/photos/items/{item_id}")[1]["width"] < 320
        shared = browser.current_url
        browser.back()  # Back: the search before the controls changed
        figures(browser, "results", 5)
        assert browser.find_element(By.ID, "where").get_attribute("value") == ""
        browser.get(shared)  # the shared link: the same search again
        figures(browser, "results", 2)
        assert result_keys(browser) == keys
        assert browser.find_element(By.ID, "where").get_attribute("value") == "width<320"
        browser.get(f"{base}?c=photos&id=5&k=10&threshold=0.9")
        found = figures(browser, "results")
        scores = [float(f.find_element(By.CLASS_NAME, "score").text.split()[1]) for f in found]
        assert 1 <= len(found) < 10 and min(scores) >= 0.9  # the threshold cut the list
        browser.get(f"{base}?c=photos&where=width<320")  # where filters the items too
        figures(browser, "items", 2)
        assert "of 2 kept by the filter" in text(browser, "page-info")
        browser.get(f"{base}?c=photos&id=5&where=nosuchcolumn=1")
        message = wait_for(lambda: text(browser, "error"), "the filter's error")
        assert "nosuchcolumn" in message
        assert severe(browser, "status of 422") == []


def test_captions_show_under_results_and_items(browser: Any, captioned: Path) -> None:
    from selenium.webdriver.common.by import By

    with page({"captions": captioned}) as server:
        browser.get(f"http://127.0.0.1:{server.port}/")
        items = figures(browser, "items", 11)
        caption = items[0].find_element(By.CLASS_NAME, "caption")
        assert caption.text == "scene number 0" and caption.get_attribute("title") == caption.text
        if os.environ.get("INDEXER_SCREENSHOTS"):  # docs/serve-page-*.png: see save_screenshots
            save_screenshots(browser, server.port, Path(os.environ["INDEXER_SCREENSHOTS"]))
            items = figures(browser, "items", 11)
        items[4].find_element(By.CLASS_NAME, "info").click()  # the row button on an item
        wait_for(lambda: _open_dialog(browser), "the row view")
        cells = _row_cells(browser)
        assert cells["caption"] == f"scene number {int(cells['key'])}"
        assert cells["url"].endswith(f"/{int(cells['key'])}.jpg")
        browser.find_element(By.ID, "row-search").click()
        found = figures(browser, "results", 11)
        for figure in found:
            key = figure.find_element(By.CLASS_NAME, "key").get_attribute("title")
            words = figure.find_element(By.CLASS_NAME, "caption").text
            assert words == f"scene number {int(key)}"
        assert severe(browser) == []


def test_long_keys_do_not_overflow_a_narrow_screen(browser: Any, long_keys: Path) -> None:
    from selenium.webdriver.common.by import By

    with page({"long": long_keys}) as server:
        narrow(browser, 400)
        browser.get(f"http://127.0.0.1:{server.port}/")
        for grid in ("items", "results"):
            found = figures(browser, grid, 6)
            assert browser.execute_script("return innerWidth") == 400
            assert browser.execute_script(
                "return document.documentElement.scrollWidth <= innerWidth"
            ), f"{grid}: the page scrolls sideways"
            for figure in found:
                key = figure.find_element(By.CLASS_NAME, "key")
                full = key.get_attribute("title")
                assert full.endswith(".jpg") and len(full) > 200  # the whole key, on hover
                fits = (
                    "const r = arguments[0].getBoundingClientRect(); return r.right <= innerWidth"
                )
                assert browser.execute_script(fits, key)
                clipped = "return arguments[0].scrollWidth > arguments[0].clientWidth"
                assert browser.execute_script(clipped, key)  # ellipsised, not wrapped
                assert key.size["height"] < 20  # one line
            if grid == "items":
                found[0].click()
                wait_for(lambda: _open_dialog(browser), "the row view")
                assert browser.execute_script(
                    "return document.documentElement.scrollWidth <= innerWidth"
                )
                browser.find_element(By.ID, "row-search").click()
        assert severe(browser) == []


def test_the_random_weights_banner(browser: Any, collection: Path, captioned: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with page({"photos": collection, "captions": captioned}) as server:
        # captions told it has pretrained weights (in memory: this server's copy only)
        registry: Registry = server.registry  # type: ignore[attr-defined]
        model = registry.get("captions").collection.manifest["model"]
        model["weights"] = {**model["weights"], "kind": "pretrained"}
        browser.get(f"http://127.0.0.1:{server.port}/?c=photos")
        figures(browser, "items")
        banner = browser.find_element(By.ID, "weights")
        assert banner.is_displayed() and " ".join(banner.text.split()) == BANNER
        Select(browser.find_element(By.ID, "collection")).select_by_value("captions")
        figures(browser, "items", 11)
        assert not banner.is_displayed()
        assert severe(browser) == []


def test_a_version_being_loaded_is_said(browser: Any, collection: Path, tmp_path: Path) -> None:
    copy = tmp_path / "c"
    shutil.copytree(collection, copy, symlinks=True)
    with page({"photos": copy}) as server:
        browser.get(f"http://127.0.0.1:{server.port}/")
        figures(browser, "items")
        assert not browser.find_element("id", "status").is_displayed()
        shutil.copytree(copy / "versions" / "v000001", copy / "versions" / "v000002")
        (copy / "current").unlink()  # published, not yet loaded (the watcher is off)
        (copy / "current").symlink_to(Path("versions") / "v000002")
        wait_for(lambda: "loading version 2 of photos" in text(browser, "status"),
                 "the loading message")  # fmt: skip
        assert "answers come from v000001" in text(browser, "status")
        server.registry.refresh()  # type: ignore[attr-defined]
        wait_for(lambda: "now serving v000002" in text(browser, "status"), "the new version")
        assert text(browser, "version") == "version v000002"
        assert severe(browser) == []


def save_screenshots(browser: Any, port: int, folder: Path) -> None:
    """The page before and after a search, 1000x700, for docs/service.md:
    INDEXER_SCREENSHOTS=docs pytest tests/test_page.py -k captions."""
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 1000, "height": 700, "deviceScaleFactor": 1,
                             "mobile": False})  # fmt: skip
    browser.get(f"http://127.0.0.1:{port}/?c=captions")
    figures(browser, "items")
    _small_png(browser.get_screenshot_as_png(), folder / "serve-page-browse.png")
    browser.get(f"http://127.0.0.1:{port}/?c=captions&id=4&k=8")
    figures(browser, "results", 8)
    wait_for(lambda: browser.execute_script(LOADED, "#query-image"), "the query picture")
    _small_png(browser.get_screenshot_as_png(), folder / "serve-page-results.png")
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.get(f"http://127.0.0.1:{port}/?c=captions")


def _small_png(data: bytes, path: Path) -> None:
    """A screenshot in 256 colours (a third of its size; text stays sharp)."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _set(browser: Any, element_id: str, value: str) -> None:
    element = browser.find_element("id", element_id)
    element.clear()
    element.send_keys(value)


def _open_dialog(browser: Any) -> Any:
    from selenium.webdriver.common.by import By

    dialog = browser.find_element(By.ID, "row")
    return dialog if dialog.get_attribute("open") is not None else None


def _row_cells(browser: Any) -> dict[str, str]:
    """The row view's table, once filled: column -> the value shown."""
    from selenium.webdriver.common.by import By

    rows = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#row-table tr"), "a row")
    return {r.find_element(By.TAG_NAME, "th").text: r.find_element(By.TAG_NAME, "td").text
            for r in rows}  # fmt: skip


def _alert(browser: Any) -> Any:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        return browser.switch_to.alert
    except NoAlertPresentException:
        return None

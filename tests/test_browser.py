"""End to end: the app served by `streamlit run`, driven in headless Chromium through Playwright.

Playwright's Python package brings its own driver; the browser is the system's Chromium
(``apt-get install chromium``), never one downloaded by ``playwright install``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.app import stop_server
from retrieval.checkpoint import load_checkpoint
from retrieval.data import list_shards
from retrieval.indexing import build_index

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
APP_FILE = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
PHOTOS = Path(__file__).resolve().parents[1] / "data" / "coco-mini" / "images"
START_TIMEOUT_S = 45
WAIT_MS = 40_000  # the first page load also loads the model and word vectors

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not found: "
                                 "apt-get install chromium to run the browser tests")]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    """Poll Streamlit's health endpoint until it answers "ok"; fail with the server log otherwise."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"streamlit exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                if answer.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"streamlit did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def app_url(trained_run, sample_shards, tmp_path_factory) -> Iterator[str]:
    """`streamlit run` on an index of the held-out photos; the server is always stopped afterwards."""
    work = tmp_path_factory.mktemp("browser")
    model = load_checkpoint(trained_run.best_checkpoint)
    index = build_index(model, list_shards(sample_shards, "val"), work / "index")
    port, log = free_port(), work / "streamlit.log"
    command = [sys.executable, "-m", "streamlit", "run", str(APP_FILE), "--server.headless", "true",
               "--server.port", str(port), "--server.address", "127.0.0.1",
               "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
               "--", "--run", str(trained_run.run_dir), "--index", str(index),
               "--checkpoint", str(trained_run.best_checkpoint)]
    with open(log, "wb") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=work,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, server, log)
        yield url
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, app_url):
    """A fresh page (one Streamlit session) with the app loaded."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(app_url)
    page.get_by_label("Describe a photo").wait_for()
    try:
        yield page
    finally:
        context.close()


def search(page, text: str) -> float:
    """Type a query, press Enter; return the seconds until the page shows its answer."""
    box = page.get_by_label("Describe a photo")
    box.fill(text)
    started = time.perf_counter()
    box.press("Enter")
    page.get_by_text(f"images for {text} · searched in").wait_for()
    return time.perf_counter() - started


def result_images(page):
    return page.locator('[data-testid="stImage"] img')


def test_text_query_shows_result_images(page):
    seconds = search(page, "a red bus on the street")
    images = result_images(page)
    images.nth(9).wait_for()
    assert images.count() == 10  # k defaults to 10
    page.wait_for_function("[...document.querySelectorAll('[data-testid=stImage] img')]"
                           ".every(img => img.complete && img.naturalWidth > 0)")  # every thumbnail decoded
    summary = page.get_by_text("searched in").inner_text()
    assert float(summary.rsplit("searched in", 1)[1].split("ms")[0]) < 1000
    print(f"\nbrowser: Enter → results shown in {seconds * 1000:.0f} ms ({summary})")


def test_unknown_words_show_an_error(page):
    page.get_by_label("Describe a photo").fill("qzxv blorpt")
    page.get_by_label("Describe a photo").press("Enter")
    alert = page.locator('[data-testid="stAlert"]').filter(has_text="qzxv")
    alert.wait_for()
    assert "no known word" in alert.inner_text()
    assert result_images(page).count() == 0


def test_uploaded_photo_shows_captions_and_similar_photos(page):
    photo = sorted(PHOTOS.glob("*.jpg"))[0]
    page.get_by_role("tab", name="Image → text and images").click()
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(photo))
    page.get_by_text("Nearest captions").wait_for()
    captions = page.locator('[data-testid="stText"]').filter(has_text="1. ").first.inner_text().splitlines()
    assert [line.split(".")[0] for line in captions] == [str(rank) for rank in range(1, 11)]
    assert all(" — " in line for line in captions)
    page.get_by_text("Similar photos").wait_for()
    result_images(page).nth(10).wait_for()  # the upload and its 10 nearest photos
    assert result_images(page).count() == 11


def test_markdown_in_a_query_is_shown_as_typed_and_fetches_nothing(page):
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    typed = "[click](http://example.invalid) ![x](http://example.invalid/x.png) **bold** www.example.invalid"
    search(page, typed)
    result_images(page).nth(9).wait_for()
    assert page.locator("code").filter(has_text=typed).count() == 1
    assert page.locator('a[href*="example.invalid"]').count() == 0
    assert page.locator('img[src*="example.invalid"]').count() == 0
    assert page.locator("strong").filter(has_text="bold").count() == 0
    assert not [url for url in requested if "example.invalid" in url]

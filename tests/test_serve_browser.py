"""The web page in a real browser: Playwright drives Debian's Chromium against `imcap serve` (shipped model).

Every request the page makes to anything but the local server is aborted and recorded, so the page and
the API docs are shown to work offline. Set IMCAP_UI_SCREENSHOT=docs/serve_ui.png to refresh the README's
screenshot. CI (CI=true) must have Chromium (scripts/install.sh --dev installs it): there a missing
browser fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import EXAMPLES

CHROMIUM = Path("/usr/bin/chromium")
IMCAP = Path(sys.executable).parent / "imcap"
PHOTOS = [EXAMPLES / "flickr8k-val-dogs.jpg", EXAMPLES / "flickr8k-val-soccer.jpg"]
START_TIMEOUT_S = 180  # loading torch, the model and gradio on a busy 2-core machine


def _browser_or_skip():
    """Playwright's sync API, or skip (fail under CI) when it or Chromium is missing."""
    try:
        from playwright import sync_api
    except ImportError:
        sync_api, problem = None, "playwright is not installed (pip install -e '.[dev]')"
    else:
        problem = None if CHROMIUM.exists() else f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if problem and os.environ.get("CI"):
        pytest.fail(f"{problem}; CI must run the browser test")
    if problem:
        pytest.skip(problem)
    return sync_api


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server(str):
    """The server's URL, and the temp folder it keeps uploads in."""

    uploads: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`imcap serve` on a free localhost port, in its own process; its uploads are gone after it stops."""
    _browser_or_skip()  # no server start for a test that will not run
    port, log_path = _free_port(), tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(IMCAP), "serve", "--port", str(port), "--threads", "1"], stdout=log, stderr=log, env=env
        )
    url = Server(f"http://127.0.0.1:{port}")
    try:
        _wait_until_up(url, process, log_path)
        url.uploads = Path(re.search(r"uploads are kept in (\S+)", log_path.read_text())[1])
        assert url.uploads.is_dir()
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    assert not url.uploads.exists(), "the server left its uploads behind"


def _wait_until_up(url: str, process: subprocess.Popen, log_path: Path) -> None:
    for _ in range(START_TIMEOUT_S * 2):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        try:
            process.wait(0.5)  # a pause that ends early if the server dies
            break
        except subprocess.TimeoutExpired:
            pass
    raise AssertionError(f"imcap serve did not come up:\n{log_path.read_text()[-3000:]}")


@pytest.fixture
def page(server):
    """A Chromium page that may only talk to the local server; `page.external` lists what it tried."""
    sync_api = _browser_or_skip()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.external = []

        def local_only(route):
            if route.request.url.startswith((server, "data:", "blob:")):
                return route.continue_()
            page.external.append(route.request.url)
            return route.abort()

        page.route("**/*", local_only)
        yield page
        browser.close()


def test_page_captions_uploaded_photos_with_the_chosen_beams(server, page, tmp_path):
    from playwright.sync_api import expect

    page.goto(server)
    caption_button = page.get_by_role("button", name="Caption", exact=True)
    caption_button.wait_for(timeout=60_000)
    page.locator("#photos input[type=file]").set_input_files([str(p) for p in PHOTOS])
    expect(page.locator("#photos img")).to_have_count(2)  # uploaded and shown
    # 4 captions need 4+ beams: without the beam slider at 5 this request would be refused
    page.get_by_label("range slider for Beams").fill("5")
    page.get_by_label("range slider for Captions per photo").fill("4")
    expect(page.get_by_label("number input for Beams")).to_have_value("5")
    caption_button.click()

    best = page.locator("#captions-gallery .caption-label")
    expect(best).to_have_count(2, timeout=60_000)
    captions = [text.strip() for text in best.all_inner_texts()]
    # the Explain view draws the first photo's figure: the photo, then a panel per word of its caption
    expect(page.locator("#explain-figure img")).to_be_visible(timeout=60_000)
    expect(page.locator("#explain-photo input")).to_have_value(f"1. {PHOTOS[0].name}")
    page.screenshot(path=str(tmp_path / "serve_ui.png"), full_page=True)
    if os.environ.get("IMCAP_UI_SCREENSHOT"):
        _save_for_readme(tmp_path / "serve_ui.png", Path(os.environ["IMCAP_UI_SCREENSHOT"]))

    assert all(text and text[0].isupper() and text.endswith(".") for text in captions)
    assert "dog" in captions[0].lower()
    api = httpx.post(
        f"{server}/v1/captions",
        files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in PHOTOS],
        data={"num_beams": "5", "num_return_sequences": "4"},
        timeout=60,
    ).json()["images"]
    assert captions == [image["caption"] for image in api]  # page and API agree for the same settings
    table = page.locator("#captions-table")
    for candidate in api[0]["candidates"] + api[1]["candidates"]:
        expect(table).to_contain_text(candidate["text"])
    assert page.external == []
    uploaded = [path.name for path in server.uploads.rglob("*.jpg")]  # the page's uploads: all in there
    assert {p.name for p in PHOTOS} <= set(uploaded)


def _save_for_readme(screenshot: Path, target: Path) -> None:
    """A 256-colour copy: a third of the size, and the page's flat colours survive it."""
    from PIL import Image

    with Image.open(screenshot) as image:
        image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)


def test_api_docs_render_offline(server, page):
    from playwright.sync_api import expect

    page.goto(f"{server}/docs")
    expect(page.locator(".opblock-summary-path", has_text="/v1/captions")).to_be_visible(timeout=30_000)
    expect(page.locator(".opblock-summary-path", has_text="/v1/models")).to_be_visible()
    assert page.external == []

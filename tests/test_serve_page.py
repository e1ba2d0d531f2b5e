"""The page at `/` driven in real headless Chromium (Debian's `chromium`, through playwright's Python package;
no browser download): type a prompt, submit, watch the denoise bar move and the image appear."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("VRAMFIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    not CHROMIUM, reason="no chromium on this machine: `make browser` installs Debian's (needs root + apt-get)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    import uvicorn

    from fake_serve_app import make_app

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(make_app(), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start in 30 s"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(10)


# every value the denoise bar takes, recorded by the page itself (a MutationObserver on the <progress> element)
RECORD_BARS = """
window.__bars = {encode: [], denoise: [], decode: []};
document.addEventListener('DOMContentLoaded', () => {
  for (const s of Object.keys(window.__bars)) {
    const el = document.getElementById('bar-' + s);
    new MutationObserver(() => window.__bars[s].push(el.hasAttribute('value') ? el.value : null))
      .observe(el, {attributes: true, attributeFilter: ['value']});
  }
});
"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def test_page_generates_an_image(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 900, "height": 760})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.add_init_script(RECORD_BARS)
    page.goto(server + "/")
    page.fill("#prompt", "a watercolor fox in a snowy forest")
    page.fill("#size", "64x64")
    page.fill("#steps", "6")
    page.fill("#seed", "3")
    page.fill("#n", "1")
    page.click("#submit")

    page.wait_for_selector("#images img", timeout=120_000)
    page.wait_for_function("() => [...document.querySelectorAll('#images img')].every(i => i.complete && i.naturalWidth > 0)",
                           timeout=30_000)
    page.wait_for_selector("#run:not([hidden])", timeout=30_000)
    assert page.inner_text("#state") == "done"
    assert page.is_hidden("#error"), page.inner_text("#error")

    bars = page.evaluate("window.__bars")
    denoise = [v for v in bars["denoise"] if v is not None]
    # the bar moved through intermediate values, never backwards, and ended full
    assert any(0 < v < 1 for v in denoise), bars
    assert denoise == sorted(denoise), bars
    assert denoise[-1] == 1 and page.eval_on_selector("#bar-decode", "e => e.value") == 1
    assert page.inner_text("#steps-text") == "6/6"

    img = page.eval_on_selector("#images img", "i => [i.naturalWidth, i.naturalHeight]")
    assert img == [64, 64]
    assert page.inner_text("#recipe").strip() not in ("", "(not reported)")
    assert page.locator("#timings tbody tr").count() >= 2
    assert not errors, errors

    shot = tmp_path / "serve-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 1000
    if os.environ.get("VRAMFIT_UPDATE_SCREENSHOT"):  # the README's picture: refreshed on request, not every run
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, REPO / "docs" / "serve-page.png")
    page.close()


def test_page_shows_a_bad_input_error(server, browser):
    page = browser.new_page()
    page.goto(server + "/")
    page.fill("#prompt", "   ")  # whitespace passes the browser's `required`; the server refuses it
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert "prompt" in page.inner_text("#error")
    assert page.inner_text("#state") == "error"
    assert page.is_enabled("#submit")
    page.close()

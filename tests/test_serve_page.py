"""The page at `/` driven in real headless Chromium (Debian's `chromium`, through playwright's Python package;
no browser download): type a prompt, submit, watch the denoise bar move and the image appear."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("VRAMFIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# slow: the server spawns three stage workers (torch + diffusers each), over a minute on 2 shared cores
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not CHROMIUM, reason="no chromium on this machine: `make browser` installs Debian's (needs root + apt-get)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `vramfit serve` on flux-tiny (CPU, loopback, a free port), started here and stopped by its pid."""
    import httpx

    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "vramfit.cli", "serve", "--model", "flux-tiny", "--weights",
                             "random", "--recipe", "", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}; see {log.name}"
            assert time.monotonic() < deadline, f"the server did not answer /health in 240 s; see {log.name}"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


# every value the denoise bar takes, recorded by the page itself (a MutationObserver on the <progress> element)
RECORD_BARS = """
window.__bars = {encode: [], denoise: [], decode: []};
window.__previews = 0;
document.addEventListener('DOMContentLoaded', () => {
  new MutationObserver((ms) => ms.forEach((m) => m.addedNodes.forEach((n) => {
    if (n.tagName === 'IMG') window.__previews += 1;
  }))).observe(document.getElementById('previews'), {childList: true});
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
    page = browser.new_page(viewport={"width": 900, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.add_init_script(RECORD_BARS)
    page.goto(server + "/")
    page.fill("#prompt", "a watercolor fox in a snowy forest")
    page.fill("#size", "64x64")
    page.fill("#steps", "6")
    page.fill("#seed", "3")
    page.fill("#n", "1")
    page.fill("#partial", "2")
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
    assert page.evaluate("window.__previews") == 2  # "Previews 2": partial images after steps 2 and 4

    img = page.eval_on_selector("#images img", "i => [i.naturalWidth, i.naturalHeight]")
    assert img == [64, 64]
    assert page.inner_text("#recipe").strip() not in ("", "(not reported)")
    assert page.locator("#timings tbody tr").count() >= 2
    assert not errors, errors

    shot = tmp_path / "serve-page.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 1000
    if os.environ.get("VRAMFIT_UPDATE_SCREENSHOT"):  # the README's picture: refreshed on request, not every run
        from PIL import Image

        (REPO / "docs").mkdir(exist_ok=True)
        # a 64-colour palette keeps the committed PNG small; the page is flat colours and text
        Image.open(shot).convert("RGB").quantize(64).save(REPO / "docs" / "serve-page.png", optimize=True)
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

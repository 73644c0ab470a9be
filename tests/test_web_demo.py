"""The browser demo (`livekv serve --demo`): headless Chromium types into the page, a suggestion
streams in as ghost text, Tab accepts it. Saves a screenshot to bench/out/web_demo.png (the README shows a copy, docs/img/web_demo.png).
When the server goes away and another comes up on its port (as when a replica dies under Ray
Serve), the page reconnects, re-opens its file with its own text, and nothing typed is lost.

Needs Debian's chromium (/usr/bin/chromium) and the Python `playwright` package; never
downloads a browser. Skips, saying which is missing, when either is absent.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from livekv.lsp_server.worker import Worker
from livekv.lsp_server.ws_http import DEMO_ASSETS, DEMO_ROUTES
from livekv.lsp_server.ws_server import BackgroundServer, ServeOptions

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# No sandbox as root; the rest keep a closed network quiet (no update checks, sync or QUIC probes).
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
HANG_MS = 300_000  # a guard against hangs, not a performance bound
SHOT = Path(__file__).resolve().parent.parent / "bench" / "out" / "web_demo.png"

try:
    from playwright.sync_api import sync_playwright
    MISSING = None if Path(CHROMIUM).exists() else \
        "the browser test needs Chromium at /usr/bin/chromium (`apt-get install -y chromium`)"
except ImportError:
    MISSING = "the browser test needs the Python package playwright (`pip install playwright`; no browser download)"


def test_the_page_loads_nothing_from_the_internet():
    for name in {name for name, _ in DEMO_ROUTES.values()}:
        text = (DEMO_ASSETS / name).read_text(encoding="utf-8")
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(\s*["']?(https?:)?//""", text), name
        assert not re.search(r"""fetch\(\s*["'`](https?:)?//""", text), name


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def demo(engine):
    worker = Worker(lambda: engine)
    srv = BackgroundServer(worker, ServeOptions(port=0, demo=True))
    yield f"http://127.0.0.1:{srv.server.port}/"
    srv.close()
    worker.close(timeout=HANG_MS / 1000)


def u16(s: str) -> int:
    return len(s.encode("utf-16-le")) // 2


@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
def test_type_see_a_suggestion_stream_in_and_accept_it_with_tab(browser, demo, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 760})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    page.goto(demo)
    page.wait_for_selector("#status[data-state=ready]", timeout=HANG_MS)
    original = page.input_value("#code")
    assert "def bisect_right" in original

    # Type a new function near the top: every keystroke is an edit that rotates the keys below it.
    first_line_end = original.index("\n")
    page.focus("#code")
    page.evaluate(f"() => document.getElementById('code').setSelectionRange({first_line_end}, {first_line_end})")
    typed = "\n\ndef insort_middle(a, x"
    page.keyboard.type(typed)
    at = first_line_end + len(typed)
    assert page.input_value("#code") == original[:first_line_end] + typed + original[first_line_end:]

    # The suggestion streams in as ghost text; wait for the stream to end to read all of it.
    page.wait_for_function("() => document.getElementById('code').dataset.streaming === 'false' "
                           "&& document.getElementById('ghost') !== null", timeout=HANG_MS)
    ghost = page.eval_on_selector("#ghost", "e => e.textContent")
    assert ghost.strip(), "the model suggested nothing"
    # the cost panel: the last keystroke encoded a few tokens, a full re-encode would take them all
    encoded = int(page.inner_text("#edit-encoded"))
    full = int(page.inner_text("#full-tokens"))
    assert 0 < encoded < 20 and full > 900 and int(page.inner_text("#doc-tokens")) == full
    assert int(page.inner_text("#edit-rotated")) > 800
    # Chrome scrolls the textarea a little while typing; show the file from its first line
    page.evaluate("() => { const t = document.getElementById('code'); t.scrollTop = 0; "
                  "t.dispatchEvent(new Event('scroll')); }")
    shot = tmp_path / SHOT.name
    page.screenshot(path=str(shot))

    page.keyboard.press("Tab")
    page.wait_for_function("() => document.getElementById('ghost') === null", timeout=HANG_MS)
    want = original[:first_line_end] + typed + ghost + original[first_line_end:]
    assert page.input_value("#code") == want
    assert page.evaluate("() => document.getElementById('code').selectionStart") == u16(want[:at]) + u16(ghost)
    assert not errors, errors

    SHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SHOT)  # the one with the ghost text, taken before Tab: it shows the feature
    page.close()


def ready_page(browser, url: str, errors: list):
    page = browser.new_page(viewport={"width": 1280, "height": 760})
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#status[data-state=ready]", timeout=HANG_MS)
    return page


def held_texts(worker) -> list[str]:
    """The texts of the demo file's documents the server holds (every connection's)."""
    return worker.submit(lambda eng: sorted(d.text for u, d in eng.documents.items() if u.endswith("/bisect.py"))
                         ).result(timeout=HANG_MS / 1000)


@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
def test_the_page_reopens_its_file_on_a_new_server_with_nothing_lost(browser, engine):
    worker = Worker(lambda: engine)
    first = BackgroundServer(worker, ServeOptions(port=0, demo=True))
    port, second, errors = first.server.port, None, []
    try:
        page = ready_page(browser, f"http://127.0.0.1:{port}/", errors)
        original = page.input_value("#code")
        end = original.index("\n")   # type at the end of the first line, where suggestions come
        page.focus("#code")
        page.evaluate(f"() => document.getElementById('code').setSelectionRange({end}, {end})")
        page.keyboard.type("\n# typed before")
        page.wait_for_function("() => document.getElementById('log').textContent === '' && "
                               "document.getElementById('edit-encoded').textContent !== '–'", timeout=HANG_MS)
        first.close()  # the connection drops, as when a replica dies
        first = None
        page.wait_for_selector("#status[data-state=reconnecting]", timeout=HANG_MS)
        page.keyboard.type("\ndef insort_middle(a, x")
        # the suggestion for it is asked for while no server is there: it waits for one
        page.wait_for_function("() => document.getElementById('code').dataset.streaming === 'true'", timeout=HANG_MS)
        assert held_texts(worker) == []   # the old server's documents went with its connection

        second = BackgroundServer(worker, ServeOptions(port=port, demo=True))
        # with no further keystroke: the waiting requests go out, get unknown_uri, the page
        # re-opens its file and the suggestion streams in
        page.wait_for_function("() => document.getElementById('status').textContent.includes('re-opened') "
                               "&& document.getElementById('code').dataset.streaming === 'false' "
                               "&& document.getElementById('ghost') !== null", timeout=HANG_MS)
        typed = "\n# typed before\ndef insort_middle(a, x"
        assert page.input_value("#code") == original[:end] + typed + original[end:]
        # every keystroke, before and during the outage, once
        assert held_texts(worker) == [original[:end] + typed + original[end:]]
        assert not errors, errors
        page.close()
    finally:
        for srv in (first, second):
            if srv is not None:
                srv.close()
        worker.close(timeout=HANG_MS / 1000)

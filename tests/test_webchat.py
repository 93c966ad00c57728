"""The web chat page in a headless Chromium, against a real `ternlm serve` on the shipped model."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from ternlm.server import serve_subprocess

SERVER_ARGS = ["--threads", "1", "--log-level", "warning"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no system chromium (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[test]')")

REPLY_TIMEOUT_MS = 60_000

# Counts the tasks in which the newest assistant bubble's text grew: updates rendered in one burst count once,
# so two or more means the reply reached the page in pieces.
COUNT_UPDATES_JS = """() => {
  window.__ternlmUpdates = 0;
  let seen = 0, sameTask = false;
  new MutationObserver(() => {
    const bubbles = document.querySelectorAll('#messages .msg.assistant');
    const len = bubbles.length ? bubbles[bubbles.length - 1].textContent.length : 0;
    if (len > seen && !sameTask) {
      window.__ternlmUpdates += 1;
      sameTask = true;
      setTimeout(() => { sameTask = false; }, 0);
    }
    seen = len;
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve_subprocess(SERVER_ARGS) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def test_chat_streams_a_reply(server: str, browser: sync_api.Browser) -> None:
    page = browser.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    page.goto(server + "/")
    assert page.locator("#input").count() == 1, "GET / did not serve the chat page (is static/ packaged?)"
    model = page.locator("#model")
    sync_api.expect(model).not_to_have_text("connecting…")
    sync_api.expect(model).not_to_have_text("offline")
    page.evaluate(COUNT_UPDATES_JS)

    page.click("summary")
    page.fill("#temperature", "0")  # greedy: the reply is the same on every run
    page.fill("#max-tokens", "400")  # a long reply: a short one from a fast model can reach the page in one read
    page.fill("#input", "Hello from the web chat test")
    page.click("#send")

    done = page.locator(".msg.assistant[data-done='true']")
    done.wait_for(timeout=REPLY_TIMEOUT_MS)
    assert page.text_content("#error") == ""
    reply = done.text_content()
    assert reply, "the assistant bubble finished empty"
    assert done.get_attribute("data-finish") in ("stop", "length")
    assert page.locator(".msg.user").text_content() == "Hello from the web chat test"
    updates = page.evaluate("window.__ternlmUpdates")
    assert updates >= 2, f"the reply arrived in {updates} update(s), not streamed"
    sync_api.expect(page.locator("#send")).to_be_enabled()
    sync_api.expect(page.locator("#stop")).to_be_disabled()
    assert "tok/s" in page.text_content("#stats")
    assert page_errors == []
    page.close()

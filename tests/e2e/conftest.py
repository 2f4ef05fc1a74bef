"""Headless Chromium (Debian's package, driven by Playwright) against pytest-django's live server.

No browser is ever downloaded: Playwright launches /usr/bin/chromium (``.ci/run`` installs
it with apt when missing). Where it is absent the browser tests skip, saying so (fail under
CARRY_ON_REQUIRE_SERVICES=1, as in CI).

Screenshots of every page go to ``test-artifacts/screenshots/`` (ignored by git), so a
reviewer can look at what the tests saw.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.services import service_missing

CHROMIUM = Path(os.environ.get("CARRY_ON_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium per module (skips where Debian's chromium is not installed).

    Playwright's sync API keeps an event loop running in this thread while it is started,
    which Django's ORM guard takes for async code; the tests' ORM calls between page actions
    are plain synchronous calls, so the guard is lifted for exactly that time.
    """
    if not CHROMIUM.is_file():
        service_missing(
            f"{CHROMIUM} is not installed (apt-get install chromium); .ci/run installs it"
        )
    try:
        from playwright import sync_api
    except ImportError:
        service_missing("playwright is not installed (pip install -e '.[dev]')")
    with pytest.MonkeyPatch.context() as patch, sync_api.sync_playwright() as playwright:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Tab:
    """A page plus what the tests check on every page: console errors and screenshots."""

    page: Any
    base_url: str
    errors: list[str] = field(default_factory=list)

    def go(self, path: str) -> Any:
        return self.page.goto(self.base_url + path)

    def shot(self, name: str, *, full_page: bool = True) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def sign_in(self, username: str, password: str) -> None:
        self.go("/accounts/login/")
        self.page.get_by_label("Username").fill(username)
        self.page.get_by_label("Password").fill(password)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_url(re.compile(r"/$"))

    def open_playground(self, model: str, *, max_tokens: int) -> None:
        """From a finished job's page, its playground set to greedy replies of ``max_tokens``."""
        self.page.get_by_role("link", name="Chat with it in the playground").click()
        self.page.wait_for_url(re.compile(r"/playground/"))
        assert self.page.get_by_label("Chat with").input_value() == model
        self.page.get_by_label("Temperature").fill("0")
        self.page.get_by_label("Max tokens").fill(str(max_tokens))

    def finished_answer(self, pane: int = 0, *, timeout_ms: int = 180_000) -> Any:
        """The newest answer in playground ``pane``, once it has finished streaming."""
        answer = self.page.locator(f'[data-pane="{pane}"] [data-answer]').last
        answer.wait_for()
        self.page.wait_for_function(
            "el => el.dataset.done === 'true'", arg=answer.element_handle(), timeout=timeout_ms
        )
        return answer

    def assert_labelled(self) -> None:
        """Every visible form control has a label (or an ARIA name)."""
        unlabelled = self.page.evaluate(
            """() => Array.from(document.querySelectorAll('input, select, textarea, button'))
                .filter(el => el.type !== 'hidden' && !el.closest('[hidden]'))
                .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                              && !el.getAttribute('aria-labelledby')
                              && !(el.tagName === 'BUTTON' && el.textContent.trim()))
                .map(el => el.outerHTML.slice(0, 120))"""
        )
        assert unlabelled == [], unlabelled


@pytest.fixture
def tab(browser: Any, live_server: Any) -> Iterator[Tab]:
    """A fresh browser context on the live server; fails the test on any console error."""
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    tab = Tab(page=page, base_url=live_server.url)
    page.on("console", lambda m: tab.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: tab.errors.append(str(e)))
    yield tab
    context.close()
    assert tab.errors == [], tab.errors


@pytest.fixture(autouse=True)
def _fresh_engine() -> Iterator[None]:
    """The live server's serving engine starts empty and its decode thread stops after."""
    from webapp.serving.engine import reset_engine

    reset_engine()
    yield
    reset_engine()
